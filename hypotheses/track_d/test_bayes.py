"""Track D: "The Bayesian Geometry of Transformer Attention" (Aggarwal, Dalal & Misra,
arXiv 2512.22471) reproduced in its wind tunnels: tasks whose exact posterior is known
(bijection elimination, HMM state tracking) and which cannot be memorised (a fresh
bijection / HMM every sequence). The `gpu` profile is the paper's scale; `cpu` trains the
paper's vocabulary with a smaller model. Every paper-vs-lab table states both sides'
scale; deviations from the paper are listed in the wind-tunnel guide.

A hypothesis about a trained model first checks, per seed, that the model trained: its
final training loss closed at least half the gap between a uniform guess (ln C nats for
C answers) and the Bayes loss, and its held-out KL(Bayes || model) is below that of the
best predictor that ignores the context. A seed that fails makes the verdict invalid, never refuted or confirmed."""

import math

import numpy as np
import pytest
import torch

from lab.report import at_least, at_most, between, check, greater_than, less_than, prediction
from lab.report.plots import bar_figure, line_figure, scatter_grid
from lab.windtunnel.analysis import (
    ablation_mae,
    attention_drift,
    attention_entropy_by_layer,
    entropy_probe,
    frame_step,
    key_cosines,
    key_geometry,
    manifold,
    random_cosine_baseline,
    stream_points,
    update_gains,
    value_manifold,
)
from lab.windtunnel.metrics import bayes_loss_nats, calibration, context_blind_floor, context_blind_kl_floor, predict
from lab.windtunnel.models import n_params
from lab.windtunnel.scale import scale_text, train_settings, transformer_shape

pytestmark = pytest.mark.track_d

# the paper's side of every table: its scale, per task
PAPER_SCALE = {
    "bijection": (
        "V=20, 19 keys (37 tokens); 6 layers x 6 heads x d192, 2.67M parameters; 50k-150k steps, batch 128-256"
    ),
    "hmm": (
        "S=5 states, O=5 symbols, K=20 observations; 9 layers x 8 heads x d256; 10k HMMs x 50 epochs, batch "
        "64 (authors' code)"
    ),
}


def _table(outcome, lab, tunnels, name: str, table: str, rows: list[dict], caption: str = "") -> None:
    """A paper-vs-lab table whose rows carry both sides' scale."""
    here = scale_text(lab.profile.bayes, name, lab.profile.name)
    full = [{**r, "paper scale": PAPER_SCALE[name], "lab scale": here} for r in rows]
    outcome.table(table, full, caption=caption)


_CAL = {}


def _cal(run, batch):
    key = (id(run), id(batch))
    if key not in _CAL:
        _CAL[key] = calibration(predict(run.model, batch.tokens), batch)
    return _CAL[key]


def _require_trained(outcome, runs, task, batch, what: str = "transformer") -> None:
    """Per seed: the model trained (validity checks; a failure makes the verdict invalid)."""
    c = task.n_classes
    uniform, bayes = math.log(c), bayes_loss_nats(batch)
    limit = uniform - 0.5 * (uniform - bayes)
    floor = context_blind_kl_floor(batch)
    for seed, run in runs.items():
        final = run.final_loss()
        outcome.require(
            f"{what} trained (seed {seed})",
            final <= limit,
            f"final training loss {final:.4f} nats; a uniform guess over {c} answers scores {uniform:.4f} and the "
            f"Bayes posterior {bayes:.4f}, so a trained model ends at or below {limit:.4f} (half the gap closed)",
        )
        kl = _cal(run, batch).kl
        outcome.require(
            f"{what} beats the context-blind floor (seed {seed})",
            kl < floor,
            f"held-out KL(Bayes || model) {kl:.4f} bits vs {floor:.4f} bits for the best predictor that ignores the "
            "context (the per-position average posterior)",
        )


_SUB, _CURVES = {}, {}


def _sub(batch):
    """The first 500 held-out sequences (one object per batch, so caches keyed on it hit)."""
    if id(batch) not in _SUB:
        _SUB[id(batch)] = (batch, batch.head(500))
    return _SUB[id(batch)][1]


