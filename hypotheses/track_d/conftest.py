"""Track D material: the wind-tunnel tasks at the profile's sizes, held-out evaluation
sequences, and cached training runs of the transformer and its attention-free baselines."""

import pytest
import torch

from lab.windtunnel.models import TunnelTransformer, matched_paper_mlp, matched_prefix_mlp, n_params
from lab.windtunnel.scale import make_tasks, train_settings, transformer_shape
from lab.windtunnel.train import TunnelTrainConfig, train_tunnel

KINDS = ("transformer", "mlp", "paper-mlp")


@pytest.fixture(scope="session")
def tunnels(lab):
    """{name: task}: bijection elimination without replacement (the paper's main setting) and
    HMM state tracking, at the profile's sizes."""
    return make_tasks(lab.profile.bayes)


@pytest.fixture(scope="session")
def tunnel_eval(lab, tunnels):
    """{name: Batch} of eval_sequences held-out sequences per task (a generator no training
    run uses; fresh random bijections / HMMs, so nothing was seen in training)."""
    n = lab.profile.bayes.eval_sequences
    return {name: task.sample(n, torch.Generator().manual_seed(987_654)) for name, task in tunnels.items()}


@pytest.fixture(scope="session")
def tunnel_runs(lab, tunnels):
    """tunnel_runs(task_name, kind) -> {seed: TunnelRun}: kind 'transformer', 'mlp' (the
    information-matched PrefixMLP: sees the whole prefix, parameters within 10% of the
    transformer's) or 'paper-mlp' (shaped like the paper's: 18-20 residual layers, within
    1%, each position seeing its own token and position), all on the same steps, batches
    and optimiser. Transformers keep their weights at the profile's kept_steps."""
    b = lab.profile.bayes
    cache = {}

    def get(name: str, kind: str = "transformer"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if (name, kind) in cache:
            return cache[(name, kind)]
        task = tunnels[name]
        n_layer, n_head, n_embd = transformer_shape(b, name)

        def transformer():
            return TunnelTransformer(task, n_layer=n_layer, n_head=n_head, n_embd=n_embd)

        target = n_params(transformer())
        build = {
            "transformer": transformer,
            "mlp": lambda: matched_prefix_mlp(task, target, embd=b.mlp_embd, depth=b.mlp_depth),
            "paper-mlp": lambda: matched_paper_mlp(task, target, depths=b.paper_mlp_depths),
        }[kind]
        settings = train_settings(b, name)
        keep = tuple(s for s in b.kept_steps if s <= settings["steps"]) if kind == "transformer" else ()
        runs = {}
        for seed in lab.seeds:
            cfg = TunnelTrainConfig(batch_size=b.batch_size, seed=seed, keep_steps=keep, **settings)
            runs[seed] = train_tunnel(
                task, build, cfg, progress=lab.progress, device=lab.device, checkpoint_every=b.checkpoint_every
            )
        cache[(name, kind)] = runs
        return runs

    return get
