"""Looking inside models (Tracks B and C): hook points with one naming scheme
(TransformerLens-like) for the lab's GPT, Hugging Face decoders and BERT encoders
(`hooks`), and the analyses built on them: attention statistics (`attention`), the
residual stream (`residual`), linear probes with control tasks (`probes`) and the labels
they probe for (`properties`)."""

from lab.inspect.hooks import (
    FINAL,
    POINTS,
    ActivationCache,
    HookError,
    adapter,
    capture,
    check_length,
    hook_names,
    mean_ablation,
    patch,
    resolve,
    run_with_cache,
    zero_ablation,
)

__all__ = [
    "FINAL",
    "POINTS",
    "ActivationCache",
    "HookError",
    "adapter",
    "capture",
    "check_length",
    "hook_names",
    "mean_ablation",
    "patch",
    "resolve",
    "run_with_cache",
    "zero_ablation",
]