def _curve(run, sub) -> dict[int, float]:
    """{kept step: held-out entropy MAE} over a run's kept weights."""
    key = (id(run), id(sub))
    if key not in _CURVES:
        _CURVES[key] = {s: calibration(predict(run.at_step(s), sub.tokens), sub).entropy_mae for s in sorted(run.kept)}
    return _CURVES[key]


@pytest.mark.parametrize(
    "task",
    [
        pytest.param(
            "bijection",
            marks=prediction(
                (
                    "Bijection at the paper's vocabulary (V=20): predictive entropy matches the Bayes entropy to <= "
                    "0.01 bits MAE on held-out sequences (paper: 1e-3 to 1e-4 bits at 6 x 6 x d192, 50k-150k steps)"
                ),
                metric="entropy_mae",
                expect=at_most(0.01),
            ),
        ),
        pytest.param(
            "hmm",
            marks=prediction(
                (
                    "HMM filtering: predictive entropy matches the forward-algorithm posterior's to <= 0.1 bits MAE "
                    "(paper: 7.5e-5 bits at K=20 with a 9-layer d256 model)"
                ),
                metric="entropy_mae",
                expect=at_most(0.1),
            ),
        ),
    ],
)
def test_calibration(lab, tunnels, tunnel_runs, tunnel_eval, task, outcome):
    """Does the transformer's predictive entropy match the exact Bayes posterior's?

    Train the transformer (lab GPT: learned positions, RMSNorm, GELU, tied embeddings) on
    fresh sequences every step: bijection with the next-token loss at key positions over
    the whole vocabulary (the authors' objective), HMM with soft cross-entropy against
    the forward-algorithm posterior at every observation (the paper's). On held-out
    sequences compute the model's predictive entropy at every scored position (bijection:
    the softmax restricted to the value tokens) and the Bayes entropy; entropy_mae = mean
    over sequences and positions of |H_model - H_Bayes| in bits. One model per seed. The
    curve: the same error at every kept checkpoint, on 500 of the held-out sequences.
    """
    batch = tunnel_eval[task]
    runs = tunnel_runs(task)
    _require_trained(outcome, runs, tunnels[task], batch)
    outcome.record("context_blind_floor", context_blind_floor(batch), unit="bits", deterministic=True)
    per = []
    for seed, run in runs.items():
        cal = _cal(run, batch)
        outcome.record("entropy_mae", cal.entropy_mae, seed=seed, unit="bits")
        outcome.record("mae_of_means", cal.mae_of_means, seed=seed, unit="bits")
        outcome.record("kl_bayes_model", cal.kl, seed=seed, unit="bits")
        outcome.record("final_train_loss", run.final_loss(), seed=seed, unit="nats")
        outcome.record("train_wall_s", run.wall_time_s, seed=seed, unit="s")
        if task == "bijection":
            outcome.record("leaked_mass", run.model.leaked_mass(batch.tokens[:500]).mean().item(), seed=seed)
        per.append(cal.per_position)
    xs = list(range(1, len(per[0]["bayes_entropy"]) + 1))
    lines = {
        "Bayes posterior": (xs, per[0]["bayes_entropy"]),
        "transformer (mean over seeds)": (xs, np.mean([p["model_entropy"] for p in per], axis=0)),
    }
    outcome.plot_lines(
        "entropy-by-position",
        lines,
        xlabel="scored position (key / observation)",
        ylabel="mean predictive entropy (bits)",
        title=f"{tunnels[task].name}: model vs Bayes",
    )
    outcome.plot_lines(
        "error-by-position",
        {"|H_model - H_Bayes|": (xs, np.mean([p["abs_error"] for p in per], axis=0))},
        xlabel="scored position",
        ylabel="mean abs entropy error (bits)",
        logy=True,
        title="per-position error",
    )
    # the calibration curve over training, from the kept checkpoints
    sub = _sub(batch)
    curves = {seed: _curve(run, sub) for seed, run in runs.items()}
    steps = sorted(next(iter(curves.values())))
    outcome.plot_lines(
        "calibration-over-training",
        {f"seed {s}": ([max(k, 1) for k in c], [max(v, 1e-5) for v in c.values()]) for s, c in curves.items()},
        xlabel="training step (0 shown at 1)",
        ylabel="held-out entropy MAE (bits)",
        logx=True,
        logy=True,
        hlines={"prediction": 0.1 if task == "hmm" else 0.01},
        title=f"{tunnels[task].name}: calibration over training",
    )
    if len(steps) >= 3:
        last, before = (np.mean([c[s] for c in curves.values()]) for s in (steps[-1], steps[-2]))
        trend = "still falling" if last < 0.9 * before else "flat"
        outcome.note(
            f"The calibration curve is {trend} at the end of training: mean held-out MAE {before:.4g} bits at step "
            f"{steps[-2]:,} and {last:.4g} at step {steps[-1]:,} (500 held-out sequences)."
            + (" Longer training would lower it further." if trend == "still falling" else "")
        )
    paper = {
        "bijection": "1e-3 to 1e-4 (abstract); about 0.007 (authors' README)",
        "hmm": "7.5e-5 (K=20)",
    }[task]
    _table(
        outcome,
        lab,
        tunnels,
        task,
        "paper-vs-lab",
        [
            {
                "quantity": "entropy MAE (bits)",
                "paper": paper,
                "lab (mean over seeds)": f"{np.mean([_cal(r, batch).entropy_mae for r in runs.values()]):.4g}",
            }
        ],
    )
    devices = sorted({r.device for r in runs.values()})
    outcome.note(
        f"Training took {np.mean([r.wall_time_s for r in runs.values()]):,.0f} s per seed on average "
        f"({', '.join(devices)}; train_wall_s per seed; a run loaded from the cache reports the time it took "
        "when it was trained)."
    )
    if task == "bijection":
        outcome.note(
            "mae uses the softmax over the V value tokens; leaked_mass is what the full-vocabulary softmax "
            "puts on other tokens. mae_of_means (|mean H_model - mean H_Bayes| per position, averaged) is "
            "the quantity the authors' evaluation code reports; entropy_mae is stricter."
        )


