"""Track C: the residual stream. Its size through the layers, who writes into it,
how positions relate, what a linear probe can read from it, its principal directions,
and what each layer would already predict (logit lens). Hook points
`blocks.{i}.hook_resid_pre / hook_attn_out / hook_mlp_out / hook_resid_post` on the
lab's baby GPT (one model per seed) and on the pretrained MiniLM-L6."""

import numpy as np
import pytest
import torch

from lab.finetune import load_finetuned
from lab.inspect import adapter, run_with_cache
from lab.inspect.probes import control_labels, fit_probe
from lab.inspect.properties import stack_labels
from lab.inspect.residual import (
    ablation_losses,
    layer_features,
    logit_lens,
    monotone_fraction,
    pca,
    position_similarity,
    similarity_by_distance,
    stream_names,
    stream_norms,
    write_norms,
)
from lab.inspect.similarity import linear_cka
from lab.inspect.texts import windows
from lab.models.hf import load_hf_causal_lm
from lab.report import CONFIRMED, at_least, at_most, between, greater_than, prediction
from lab.report.intervals import point
from lab.report.plots import bar_figure, heatmap_grid, scatter_grid
from lab.scaling import family_run, non_embedding_params

pytestmark = pytest.mark.track_c

MODELS = ("baby-gpt", "minilm")


def _caches(request, which, names):
    """[(seed or None, n_layers, [cache per input])]: the baby GPT per seed on the validation
    windows (one batch), MiniLM on single lines of real text."""
    if which == "baby-gpt":
        idx, _ = request.getfixturevalue("inspect_windows")
        out = []
        for seed, run in request.getfixturevalue("baby_runs").items():
            _, cache = run_with_cache(run.model, idx, names(run.model.config.n_layer))
            out.append((seed, run.model.config.n_layer, [cache]))
        return out
    model, tokenizer = request.getfixturevalue("minilm")
    n = adapter(model).n_layers
    caches = [
        run_with_cache(model, tokenizer(t, return_tensors="pt")["input_ids"], names(n))[1]
        for t in request.getfixturevalue("minilm_texts")
    ]
    return [(None, n, caches)]


@pytest.mark.parametrize("model", MODELS)
@prediction(
    "The seed's prediction: the residual stream's norm grows through the layers (final / embedding > 1)",
    metric="growth_ratio",
    expect=greater_than(1),
)
@prediction("... and grows at every block", metric="monotone_fraction", expect=at_least(1.0))
def test_residual_norm_growth(request, model, outcome, require_subject_trained):
    """Does the residual stream's norm grow through the layers?

    Mean L2 norm of the per-token stream vector at block 0's input (the embedding) and
    after every block, over the validation windows (baby GPT, per seed) or lines of
    text (MiniLM). growth_ratio = last / first; monotone_fraction = share of blocks
    after which the norm is larger than before, a count of blocks judged with an exact
    binomial interval over all blocks (of every seed's model). MiniLM is post-norm
    (BERT): each block ends in a LayerNorm, so its stream is renormalised at every block.
    MiniLM is one model on fixed lines: its growth_ratio is one exact value.
    """
    lines = {}
    for seed, n, caches in _caches(request, model, stream_names):
        norms = np.mean([stream_norms(c, n) for c in caches], axis=0)
        outcome.record("growth_ratio", norms[-1] / norms[0], seed=seed, deterministic=seed is None)
        rising = round(monotone_fraction(list(norms)) * n)  # n blocks, n + 1 depths
        outcome.record_fraction("monotone_fraction", rising, n, seed=seed, unit="share of blocks")
        lines["MiniLM" if seed is None else f"seed {seed}"] = (list(range(n + 1)), norms)
    outcome.plot_lines(
        "norms",
        lines,
        xlabel="depth (0 = embedding, i = after block i)",
        ylabel="mean L2 norm",
        title=f"{model}: residual-stream norm",
    )
    require_subject_trained(model)


def _write_names(n):
    return [f"blocks.{i}.hook_{p}_out" for i in range(n) for p in ("attn", "mlp")]


