"""Track A's fine-tuning a second way: trl's SFTTrainer with the same peft LoRA config, the
same data in the same order and the same seed as the written-out loop in `lab.finetune`.

Kept out of lab/finetune.py on purpose: that file's source is part of the fine-tuning cache
key, and this side path must not invalidate the cached runs.

What is the same: the base (any Hugging Face causal LM directory), LoRA (rank, alpha,
target modules, no dropout, no bias), the adapter's initialisation (SFTTrainer seeds
with the run's seed before it wraps the model, as the loop does), every batch (the loop's
`get_batch` draws replayed from a generator seeded the same way, each window of
block_size + 1 tokens one pre-tokenised row, read sequentially), the loss (mean next-token
cross-entropy over every position), AdamW (betas 0.9/0.99, the config's weight decay), the
gradient clipping, float32, and the evaluations (`hf_loss` on the same fixed batches every
eval_interval steps, from a callback). What differs: the schedule is transformers'
`cosine_with_min_lr`, which decays over `steps - warmup` updates and reaches the floor one
update after the last, where the loop's `lr_at` reaches it on the last update, so every
update after the first runs at a learning rate a little (at most lr / steps) higher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lab.data import TokenData, get_batch
from lab.finetune import FinetuneConfig, check_targets, hf_loss, load_base

__all__ = ["TrlFinetune", "replayed_rows", "trl_finetune"]


@dataclass
class TrlFinetune:
    """A trl SFTTrainer fine-tuning run: per-step {step, lr, loss} and the evaluations
    ({step, train_loss, new_val, old_val}, as FinetuneResult.evals), the trained model."""

    config: FinetuneConfig
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    model: object = None
    path: Path | None = None

    @property
    def final(self) -> dict:
        return self.evals[-1]


def replayed_rows(new: TokenData, old: TokenData, cfg: FinetuneConfig) -> list[list[int]]:
    """The token windows lab.finetune's loop trains on, in order: per step, batch_size - n_old
    windows of the new task then n_old of the old one (replay), each block_size + 1 tokens
    (inputs and the next-token targets in one row)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n_old = round(cfg.batch_size * cfg.replay_fraction)
    rows: list[list[int]] = []
    for _ in range(cfg.steps):
        x, y = get_batch(new.train, cfg.block_size, cfg.batch_size - n_old, gen)
        parts = [(x, y)]
        if n_old:
            parts.append(get_batch(old.train, cfg.block_size, n_old, gen))
        for a, b in parts:
            rows.extend(torch.cat([a, b[:, -1:]], dim=1).tolist())
    return rows


def _hf_tokenizer(tokenizer):
    """A transformers tokenizer with a padding token (rows never need padding: all are
    block_size + 1 long, but trl's collator asks for one)."""
    from lab.tokenizers.fast import to_hf_tokenizer

    tok = getattr(tokenizer, "_tok", tokenizer)  # lab.tokenizers.hf.HFTokenizer wraps a transformers one
    tok = tok if hasattr(tok, "pad_token_id") else to_hf_tokenizer(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.convert_ids_to_tokens(0)
    return tok


def _sft_config(cfg: FinetuneConfig, out: Path, device: str):
    """trl's settings for the loop lab.finetune writes out: the same optimizer, schedule,
    clipping, seed and batch order (sequential over the replayed rows), float32, no logging."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_ratio},
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.99,
        adam_epsilon=1e-8,
        optim="adamw_torch",
        max_grad_norm=cfg.grad_clip,
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        bf16=False,
        fp16=False,
        use_cpu=not str(device).startswith("cuda"),
        dataloader_num_workers=0,
        max_length=None,
        packing=False,
        completion_only_loss=False,
        dataset_num_proc=None,
    )


def trl_finetune(
    base_dir, new: TokenData, old: TokenData, cfg: FinetuneConfig, *, tokenizer, out_dir, device: str = "cpu"
) -> TrlFinetune:
    """Fine-tune `base_dir` on `new` with trl's SFTTrainer (LoRA or full; not QLoRA), measuring
    `old` too, as lab.finetune.finetune does. `tokenizer`: the base's (a lab tokenizer or a
    transformers one)."""
    from peft import LoraConfig
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    from lab.data.hf_datasets import _datasets

    if not isinstance(cfg, FinetuneConfig):
        raise ValueError(f"cfg must be a FinetuneConfig, got {type(cfg).__name__}")
    if cfg.method == "qlora":
        raise ValueError("trl_finetune compares full and LoRA fine-tuning; QLoRA's 4-bit base is not supported here")
    out = Path(out_dir)
    rows = replayed_rows(new, old, cfg)
    ds = _datasets().Dataset.from_dict({"input_ids": rows})
    model = load_base(base_dir, "lora" if cfg.method == "lora" else "full", device)
    peft = None
    if cfg.method == "lora":
        check_targets(model, cfg.target_modules)
        peft = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.lora_alpha,
            target_modules=list(cfg.target_modules),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    args = _sft_config(cfg, out, device)
    result = TrlFinetune(cfg)

    class Evaluate(TrainerCallback):
        def __init__(self, trainer=None):
            self.trainer = trainer

        def measure(self, step, model):
            kw = dict(block_size=cfg.block_size, batch_size=cfg.batch_size, n_batches=cfg.eval_batches)
            result.evals.append(
                {
                    "step": step,
                    "train_loss": hf_loss(model, new.train, **kw),
                    "new_val": hf_loss(model, new.val, **kw),
                    "old_val": hf_loss(model, old.val, **kw),
                }
            )

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.measure(0, model)

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % cfg.eval_interval == 0 or state.global_step == cfg.steps:
                self.measure(state.global_step, model)

    trainer = SFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=_hf_tokenizer(tokenizer), peft_config=peft
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Evaluate())
    trainer.train()
    result.history = [
        {"step": int(h["step"]), "lr": float(h.get("learning_rate", float("nan"))), "loss": float(h["loss"])}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    result.model = trainer.model.eval()
    result.path = out
    return result