@pytest.mark.parametrize("task", ["bijection", "hmm"])
@check(
    "The paper-shaped MLP has within 1% of the transformer's parameters",
    metric="paper_mlp_param_ratio",
    expect=between(0.99, 1.01),
)
@check(
    "The information-matched prefix MLP has within 10% of the transformer's parameters",
    metric="prefix_mlp_param_ratio",
    expect=between(0.9, 1.1),
)
@prediction(
    (
        "Architectural separation, information-matched: the prefix MLP (sees the whole prefix, parameters within 10%)"
        " has an entropy MAE at least 10x the transformer's"
    ),
    metric="prefix_mlp_over_transformer",
    expect=at_least(10),
)
@prediction(
    (
        "Architectural separation as the paper measures it: the paper-shaped MLP (18-20 residual layers, parameters "
        "within 1%, each position seeing its own token and position) has an entropy MAE at least 100x the "
        "transformer's (the paper's 'orders of magnitude': 618x bijection, 5,467x HMM)"
    ),
    metric="paper_mlp_over_transformer",
    expect=at_least(100),
)
def test_mlp_separation(lab, tunnels, tunnel_runs, tunnel_eval, task, outcome):
    """Do attention-free MLPs of the transformer's size fall far short of its calibration?

    Transformer vs two attention-free MLPs on the same steps, batches and optimiser.

    The prefix MLP is information-matched: for each scored position it sees the
    embeddings of positions 0..p, concatenated (later positions zeroed), plus which
    position is asked, through residual MLP blocks; parameters within 10% of the
    transformer's. The paper-shaped MLP is deep and wide like the paper's (18-20 residual
    width x width layers, parameters within 1%) and given the context the way the authors'
    released MLP control is: each position sees its own token and its position (on the
    bijection it cannot beat the context-blind floor). Ratio = MLP entropy MAE /
    transformer MAE, per seed.
    """
    batch = tunnel_eval[task]
    t_runs = tunnel_runs(task)
    _require_trained(outcome, t_runs, tunnels[task], batch)
    m_runs, p_runs = tunnel_runs(task, "mlp"), tunnel_runs(task, "paper-mlp")
    for seed in lab.seeds:
        t, m, p = _cal(t_runs[seed], batch), _cal(m_runs[seed], batch), _cal(p_runs[seed], batch)
        outcome.record("prefix_mlp_over_transformer", m.entropy_mae / max(t.entropy_mae, 1e-12), seed=seed)
        outcome.record("paper_mlp_over_transformer", p.entropy_mae / max(t.entropy_mae, 1e-12), seed=seed)
        outcome.record("transformer_entropy_mae", t.entropy_mae, seed=seed, unit="bits")
        outcome.record("prefix_mlp_entropy_mae", m.entropy_mae, seed=seed, unit="bits")
        outcome.record("paper_mlp_entropy_mae", p.entropy_mae, seed=seed, unit="bits")
        outcome.record("prefix_mlp_train_wall_s", m_runs[seed].wall_time_s, seed=seed, unit="s")
        outcome.record("paper_mlp_train_wall_s", p_runs[seed].wall_time_s, seed=seed, unit="s")
    seed0 = lab.seeds[0]
    counts = {k: n_params(tunnel_runs(task, k)[seed0].model) for k in ("transformer", "mlp", "paper-mlp")}
    outcome.record("prefix_mlp_param_ratio", counts["mlp"] / counts["transformer"], deterministic=True)
    outcome.record("paper_mlp_param_ratio", counts["paper-mlp"] / counts["transformer"], deterministic=True)
    floor = outcome.record("context_blind_floor", context_blind_floor(batch), unit="bits", deterministic=True)
    paper_mlp = p_runs[seed0].model
    mlp = m_runs[seed0].model
    shapes = {
        "transformer": "{} layers x {} heads x d{}".format(*transformer_shape(lab.profile.bayes, task)),
        "mlp": f"prefix MLP: {len(mlp.body.blocks)} residual blocks, width {mlp.inp.out_features}",
        "paper-mlp": f"paper-shaped MLP: {len(paper_mlp.blocks)} residual layers, width {paper_mlp.wte.embedding_dim}",
    }
    mean = {
        k: np.mean([_cal(r, batch).entropy_mae for r in tunnel_runs(task, k).values()])
        for k in ("transformer", "mlp", "paper-mlp")
    }
    paper = {
        "bijection": ("0.003", "MLP 1.85 bits (618x)"),
        "hmm": ("7.5e-5", "MLP 0.409 bits (5,467x)"),
    }[task]
    _table(
        outcome,
        lab,
        tunnels,
        task,
        "separation",
        [
            {"model": shapes["transformer"], "parameters": f"{counts['transformer']:,}", "paper MAE (bits)": paper[0]}
            | {"lab MAE (bits, mean over seeds)": f"{mean['transformer']:.4g}", "lab ratio": "1"},
            {"model": shapes["paper-mlp"], "parameters": f"{counts['paper-mlp']:,}", "paper MAE (bits)": paper[1]}
            | {
                "lab MAE (bits, mean over seeds)": f"{mean['paper-mlp']:.4g}",
                "lab ratio": f"{mean['paper-mlp'] / max(mean['transformer'], 1e-12):.3g}x",
            },
            {"model": shapes["mlp"], "parameters": f"{counts['mlp']:,}", "paper MAE (bits)": "not in the paper"}
            | {
                "lab MAE (bits, mean over seeds)": f"{mean['mlp']:.4g}",
                "lab ratio": f"{mean['mlp'] / max(mean['transformer'], 1e-12):.3g}x",
            },
        ],
        caption=(
            "The paper's 'orders of magnitude' compares its transformer with its deep, wide MLP: the paper-shaped row."
        ),
    )
    outcome.note(
        f"The best predictor that ignores the context scores {floor:.3f} bits (the context-blind floor). The paper "
        "does not say how its MLP sees the context; the authors' released MLP control gives each position its own "
        "token and position only, and so does our paper-shaped MLP. The prefix MLP gets the whole prefix."
    )