@pytest.mark.parametrize("model", MODELS)
@prediction(
    "The seed's prediction: the FFN writes more into the stream than attention (mean write norm ratio FFN / "
    "attention > 1)",
    metric="write_ratio",
    expect=greater_than(1),
)
def test_ffn_writes_more(request, model, outcome, require_subject_trained):
    """Does the FFN write more into the residual stream than attention?

    Mean L2 norm of hook_mlp_out and hook_attn_out per token and layer (for MiniLM:
    each sub-layer's output projection, before the add & LayerNorm), over the same
    inputs as the norm test. write_ratio = mean over layers of the FFN's norm / mean
    of attention's (MiniLM: one exact value).
    """
    rows = []
    for seed, n, caches in _caches(request, model, _write_names):
        w = {k: np.mean([write_norms(c, n)[k] for c in caches], axis=0) for k in ("attn", "mlp")}
        outcome.record("write_ratio", w["mlp"].mean() / w["attn"].mean(), seed=seed, deterministic=seed is None)
        rows += [
            {"seed": seed, "layer": i, "attention": round(float(w["attn"][i]), 3), "FFN": round(float(w["mlp"][i]), 3)}
            for i in range(n)
        ]
    layers = sorted({r["layer"] for r in rows})
    mean = {k: [np.mean([r[k] for r in rows if r["layer"] == layer]) for layer in layers] for k in ("attention", "FFN")}
    outcome.plot_lines(
        "write-norms",
        {k: (layers, v) for k, v in mean.items()},
        xlabel="layer",
        ylabel="mean L2 norm of the write",
        title=f"{model}: what each sub-layer adds",
    )
    outcome.table("write-norms", rows)
    require_subject_trained(model)


@pytest.mark.parametrize("mode", ["zero", "mean"])
@prediction(
    "The seed's prediction: removing a layer's FFN costs more loss than removing its attention (mean over layers)",
    metric="ablation_gap",
    expect=greater_than(0),
)
def test_ffn_ablation_costs_more(baby_runs, inspect_windows, mode, outcome, require_trained):
    """Does removing a layer's FFN cost more loss than removing its attention?

    On the validation windows, the baby GPT's next-token loss with one sub-layer's write
    replaced, one layer at a time: by zeros ("zero"), or by its mean over these windows
    and positions ("mean", which keeps the write's constant part). ablation_gap = mean
    over layers of (loss without the FFN - loss without attention), in nats per char.
    """
    idx, targets = inspect_windows
    per_seed = []
    for seed, run in baby_runs.items():
        res = ablation_losses(run.model, idx, targets, mode=mode)
        clean = res["clean"][0]
        attn = np.array(res["attn"]) - clean
        mlp = np.array(res["mlp"]) - clean
        outcome.record("ablation_gap", float((mlp - attn).mean()), seed=seed, unit="nats")
        outcome.record("clean_loss", clean, seed=seed, unit="nats")
        per_seed.append((attn, mlp))
    attn = np.mean([a for a, _ in per_seed], axis=0)
    mlp = np.mean([m for _, m in per_seed], axis=0)
    require_trained(baby_runs, "each seed's baby GPT")
    labels = [f"L{i} {part}" for i in range(len(attn)) for part in ("attn", "FFN")]
    values = [v for pair in zip(attn, mlp) for v in pair]
    outcome.plot(
        "loss-increase",
        bar_figure(
            labels, values, ylabel="loss increase (nats/char), mean over seeds", title=f"{mode}-ablating one sub-layer"
        ),
    )


