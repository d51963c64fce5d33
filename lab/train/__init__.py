"""Training: the loop, its learning-rate schedule and checkpoints."""

from lab.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from lab.train.schedule import lr_at
from lab.train.trainer import (
    TrainConfig,
    TrainingDivergedError,
    TrainResult,
    evaluate,
    make_loss_fn,
    make_optimizer,
    per_position_loss,
    train,
    train_step,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "capture_rng_state",
    "evaluate",
    "load_checkpoint",
    "lr_at",
    "restore_rng_state",
    "save_checkpoint",
    "train",
    "make_loss_fn",
    "make_optimizer",
    "per_position_loss",
    "train_step",
]