@pytest.mark.parametrize("task", ["bijection", "hmm"])
@prediction(
    (
        "KL(Bayes || model) is smaller for the transformer than for the information-matched prefix MLP (mean over "
        "positions)"
    ),
    metric="kl_transformer",
    expect=less_than("kl_mlp"),
)
def test_kl_by_position(lab, tunnels, tunnel_runs, tunnel_eval, task, outcome):
    """Is the transformer closer to the Bayes posterior than the MLP, position by position?

    KL(p_Bayes || q_model) in bits at every scored position of the held-out sequences,
    for the transformer, the prefix MLP and the paper-shaped MLP of test_mlp_separation.
    (The reverse direction is infinite wherever a model gives mass to an eliminated value.)
    """
    batch = tunnel_eval[task]
    _require_trained(outcome, tunnel_runs(task), tunnels[task], batch)
    curves = {}
    for kind in ("transformer", "mlp", "paper-mlp"):
        per = []
        for seed, run in tunnel_runs(task, kind).items():
            cal = _cal(run, batch)
            outcome.record(f"kl_{kind.replace('-', '_')}", cal.kl, seed=seed, unit="bits")
            per.append(cal.per_position["kl"])
        mean = np.mean(per, axis=0)
        curves[kind] = (list(range(1, len(mean) + 1)), np.maximum(mean, 1e-6))
    outcome.plot_lines(
        "kl-by-position",
        curves,
        xlabel="scored position",
        ylabel="KL(Bayes || model), bits (mean over seeds)",
        logy=True,
        title=f"{task}: distance from the exact posterior",
    )