@prediction(
    "Neighbouring positions are more alike than distant ones, at every depth (cosine at distance 1 minus mean at "
    "distance >= T/2, minimum over depths > 0)",
    metric="near_minus_far_min",
    expect=greater_than(0),
)
@prediction(
    "The stream becomes more anisotropic with depth: mean cosine between positions is higher after the last block "
    "than at the embedding",
    metric="anisotropy_growth",
    expect=greater_than(0),
)
def test_position_similarity(baby_runs, inspect_windows, outcome, require_trained):
    """Are neighbouring positions more alike than distant ones, and does the stream grow anisotropic with depth?

    For each depth, the (T x T) cosine similarity between the stream at positions i and
    j of the same window, averaged over the validation windows; then its mean at each
    distance |i - j|. near_minus_far = similarity at distance 1 - mean similarity at
    distances >= T/2; anisotropy = mean similarity over all pairs i != j.
    """
    idx, _ = inspect_windows
    require_trained(baby_runs, "each seed's baby GPT")
    for seed, run in baby_runs.items():
        n = run.model.config.n_layer
        _, cache = run_with_cache(run.model, idx, stream_names(n))
        sims = [position_similarity(cache[name]) for name in stream_names(n)]
        T = sims[0].size(0)
        by_dist = [similarity_by_distance(s) for s in sims]
        near_far = [(d[1] - d[T // 2 :].mean()).item() for d in by_dist]
        off = [((s.sum() - s.diagonal().sum()) / (T * T - T)).item() for s in sims]
        outcome.record("near_minus_far_min", min(near_far), seed=seed)
        outcome.record("anisotropy_growth", off[-1] - off[0], seed=seed)
        if seed == min(baby_runs):
            outcome.plot(
                "similarity",
                heatmap_grid(
                    [[s.numpy() for s in sims]],
                    col_labels=[f"depth {d}" for d in range(n + 1)],
                    vmin=-1.0,
                    vmax=1.0,
                    cmap="RdBu_r",
                    cell=2.2,
                ),
                caption=f"Seed {seed}: cosine similarity between positions (rows/columns: positions).",
            )
            outcome.plot_lines(
                "by-distance",
                {f"depth {d}": (list(range(T)), by_dist[d].numpy()) for d in range(n + 1)},
                xlabel="distance |i - j| (tokens)",
                ylabel="mean cosine similarity",
                title=f"seed {seed}",
            )


PROPERTIES = {
    # property: (the depths, as depth / blocks, where it should be read best; selectivity expectation; why)
    "is_vowel": (
        at_most(0.0),
        between(-0.05, 0.05),
        "a property of the token itself: best read at the embedding, and a type-level control task is just as "
        "learnable (selectivity within 0.05 of 0)",
    ),
    "previous_char": (
        at_least(0.25),
        greater_than(0.1),
        "needs attention to the previous position: best read after block 1 or later, selective (> 0.1)",
    ),
    "line_position": (
        at_least(0.5),
        greater_than(0.1),
        "needs counting back to the newline: best read in the later half of the blocks, selective (> 0.1)",
    ),
    "word_end": (
        at_least(1.0),
        greater_than(0.05),
        "depends on the next character: best read at the last block, where the model predicts it, selective (> 0.05)",
    ),
}


def _probe_params():
    params = []
    for prop, (depth_exp, sel_exp, why) in PROPERTIES.items():
        params.append(
            pytest.param(
                prop,
                marks=[
                    prediction(
                        f"{prop}: {why} (best depth: the probe's best accuracy where "
                        f"{depth_exp.describe('depth / blocks')} beats its best at every other depth)",
                        metric="best_depth_margin",
                        expect=greater_than(0.0),
                    ),
                    prediction(f"{prop}: {why} (selectivity at the best depth)", metric="selectivity", expect=sel_exp),
                ],
            )
        )
    return params


@pytest.mark.parametrize("prop", _probe_params())
def test_linear_probes(lab, baby_runs, char_data, prop, outcome, require_trained):
    """At which depth does a linear probe best read each property, and does it beat a control task?

    2 x probe_windows validation windows (the model's context); even ones train the
    probe, odd ones test it; every position with a defined label is a sample. Labels
    (lab.inspect.properties): is_vowel (the current character), previous_char (its id),
    line_position (characters since the last newline in view, 4 bins) and word_end (the
    current character ends a word, which the next character decides). At each depth
    (0 = embedding, i = after block i) fit a multinomial logistic probe on the stream
    and, with the same features, on Hewitt & Liang's control task (each character type
    mapped to a random label with the property's label frequencies). selectivity =
    accuracy - control accuracy at the best depth; best_depth_fraction = best depth /
    number of blocks. The depth claim is judged on best_depth_margin = the best held-out
    accuracy at the depths where the property should be read best minus the best at the
    other depths (positive when the best depth is in the predicted range; 0 when the two
    tie, e.g. both perfect). Valid only if each seed's baby GPT trained and its probe at
    the best depth beats the majority label.
    """
    s = lab.profile.inspect
    T = lab.profile.pretraining.baby.block_size
    idx, _ = windows(char_data.val, 2 * s.probe_windows, T)
    tok = char_data.tokenizer
    texts = [tok.decode(row.tolist()) for row in idx]
    y_all = stack_labels(texts, tok.stoi)[prop]
    split = {"train": slice(0, None, 2), "test": slice(1, None, 2)}
    depth_range = PROPERTIES[prop][0]
    curves, above_majority = {}, {}
    for seed, run in baby_runs.items():
        n = run.model.config.n_layer
        _, cache = run_with_cache(run.model, idx, stream_names(n))
        ys = {k: y_all[sl].reshape(-1) for k, sl in split.items()}
        keep = {k: ys[k] >= 0 for k in split}
        ys = {k: ys[k][keep[k]] for k in split}
        types = {k: idx[sl].reshape(-1)[keep[k]] for k, sl in split.items()}
        ctrl_all = control_labels(
            torch.cat([types["train"], types["test"]]), torch.cat([ys["train"], ys["test"]]), seed=seed
        )
        ctrl = {"train": ctrl_all[: len(ys["train"])], "test": ctrl_all[len(ys["train"]) :]}
        acc, ctl = [], []
        for name in stream_names(n):
            feats = {k: cache[name][sl].reshape(-1, cache[name].size(-1))[keep[k]] for k, sl in split.items()}
            real = fit_probe(feats["train"], ys["train"], feats["test"], ys["test"], seed=seed)
            control = fit_probe(feats["train"], ctrl["train"], feats["test"], ctrl["test"], seed=seed)
            acc.append(real.accuracy)
            ctl.append(control.accuracy)
        best = int(np.argmax(acc))
        inside = [d for d in range(n + 1) if depth_range.judge(point(d / n)) == CONFIRMED]
        outside = [d for d in range(n + 1) if d not in inside]
        outcome.record("best_depth_margin", max(acc[d] for d in inside) - max(acc[d] for d in outside), seed=seed)
        outcome.record("best_depth_fraction", best / n, seed=seed)
        above_majority[f"seed {seed}"] = (acc[best], real.majority)
        outcome.record("selectivity", acc[best] - ctl[best], seed=seed)
        outcome.record("best_accuracy", acc[best], seed=seed)
        outcome.record("control_accuracy", ctl[best], seed=seed)
        outcome.record("majority_baseline", real.majority, seed=seed)
        curves[f"probe, seed {seed}"] = (list(range(n + 1)), acc)
        curves[f"control, seed {seed}"] = (list(range(n + 1)), ctl)
    outcome.note(
        "The control task is a function of the current character alone (65 types), so any layer that keeps "
        "the character's identity can learn it; control_accuracy near 1 makes selectivity a comparison "
        "with 'decode the current character', not with chance."
    )
    outcome.plot_lines(
        "accuracy-by-depth",
        curves,
        xlabel="depth (0 = embedding, i = after block i)",
        ylabel="held-out accuracy",
        title=f"probing {prop}",
        hlines={"majority label": real.majority},
    )
    require_trained(baby_runs, "each seed's baby GPT")
    outcome.require(
        "the probe beats the majority label at its best depth",
        all(a > m for a, m in above_majority.values()),
        "held-out accuracy vs majority-label accuracy: "
        + ", ".join(f"{k} {a:.3f} vs {m:.3f}" for k, (a, m) in above_majority.items()),
    )


@prediction(
    "A few directions dominate: at every depth the top 10% of principal components explain at least half the variance",
    metric="min_top10pct_explained",
    expect=at_least(0.5),
)
def test_pca(baby_runs, inspect_windows, char_data, outcome, require_trained):
    """Do a few principal directions dominate the residual stream at every depth?

    Principal components of the stream's per-token vectors over the validation windows
    at each depth. min_top10pct_explained = the smallest, over depths, of the variance
    fraction in the top 10% of components. Plots: the cumulative explained variance per
    depth, and each depth's tokens projected on its top two components, coloured by the
    characters since the last newline (where the model is in a line of verse).
    """
    idx, _ = inspect_windows
    tok = char_data.tokenizer
    line = stack_labels([tok.decode(r.tolist()) for r in idx], tok.stoi)["line_position"].reshape(-1)
    require_trained(baby_runs, "each seed's baby GPT")
    for seed, run in baby_runs.items():
        n, d = run.model.config.n_layer, run.model.config.n_embd
        _, cache = run_with_cache(run.model, idx, stream_names(n))
        feats = layer_features(cache, n)
        fits = [pca(f) for f in feats]
        k = max(1, d // 10)
        outcome.record("min_top10pct_explained", min(p.explained[:k].sum().item() for p in fits), seed=seed)
        outcome.record("dims_for_90pct_last", fits[-1].dims_for(0.9), seed=seed)
        if seed == min(baby_runs):
            curves = {f"depth {i}": (list(range(1, d + 1)), p.explained.cumsum(0).numpy()) for i, p in enumerate(fits)}
            outcome.plot_lines(
                "explained",
                curves,
                xlabel="principal components",
                ylabel="cumulative explained variance",
                title=f"seed {seed}",
                logx=True,
            )
            shown = line >= 0
            pts = [p.project(f)[shown].numpy() for p, f in zip(fits, feats)]
            outcome.plot(
                "projections",
                scatter_grid(
                    pts,
                    [line[shown].numpy()] * len(pts),
                    titles=[f"depth {i}" for i in range(n + 1)],
                    label="line-position bin (0: < 8 chars ... 3: >= 32)",
                ),
                caption="Each token's stream on its depth's top two principal components.",
            )


@prediction(
    "Logit lens: decoding each depth's stream with the final norm and unembedding, the loss falls at every block",
    metric="monotone_fraction",
    expect=at_least(1.0),
)
def test_logit_lens(baby_runs, inspect_windows, char_data, outcome, require_trained):
    """Read through the final norm and unembedding (logit lens), does each block lower the loss?

    Next-token loss on the validation windows when each depth's stream (0 = embedding,
    i = after block i) goes straight through the model's final LayerNorm and
    unembedding. The last depth is the model itself. monotone_fraction = share of
    blocks after which this loss is lower than before: a count of blocks per seed, judged
    with an exact binomial interval over all seeds' blocks.
    """
    idx, targets = inspect_windows
    curves = {}
    for seed, run in baby_runs.items():
        losses = logit_lens(run.model, idx, targets)
        falls = round(monotone_fraction(losses, increasing=False) * (len(losses) - 1))
        outcome.record_fraction("monotone_fraction", falls, len(losses) - 1, seed=seed, unit="share of blocks")
        outcome.record("embedding_loss", losses[0], seed=seed, unit="nats")
        outcome.record("final_loss", losses[-1], seed=seed, unit="nats")
        curves[f"seed {seed}"] = (list(range(len(losses))), losses)
    outcome.plot_lines(
        "lens",
        curves,
        xlabel="depth (0 = embedding, i = after block i)",
        ylabel="loss (nats/char)",
        title="logit lens",
        hlines={"ln V (uniform guess)": float(np.log(char_data.vocab_size))},
    )
    require_trained(baby_runs, "each seed's baby GPT")


@torch.no_grad()
def _hidden_by_layer(model, idx) -> list[torch.Tensor]:
    """Each decoder layer's output (Hugging Face hidden_states[1:]) as (tokens, d) rows."""
    states = model(idx, output_hidden_states=True).hidden_states[1:]
    return [h.reshape(-1, h.shape[-1]).float() for h in states]


@prediction(
    "Full fine-tuning moves the representations more than LoRA (rank 8): mean drift (1 - CKA with the base) over "
    "layers is larger",
    metric="full_drift",
    expect=greater_than("lora_drift"),
)
@prediction(
    "Drift grows with depth: under full fine-tuning the last layer drifts more than the first",
    metric="full_last_minus_first",
    expect=greater_than(0),
)
def test_representation_drift_after_finetuning(lab, ft_base, ft_runs, milton_data, outcome, require_finetuned):
    """How far does fine-tuning move each layer's representations, full against LoRA?

    Track A's base (Llama-style GQA, pretrained on Shakespeare, Hugging Face format) and
    its Milton fine-tunes: full, and LoRA rank 8 (merged), one per fine-tuning seed. On
    n_windows windows of Milton's validation text, take every decoder layer's output
    (every token a row) in the base and in each fine-tuned model and compare them with
    linear CKA (Kornblith et al. 2019: 1 = the same representation up to rotation and
    scale). Drift = 1 - CKA, per layer; the statistics are its mean over layers, full
    against LoRA paired by fine-tuning seed, and the last layer's drift minus the
    first's under full fine-tuning. Valid only if the base learned Shakespeare and every
    fine-tuning run moved its Milton loss.
    """
    f = lab.profile.finetune
    idx, _ = windows(milton_data.val, lab.profile.inspect.n_windows, f.base.block_size)
    base = _hidden_by_layer(load_hf_causal_lm(ft_base)[0].eval(), idx)
    runs = {"full": ft_runs(method="full"), "lora": ft_runs(method="lora", rank=8)}
    curves = {}
    for method, by_seed in runs.items():
        for seed, result in by_seed.items():
            tuned = _hidden_by_layer(load_finetuned(result, merge=True).eval(), idx)
            drift = [1 - linear_cka(b, t) for b, t in zip(base, tuned)]
            outcome.record(f"{method}_drift", float(np.mean(drift)), seed=seed)
            outcome.record(f"{method}_last_minus_first", drift[-1] - drift[0], seed=seed)
            curves[f"{method}, seed {seed}"] = (list(range(len(drift))), drift)
    outcome.plot_lines(
        "drift_by_layer",
        curves,
        xlabel="layer",
        ylabel="1 - linear CKA with the base",
        title="Representation drift after fine-tuning on Milton",
    )
    require_finetuned(runs)


@prediction(
    "The residual stream's norm grows through the layers at every size: final / embedding > 1 in at least {bound} "
    "of the scaling family's models (every size, every seed)",
    metric="sizes_growing",
    expect=at_least(0.75),
)
def test_residual_norm_growth_across_sizes(lab, char_data, outcome, require_trained):
    """Does the residual stream's norm growth hold across model sizes?

    Track C's norm-growth measurement (mean L2 norm of the per-token stream at the
    embedding and after every block, growth = last / first) on every model of the
    scaling family of curriculum 13 (five or more lab GPTs of growing size, GPT-2
    layout, at the family's largest data budget, one per seed), on validation windows
    of the family's context length. The statistic is the share of models whose stream
    grows (a count of sizes per seed, judged with an exact binomial interval over all
    seeds' models); each size's growth ratio is recorded and drawn against its
    non-embedding parameters. The baby GPT and MiniLM have their own pages (the
    norm-growth hypothesis). Valid only if every model trained.
    """
    s = lab.profile.scaling
    idx, _ = windows(char_data.val, lab.profile.inspect.n_windows, s.sizes[0].block_size)
    runs, curves = {}, {}
    for seed in lab.seeds:
        growing = 0
        for scale in s.sizes:
            label = f"{scale.n_layer}L d{scale.n_embd}"
            run = family_run(lab, char_data, scale, seed)
            runs.setdefault(label, {})[seed] = run
            n = run.model.config.n_layer
            _, cache = run_with_cache(run.model, idx, stream_names(n))
            norms = stream_norms(cache, n)
            ratio = norms[-1] / norms[0]
            growing += ratio > 1
            outcome.record(f"growth_ratio_{label.replace(' ', '_')}", ratio, seed=seed)
            curves.setdefault(f"seed {seed}", ([], []))
            curves[f"seed {seed}"][0].append(non_embedding_params(run.model.config))
            curves[f"seed {seed}"][1].append(ratio)
        outcome.record_fraction("sizes_growing", growing, len(s.sizes), seed=seed, unit="share of sizes")
    outcome.plot_lines(
        "growth_by_size",
        curves,
        xlabel="non-embedding parameters",
        ylabel="stream norm, last / embedding",
        title="Residual-stream growth across the scaling family",
        logx=True,
        hlines={"no growth": 1.0},
    )
    require_trained(runs, "every model of the family")
