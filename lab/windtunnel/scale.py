"""A profile's Track D sizes read per task: which transformer shape and which training
budget each wind tunnel gets, and a one-line statement of that scale for the pages."""

from __future__ import annotations

from lab.windtunnel.models import TunnelTransformer, n_params
from lab.windtunnel.tasks import BijectionTask, HMMTask

TASK_NAMES = ("bijection", "hmm")


def _known(name: str) -> None:
    if name not in TASK_NAMES:
        raise ValueError(f"unknown wind tunnel {name!r}; expected one of {TASK_NAMES}")


def make_tasks(bayes) -> dict:
    """{name: task} at a BayesScale's sizes: bijection elimination without replacement (the
    paper's main setting, V values and V - 1 keys) and HMM state tracking. (Bijection with
    repeated keys is in lab.windtunnel.tasks but not in Track D: see the wind-tunnel guide.)"""
    return {
        "bijection": BijectionTask(bayes.n_values, bayes.n_values - 1),
        "hmm": HMMTask(bayes.hmm_states, bayes.hmm_symbols, bayes.hmm_length),
    }


def transformer_shape(bayes, name: str) -> tuple[int, int, int]:
    """(layers, heads, width) of a task's transformer: the HMM has its own (the paper's HMM
    model is deeper and wider than its bijection model)."""
    _known(name)
    if name == "hmm":
        return bayes.hmm_n_layer, bayes.hmm_n_head, bayes.hmm_n_embd
    return bayes.n_layer, bayes.n_head, bayes.n_embd


def train_settings(bayes, name: str) -> dict:
    """{steps, lr, warmup_steps, weight_decay} of a task's runs. Every model of a task gets
    the same, so the comparisons between architectures are at equal budgets."""
    _known(name)
    if name == "hmm":
        return {
            "steps": bayes.hmm_steps,
            "lr": bayes.hmm_lr,
            "warmup_steps": bayes.hmm_warmup_steps,
            "weight_decay": bayes.hmm_weight_decay,
        }
    return {
        "steps": bayes.bijection_steps,
        "lr": bayes.lr,
        "warmup_steps": bayes.warmup_steps,
        "weight_decay": bayes.weight_decay,
        "decay_fraction": bayes.decay_fraction,
    }


def scale_text(bayes, name: str, profile_name: str = "") -> str:
    """'V=20, 19 keys (37 tokens); 4 layers x 4 heads x d64, 202,112 parameters; 6,000 steps,
    batch 64': the task, the transformer and its budget, for a paper-vs-lab table."""
    task = make_tasks(bayes)[name]
    layers, heads, width = transformer_shape(bayes, name)
    params = n_params(TunnelTransformer(task, n_layer=layers, n_head=heads, n_embd=width))
    if name == "hmm":
        what = f"S={task.n_states} states, O={task.n_symbols} symbols, K={task.length} observations"
    else:
        what = f"V={task.n_values}, {task.n_keys} keys ({task.seq_len} tokens)"
    steps = train_settings(bayes, name)["steps"]
    where = f" ({profile_name} profile)" if profile_name else ""
    return (
        f"{what}; {layers} layers x {heads} heads x d{width}, {params:,} parameters; "
        f"{steps:,} steps, batch {bayes.batch_size}{where}"
    )