@pytest.mark.parametrize("task", ["hmm"])
@prediction(
    (
        "The FFN performs the posterior update: zero-ablating a layer's FFN raises the entropy MAE more than "
        "zero-ablating its attention (mean over layers)"
    ),
    metric="ffn_minus_attn_damage",
    expect=greater_than(0),
)
@prediction(
    (
        "A linear probe for the Bayes entropy gains more R^2 across the FFNs than across the attention sub-layers "
        "(summed over blocks)"
    ),
    metric="ffn_gain_minus_attn_gain",
    expect=greater_than(0),
)
def test_ffn_performs_update(lab, tunnels, tunnel_runs, tunnel_eval, task, outcome):
    """Which sub-layer does the posterior update, the attention or the FFN?

    (1) Ablation: on held-out sequences, the entropy MAE with one sub-layer's write
    (hook_attn_out or hook_mlp_out of one block) set to zero, one at a time; damage =
    MAE increase. ffn_minus_attn_damage = mean over layers of (FFN damage - attention
    damage). Mean-ablation (the write's average over the batch) is recorded too.
    (2) Probes: ridge regressions of the Bayes entropy on the stream at the scored
    positions, before block 0 and after every attention (hook_resid_mid) and FFN
    (hook_resid_post), fit on half the held-out positions and scored (R^2) on the other
    half. Gains across each sub-layer are summed over blocks. The HMM only: there the
    entropy is not a function of position, while on the bijection without replacement a
    probe could read it off the position embedding.
    """
    batch = tunnel_eval[task]
    runs = tunnel_runs(task)
    _require_trained(outcome, runs, tunnels[task], batch)
    dmg_rows, r2_curves = [], {}
    for seed, run in runs.items():
        z = ablation_mae(run.model, batch, mode="zero")
        mz = ablation_mae(run.model, batch, mode="mean")
        clean = z["clean"][0]
        attn, ffn = np.array(z["attn"]) - clean, np.array(z["mlp"]) - clean
        outcome.record("ffn_minus_attn_damage", float((ffn - attn).mean()), seed=seed, unit="bits")
        outcome.record(
            "mean_ablation_ffn_minus_attn",
            float((np.array(mz["mlp"]) - np.array(mz["attn"])).mean()),
            seed=seed,
            unit="bits",
        )
        dmg_rows.append((attn, ffn))
        r2 = entropy_probe(run.model, batch)
        n_layer = run.model.gpt.config.n_layer
        g_attn, g_ffn = update_gains(r2, n_layer)
        outcome.record("ffn_gain_minus_attn_gain", g_ffn - g_attn, seed=seed)
        outcome.record("r2_final", r2[f"blocks.{n_layer - 1}.hook_resid_post"], seed=seed)
        r2_curves[f"seed {seed}"] = (list(range(len(r2))), [r2[n] for n in stream_points(n_layer)])
    attn = np.mean([a for a, _ in dmg_rows], axis=0)
    ffn = np.mean([f for _, f in dmg_rows], axis=0)
    labels = [f"L{i} {p}" for i in range(len(attn)) for p in ("attn", "FFN")]
    outcome.plot(
        "ablation",
        bar_figure(
            labels,
            [v for pair in zip(attn, ffn) for v in pair],
            ylabel="entropy MAE increase (bits), mean over seeds",
            title=f"{task}: zero-ablating one sub-layer",
        ),
    )
    outcome.note(
        "Paper: states that the FFN performs the posterior update and attention routes; we found no test "
        "of it in its code, so both measurements here are our operationalisation (see the wind-tunnel guide)."
    )
    names = ["embed"] + [f"L{i} {p}" for i in range(len(attn)) for p in ("attn", "FFN")]
    fig = line_figure(
        r2_curves,
        xlabel="stream point (embed, then after each attention / FFN)",
        ylabel="probe R^2 for the Bayes entropy",
        title=f"{task}: where the entropy becomes readable",
    )
    fig.axes[0].set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    outcome.plot("probe-r2", fig)
    _table(
        outcome,
        lab,
        tunnels,
        task,
        "paper-vs-lab",
        [
            {
                "quantity": "FFN damage - attention damage (bits, mean over layers and seeds)",
                "paper": "claimed (FFN updates), no number",
                "lab": f"{float((ffn - attn).mean()):.4g}",
            }
        ],
    )


