"""Track D material: the wind-tunnel tasks at the profile's sizes, held-out evaluation
sequences, and cached training runs of the transformer and its attention-free baselines."""

import pytest
import torch

from lab.windtunnel.models import TunnelTransformer, matched_position_mlp, matched_prefix_mlp, n_params
from lab.windtunnel.tasks import BijectionTask, HMMTask
from lab.windtunnel.train import TunnelTrainConfig, train_tunnel

KINDS = ("transformer", "mlp", "position-mlp")


@pytest.fixture(scope="session")
def tunnels(lab):
    """{name: task}: bijection elimination without replacement (the paper's main setting),
    with replacement (entropy varies across sequences at a fixed position), and HMM."""
    b = lab.profile.bayes
    return {
        "bijection": BijectionTask(b.n_values, b.n_values - 1),
        "bijection-repl": BijectionTask(b.n_values, b.n_values - 1, with_replacement=True),
        "hmm": HMMTask(b.hmm_states, b.hmm_symbols, b.hmm_length),
    }


@pytest.fixture(scope="session")
def tunnel_eval(lab, tunnels):
    """{name: Batch} of eval_sequences held-out sequences per task (a generator no training
    run uses; fresh random bijections / HMMs, so nothing was seen in training)."""
    n = lab.profile.bayes.eval_sequences
    return {name: task.sample(n, torch.Generator().manual_seed(987_654)) for name, task in tunnels.items()}


@pytest.fixture(scope="session")
def tunnel_runs(lab, tunnels):
    """tunnel_runs(task_name, kind) -> {seed: TunnelRun}: kind 'transformer', 'mlp' (sees the
    whole prefix, parameter count within 10% of the transformer's) or 'position-mlp' (sees
    only its own token and position, also matched), all on the same steps and batches."""
    b = lab.profile.bayes
    cache = {}

    def get(name: str, kind: str = "transformer"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if (name, kind) in cache:
            return cache[(name, kind)]
        task = tunnels[name]

        def transformer():
            return TunnelTransformer(task, n_layer=b.n_layer, n_head=b.n_head, n_embd=b.n_embd)

        target = n_params(transformer())
        build = {
            "transformer": transformer,
            "mlp": lambda: matched_prefix_mlp(task, target, embd=b.mlp_embd, depth=b.mlp_depth),
            "position-mlp": lambda: matched_position_mlp(task, target, depth=b.mlp_depth),
        }[kind]
        steps = b.hmm_steps if name == "hmm" else b.bijection_steps
        keep = tuple(s for s in b.kept_steps if s <= steps) if kind == "transformer" else ()
        runs = {}
        for seed in lab.seeds:
            cfg = TunnelTrainConfig(
                steps=steps, batch_size=b.batch_size, lr=b.lr, warmup_steps=b.warmup_steps, seed=seed, keep_steps=keep
            )
            runs[seed] = train_tunnel(task, build, cfg, progress=lab.progress)
        cache[(name, kind)] = runs
        return runs

    return get