@prediction(
    (
        "Keys form a near-orthogonal basis: in layer 0, the keys of the value tokens (in context, averaged per token)"
        " have a lower mean |cos| than random directions in d_head dimensions (paper: 0.052 vs 0.082)"
    ),
    metric="key_cos_layer0",
    expect=less_than("random_baseline"),
)
@prediction(
    (
        "Keys form a near-orthogonal basis in every layer: the value tokens' keys, averaged over all layers and "
        "heads, have a lower mean |cos| than random directions in d_head dimensions"
    ),
    metric="key_cos_all_layers",
    expect=less_than("random_baseline"),
)
def test_key_orthogonality(lab, tunnels, tunnel_runs, tunnel_eval, outcome):
    """Do the value tokens' keys form a near-orthogonal basis?

    Key orthogonality (the paper's 'orthogonal hypothesis frame'), bijection.

    The tokens whose keys carry information are the value tokens: at a key position the
    model must find which values have been revealed, while which keys came before says
    nothing (without replacement). For each layer and head, the key every value token
    presents in context (hook_k at its positions in 500 held-out sequences, averaged over
    its occurrences); key_cos = mean |cosine| over the V(V-1)/2 pairs of distinct value
    tokens. The baseline is the paper's: random directions, E|cos| in d_head dimensions
    (exact). The authors' own measurement (token embedding through ln_1 and W_K, layer 0,
    no context) is recorded too.
    """
    task = tunnels["bijection"]
    batch = tunnel_eval["bijection"]
    runs = tunnel_runs("bijection")
    _require_trained(outcome, runs, task, batch)
    tokens = batch.tokens[:500]
    values = torch.arange(task.n_values, 2 * task.n_values)
    per_layer = []
    for seed, run in runs.items():
        geo = key_geometry(run.model, tokens, values).mean(1)  # (layers,) mean over heads
        per_layer.append(geo.numpy())
        outcome.record("key_cos_layer0", geo[0].item(), seed=seed)
        outcome.record("key_cos_all_layers", geo.mean().item(), seed=seed)
        for i, v in enumerate(geo.tolist()):
            outcome.record(f"key_cos_L{i}", v, seed=seed)
        outcome.record("key_cos_weights_layer0", key_cosines(run.model, values).mean().item(), seed=seed)
    d_head = run.model.gpt.config.head_dim
    baseline = outcome.record("random_baseline", random_cosine_baseline(d_head), deterministic=True)
    mean = np.mean(per_layer, axis=0)
    outcome.plot(
        "key-cosines-by-layer",
        bar_figure(
            [f"L{i}" for i in range(len(mean))],
            list(mean),
            errors=list(np.std(per_layer, axis=0)) if len(per_layer) > 1 else None,
            ylabel="mean |cos| between value tokens' keys (mean over heads and seeds)",
            title=f"bijection: key geometry (random directions in d_head={d_head}: {baseline:.3f})",
        ),
    )
    _table(
        outcome,
        lab,
        tunnels,
        "bijection",
        "paper-vs-lab",
        [
            {
                "quantity": "layer-0 mean |cos| between keys",
                "paper": "0.052 (random: 0.082)",
                "lab (mean over seeds)": f"{mean[0]:.3f} (random: {baseline:.3f})",
            },
            {
                "quantity": "all layers, mean |cos| between keys",
                "paper": "not reported",
                "lab (mean over seeds)": f"{mean.mean():.3f} (random: {baseline:.3f})",
            },
        ],
    )
    outcome.note(
        "Which tokens the paper's keys are taken from, and in which dimension its random baseline lives, are not "
        "stated in what we read; ours: the value tokens, in context, against E|cos| in d_head dimensions."
    )


@pytest.mark.parametrize("task", ["bijection", "hmm"])
@prediction(
    (
        "Query-key alignment sharpens with depth: attention entropy at the scored positions is lower in the last "
        "layer than in the first"
    ),
    metric="entropy_first_minus_last",
    expect=greater_than(0),
)
def test_attention_sharpens_with_depth(lab, tunnels, tunnel_runs, tunnel_eval, task, outcome):
    """Does attention focus more sharply in the deeper layers?

    Mean entropy (bits) of every head's attention at the scored positions of the held-out
    sequences, per layer. entropy_first_minus_last = layer 0's minus the last layer's.
    """
    batch = tunnel_eval[task]
    runs = tunnel_runs(task)
    _require_trained(outcome, runs, tunnels[task], batch)
    curves = {}
    for seed, run in runs.items():
        h = attention_entropy_by_layer(run.model, batch.tokens[:500])
        outcome.record("entropy_first_minus_last", h[0] - h[-1], seed=seed, unit="bits")
        curves[f"seed {seed}"] = (list(range(len(h))), h)
    outcome.plot_lines("entropy-by-layer", curves, xlabel="layer", ylabel="attention entropy (bits)", title=task)
    outcome.note(
        "Paper: query-key cosine heatmaps by layer (layer 0 diffuse, the last layer concentrated on the keys "
        "consistent with the context); its companion paper reports an 85-90% entropy reduction across layers."
    )


@pytest.mark.parametrize("task", ["bijection", "hmm"])
@prediction(
    (
        "Value manifold: the first principal component of the last layer's standardised attention values explains >= "
        "50% of their variance (paper: 84-90%)"
    ),
    metric="pc1_share",
    expect=at_least(0.5),
)
@prediction(
    (
        "The value manifold is parameterised by posterior entropy: |Spearman rho| between that first principal "
        "component and the Bayes entropy >= 0.7"
    ),
    metric="rho",
    expect=at_least(0.7),
)
def test_entropy_manifold(lab, tunnels, tunnel_runs, tunnel_eval, task, outcome):
    """Do the attention values lie on a low-dimensional manifold ordered by posterior entropy?

    The value manifold, measured as the authors' analysis does.

    The attention values of the last layer at the scored positions of 500 held-out
    sequences: each head's attention-weighted sum of value vectors, heads concatenated
    (before the output projection). Standardised per feature (the authors' StandardScaler),
    then PCA. pc1_share = PC1's share of the variance; rho = |Spearman correlation| of PC1
    with the Bayes entropy. rho_within_position repeats it within each position where the
    entropy varies (the HMM): on the bijection without replacement the entropy is a
    function of position, as in the paper's figure. The residual stream after the last
    block (centred, not standardised) is recorded beside it.
    """
    batch = tunnel_eval[task]
    runs = tunnel_runs(task)
    _require_trained(outcome, runs, tunnels[task], batch)
    sub = _sub(batch)
    shown = None
    for seed, run in runs.items():
        m = value_manifold(run.model, sub)
        outcome.record("pc1_share", m["pc1_share"], seed=seed)
        outcome.record("rho", m["rho"], seed=seed)
        if not math.isnan(m["rho_within_position"]):
            outcome.record("rho_within_position", m["rho_within_position"], seed=seed)
        r = manifold(run.model, sub)
        outcome.record("resid_pc1_share", r["pc1_share"], seed=seed)
        outcome.record("resid_rho", r["rho"], seed=seed)
        if shown is None:
            shown = m
    outcome.plot(
        "manifold",
        scatter_grid(
            [shown["points"]], [shown["entropy"]], titles=[f"{task}, seed {lab.seeds[0]}"], label="Bayes entropy (bits)"
        ),
        caption=(
            "Each point: one scored position of one sequence, on PC1 / PC2 of the last layer's standardised attention"
            " values."
        ),
    )
    pc1 = outcome.measurements["pc1_share"]
    rho = outcome.measurements["rho"]
    _table(
        outcome,
        lab,
        tunnels,
        task,
        "paper-vs-lab",
        [
            {
                "quantity": "PC1 share of variance",
                "paper": "84-90%",
                "lab (mean over seeds)": f"{np.mean(list(pc1.values())):.1%}",
            },
            {
                "quantity": "|rho(PC1, Bayes entropy)|",
                "paper": "strong (figures)",
                "lab (mean over seeds)": f"{np.mean(list(rho.values())):.3f}",
            },
        ],
    )


@prediction(
    (
        "Frame before precision: when the attention patterns have settled (drift to the final model <= 10% of the "
        "drift at initialisation), the entropy MAE is still at least 5x its final value"
    ),
    metric="mae_ratio_at_frame",
    expect=at_least(5),
)
def test_frame_precision(lab, tunnels, tunnel_runs, tunnel_eval, outcome):
    """Does the attention frame settle long before the posterior's precision does?

    Frame-precision dissociation over the whole training run (bijection).

    Weights kept at log-spaced steps from initialisation to the end of the run. At each,
    on 500 held-out sequences: attention drift = mean Jensen-Shannon divergence (nats)
    between its attention patterns and the final model's at the scored positions, over
    layers and heads; and the entropy MAE. The frame step is the first kept step whose
    drift is <= 10% of the drift at step 0; mae_ratio_at_frame = MAE there / final MAE.
    """
    batch = tunnel_eval["bijection"]
    runs = tunnel_runs("bijection")
    _require_trained(outcome, runs, tunnels["bijection"], batch)
    sub = _sub(batch)
    steps_total = train_settings(lab.profile.bayes, "bijection")["steps"]
    drift_lines, mae_lines, frames, ratios = {}, {}, [], []
    for seed, run in runs.items():
        steps = sorted(run.kept)
        drifts = {s: attention_drift(run.at_step(s), run.model, sub.tokens) for s in steps}
        maes = _curve(run, sub)
        f = frame_step(drifts)
        frames.append(f)
        ratios.append(maes[f] / max(maes[steps[-1]], 1e-12))
        outcome.record("frame_step", f, seed=seed)
        outcome.record("frame_fraction_of_run", f / steps_total, seed=seed)
        outcome.record("mae_ratio_at_frame", ratios[-1], seed=seed)
        outcome.record("mae_at_frame", maes[f], seed=seed, unit="bits")
        outcome.record("final_mae", maes[steps[-1]], seed=seed, unit="bits")
        xs = [max(s, 1) for s in steps]
        drift_lines[f"seed {seed}"] = (xs, [drifts[s] for s in steps])
        mae_lines[f"seed {seed}"] = (xs, [maes[s] for s in steps])
    outcome.plot_lines(
        "attention-drift",
        drift_lines,
        xlabel="training step (0 shown at 1)",
        ylabel="JS divergence to final attention (nats)",
        logx=True,
        title="the frame settles",
    )
    outcome.plot_lines(
        "precision",
        mae_lines,
        xlabel="training step (0 shown at 1)",
        ylabel="entropy MAE (bits)",
        logx=True,
        logy=True,
        title="precision keeps improving",
    )
    _table(
        outcome,
        lab,
        tunnels,
        "bijection",
        "paper-vs-lab",
        [
            {
                "quantity": "when the frame settles",
                "paper": "by step 2.5k of 50k (authors' note)",
                "lab (mean over seeds)": f"step {np.mean(frames):,.0f} of {steps_total:,}",
            },
            {
                "quantity": "MAE at the frame step / final MAE",
                "paper": "about 40x (0.03 bits, then falling)",
                "lab (mean over seeds)": f"{np.mean(ratios):.3g}x",
            },
        ],
    )
    outcome.note(
        "Paper: attention maps stabilise early while the value manifold keeps refining (figures at 100k vs "
        "150k steps); the authors' later note: the attention frame plateaus by step 2.5k while the MAE is "
        "0.03 bits and then falls about 40x more over 47k steps."
    )
