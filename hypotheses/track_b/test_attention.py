"""Track B: what attention looks at. Patterns captured at `blocks.{i}.attn.hook_pattern`
on the lab's baby GPT (char-level Shakespeare, one model per seed), on the real
pretrained MiniLM-L6 (a BERT encoder, bidirectional) and on Track A's base and
fine-tuned Llama-style models (Hugging Face format)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lab.finetune import load_finetuned
from lab.inspect import adapter, run_with_cache
from lab.inspect.attention import (
    entropy,
    induction_score,
    js_divergence,
    js_rows,
    key_share,
    mean_distance,
    offset_share,
    patterns,
    per_head,
    uniform_pattern,
)
from lab.inspect.properties import CHAR_CLASSES, char_class
from lab.inspect.residual import pca
from lab.inspect.similarity import class_variance_share
from lab.inspect.texts import repeated_random, windows
from lab.models import GPT
from lab.models.hf import load_hf_causal_lm
from lab.report import at_least, at_most, check, greater_than, less_than, prediction
from lab.report.plots import heatmap_grid, line_figure, scatter_grid
from lab.scaling import family_run, non_embedding_params

pytestmark = pytest.mark.track_b

MODELS = ("baby-gpt", "minilm")
SINK_MIN_QUERY = 16  # queries that see at least 17 keys: uniform attention gives <= 1/17 to one key


def _cases(request, which):
    """[(seed or None, model, [(B, T) inputs], tokens of the first input)] for one subject:
    the baby GPT once per seed on validation windows, or MiniLM (one model, seed None)
    on single lines of real text."""
    if which == "baby-gpt":
        runs = request.getfixturevalue("baby_runs")
        idx, _ = request.getfixturevalue("inspect_windows")
        tok = request.getfixturevalue("char_data").tokenizer
        labels = [repr(c)[1:-1] or " " for c in tok.decode(idx[0].tolist())]
        return [(seed, run.model, [idx], labels) for seed, run in runs.items()]
    model, tokenizer = request.getfixturevalue("minilm")
    texts = request.getfixturevalue("minilm_texts")
    ids = [tokenizer(t, return_tensors="pt")["input_ids"] for t in texts]
    return [(None, model, ids, tokenizer.convert_ids_to_tokens(ids[0][0]))]


def _pats(model, inputs):
    return [patterns(model, x) for x in inputs]


def _causal(model) -> bool:
    return adapter(model).causal


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(
            "baby-gpt",
            marks=prediction(
                "A char-level model grows a previous-token head: some head puts >= 50% of its attention on the "
                "previous character",
                metric="max_neighbour_share",
                expect=at_least(0.5),
            ),
        ),
        pytest.param(
            "minilm",
            marks=prediction(
                "MiniLM has a positional head (Clark et al. 2019 found them in BERT): some head puts >= 50% of its "
                "attention on the previous or next token",
                metric="max_neighbour_share",
                expect=at_least(0.5),
            ),
        ),
    ],
)
def test_heatmaps(request, model, outcome, require_subject_trained):
    """Does some head attend mostly to the adjacent token (a previous-token or positional head)?

    Capture every layer's pattern on real text: the baby GPT on evenly spaced windows of
    the tiny-Shakespeare validation split (its full context), MiniLM on lines of it.
    Plot the layers x heads grid for the first input. For each head, average the share
    of attention each query puts on the adjacent token (previous; also next for the
    bidirectional MiniLM) over queries and inputs; max_neighbour_share is the largest
    over heads. Baby GPT: one value per seed; MiniLM: one model and fixed lines, so one
    exact value. Heatmaps per layer and head of the first input are plotted.
    """
    for seed, m, inputs, labels in _cases(request, model):
        pats = _pats(m, inputs)
        prev = per_head(offset_share, pats, offset=-1)
        share = prev if _causal(m) else torch.maximum(prev, per_head(offset_share, pats, offset=1))
        outcome.record("max_neighbour_share", share.max().item(), seed=seed, deterministic=seed is None)
        if seed in (None, 0):
            first = pats[0][:, 0]  # (layers, heads, T, T) of the first input
            L, H = first.shape[:2]
            grid = [[first[layer, h].numpy() for h in range(H)] for layer in range(L)]
            outcome.plot(
                "heatmaps",
                heatmap_grid(
                    grid,
                    row_labels=[f"layer {layer}" for layer in range(L)],
                    col_labels=[f"head {h}" for h in range(H)],
                    title=f"{model}: attention on the first input",
                ),
                caption="Rows: queries, columns: keys; brighter = more attention.",
            )
            layer, h = divmod(int(share.argmax()), H)
            T = min(first.size(-1), 32)
            outcome.plot(
                "strongest-neighbour-head",
                heatmap_grid(
                    [[first[layer, h, :T, :T].numpy()]],
                    tick_labels=labels[:T],
                    title=f"layer {layer} head {h}",
                    cell=5.0,
                ),
                caption=f"The head with the largest neighbour share ({share[layer, h]:.2f}), first {T} tokens.",
            )
            outcome.table(
                "neighbour-share",
                [{"layer": i, **{f"head {j}": round(share[i, j].item(), 3) for j in range(H)}} for i in range(L)],
                caption="Mean attention on the adjacent token per head.",
            )
    require_subject_trained(model)


@pytest.mark.parametrize("model", MODELS)
@prediction(
    "Early layers attend locally, later layers more broadly: mean attended distance is larger in the last layer "
    "than in the first",
    metric="distance_last_minus_first",
    expect=greater_than(0),
)
def test_head_locality(request, model, outcome, require_subject_trained):
    """Do early layers attend locally and later layers more broadly?

    For each head, the attention-weighted distance |query - key| (in tokens) and the
    normalised entropy (1 = uniform over the visible keys, 0 = one key), averaged over
    queries >= 1 and inputs as in test_heatmaps. distance_last_minus_first = mean over
    heads of the last layer's distance minus the first layer's (MiniLM: one exact value).
    """
    rows = []
    for seed, m, inputs, _ in _cases(request, model):
        pats = _pats(m, inputs)
        dist = per_head(mean_distance, pats)
        ent = per_head(entropy, pats, causal=_causal(m))
        outcome.record(
            "distance_last_minus_first",
            (dist[-1].mean() - dist[0].mean()).item(),
            seed=seed,
            deterministic=seed is None,
        )
        for layer in range(dist.size(0)):
            rows.append(
                {
                    "seed": seed,
                    "layer": layer,
                    "distance": dist[layer].mean().item(),
                    "entropy": ent[layer].mean().item(),
                }
            )
        if seed in (None, 0):
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6.4, 4.0))
            L = dist.size(0)
            for layer in range(L):
                ax.scatter(
                    dist[layer].numpy(),
                    ent[layer].numpy(),
                    label=f"layer {layer}",
                    color=plt.cm.viridis(layer / max(L - 1, 1)),
                )
            ax.set_xlabel("mean attended distance (tokens)")
            ax.set_ylabel("normalised entropy")
            ax.set_title(f"{model}: one point per head")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            outcome.plot("heads", fig)
    seeds = sorted({r["seed"] for r in rows}, key=lambda s: -1 if s is None else s)
    layers = sorted({r["layer"] for r in rows})
    mean = {
        k: [np.mean([r[k] for r in rows if r["layer"] == layer]) for layer in layers] for k in ("distance", "entropy")
    }
    outcome.plot_lines(
        "distance-by-layer",
        {"mean attended distance": (layers, mean["distance"])},
        xlabel="layer",
        ylabel="tokens",
        title=f"{model}: mean over heads" + (" and seeds" if len(seeds) > 1 else ""),
    )
    outcome.table(
        "by-layer",
        [
            {"layer": layer, "distance": round(mean["distance"][i], 2), "entropy": round(mean["entropy"][i], 3)}
            for i, layer in enumerate(layers)
        ],
    )
    require_subject_trained(model)


@pytest.mark.parametrize("model", MODELS)
@prediction(
    "Attention sinks: most heads (>= 50%) put at least 20% of their attention on the first token",
    metric="sink_head_fraction",
    expect=at_least(0.5),
)
def test_attention_sink(request, model, outcome, require_subject_trained):
    """Do most heads sink their attention onto the first token?

    The share of attention on the first token (the baby GPT: whatever character a
    window starts with; MiniLM: [CLS]), per head, averaged over queries >= 16 for the
    baby GPT (uniform attention would give each key at most 1/17) and over all queries
    >= 1 for MiniLM. sink_head_fraction = fraction of heads whose share is >= 0.2: a
    count of heads, judged with an exact binomial interval over all heads (of every seed's
    model for the baby GPT). The plot follows the share layer by layer.
    """
    curves = {}
    for seed, m, inputs, _ in _cases(request, model):
        pats = _pats(m, inputs)
        min_q = SINK_MIN_QUERY if _causal(m) else 1
        sink = per_head(key_share, pats, key=0, min_query=min_q)
        outcome.record_fraction("sink_head_fraction", int((sink >= 0.2).sum()), sink.numel(), seed=seed)
        outcome.record("first_token_share", sink.mean().item(), seed=seed, deterministic=seed is None)
        curves[seed] = sink.mean(1).numpy()
        if not _causal(m):
            last = [p[..., -1].mean(dim=(1, 3)) for p in pats]  # [SEP], per (layer, head)
            outcome.record("sep_share", torch.stack(last).mean().item(), deterministic=True)
    layers = list(range(len(next(iter(curves.values())))))
    T = inputs[0].size(1)
    base = uniform_pattern(T, causal=_causal(m))
    uniform = key_share(base, 0, min_query=SINK_MIN_QUERY if _causal(m) else 1).item()
    lines = {("mean" if s is None else f"seed {s}"): (layers, c) for s, c in curves.items()}
    outcome.plot(
        "sink-by-layer",
        line_figure(
            lines,
            xlabel="layer",
            ylabel="attention on the first token",
            title=f"{model}: mean over heads",
            hlines={"uniform attention": uniform},
        ),
    )
    if not _causal(m):
        outcome.note("sep_share: the mean attention on the final [SEP] token, the other sink BERT is known for.")
    require_subject_trained(model)


@torch.no_grad()
def _induction_losses(model, seqs, period):
    """(first-repeat loss, second-repeat loss, per-position loss) of next-token prediction."""
    logits = adapter(model).forward(seqs).float()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), seqs[:, 1:].flatten(), reduction="none").view(seqs.size(0), -1)
    per_pos = loss.mean(0)
    # position t predicts token t+1: the first half's targets are random, the second's copies
    return per_pos[: period - 1].mean().item(), per_pos[period : 2 * period - 1].mean().item(), per_pos.numpy()


@pytest.mark.parametrize(
    "state",
    [
        pytest.param(
            "trained",
            marks=[
                prediction(
                    "A trained model has an induction head: some head scores >= 0.3 (attention from a repeated "
                    "token to the token after its first occurrence)",
                    metric="max_induction_score",
                    expect=at_least(0.3),
                ),
                prediction(
                    "In-context copying: loss on the second repeat is at most half the loss on the first",
                    metric="repeat_loss_ratio",
                    expect=at_most(0.5),
                ),
            ],
        ),
        pytest.param(
            "trained-text",
            marks=[
                prediction(
                    "On repeated real text (added after the random-sequence result): the repeat still helps, "
                    "second-repeat loss at most 0.9 of the first",
                    metric="repeat_loss_ratio",
                    expect=at_most(0.9),
                ),
            ],
        ),
        pytest.param(
            "untrained",
            marks=[
                check(
                    "Control: at initialisation no head is an induction head (max score < 0.1)",
                    metric="max_induction_score",
                    expect=at_most(0.1),
                ),
                check(
                    "Control: at initialisation the repeat does not help (loss ratio >= 0.9)",
                    metric="repeat_loss_ratio",
                    expect=at_least(0.9),
                ),
            ],
        ),
    ],
)
def test_induction_heads(lab, baby_runs, char_data, state, outcome, require_trained):
    """Does the trained baby GPT copy a repeated sequence in context, with an induction head?

    Draw induction_batches sequences of induction_period uniformly random characters and
    repeat each once (2 x period <= the context). Induction score of a head (Olsson et
    al. 2022) = mean attention from each second-repeat token to the token right after
    its first occurrence. repeat_loss_ratio = mean next-token loss on the second repeat /
    on the first (random, so about ln V). The trained baby GPT against the same
    architecture at initialisation (same seed), one model per seed. "trained-text" repeats
    the first induction_period characters of evenly spaced validation windows instead:
    in-distribution text, where the first half is already partly predictable.

    The second half differs from the first in more than the repeat: it starts at a seam
    (the end of a stretch joined to its own start), which the model reads as contiguous
    text, so the characters right after the seam are predicted from a context that makes
    no sense. Control: the same first halves, each followed by another row's first half
    (the same kind of seam, no repeat). splice_loss_ratio = the control's second-half loss
    / the first half's; repeat_over_splice = second-half loss with the repeat / without
    it, the copying gain net of the seam (1 = the repeat does not help at all). The
    untrained controls are checks, not findings: random weights cannot have learned to
    copy. The trained states are valid only if each seed's baby GPT trained.
    """
    s = lab.profile.inspect
    P = s.induction_period
    per_pos, per_pos_control, over_splice = [], [], []
    for seed, run in baby_runs.items():
        if state == "untrained":
            torch.manual_seed(seed)
            model = GPT(run.model_config).eval()
        else:
            model = run.model
        if state == "trained-text":
            first, _ = windows(char_data.val, s.induction_batches, s.induction_period)
            seqs = torch.cat([first, first], dim=1)
        else:
            seqs = repeated_random(s.induction_batches, s.induction_period, char_data.vocab_size, seed=1000 + seed)
        control = torch.cat([seqs[:, :P], seqs[:, :P].roll(1, dims=0)], dim=1)  # the same seam, no repeat
        pats = patterns(model, seqs)
        score = per_head(induction_score, pats, period=P)
        first, second, curve = _induction_losses(model, seqs, P)
        _, spliced, curve_control = _induction_losses(model, control, P)
        outcome.record("max_induction_score", score.max().item(), seed=seed)
        outcome.record("repeat_loss_ratio", second / first, seed=seed)
        outcome.record("first_repeat_loss", first, seed=seed, unit="nats")
        outcome.record("second_repeat_loss", second, seed=seed, unit="nats")
        outcome.record("splice_loss_ratio", spliced / first, seed=seed)
        over_splice.append(outcome.record("repeat_over_splice", second / spliced, seed=seed))
        per_pos.append(curve)
        per_pos_control.append(curve_control)
        if seed == lab.seeds[0]:
            L, H = score.shape
            outcome.table(
                "induction-scores",
                [
                    {"layer": layer, **{f"head {h}": round(score[layer, h].item(), 3) for h in range(H)}}
                    for layer in range(L)
                ],
                caption=f"Seed {seed}, {state}.",
            )
            layer, h = divmod(int(score.argmax()), H)
            outcome.plot(
                "top-head",
                heatmap_grid(
                    [[pats[layer, 0, h].numpy()]], title=f"layer {layer} head {h} on one repeated sequence", cell=4.0
                ),
                caption="An induction head shows as a stripe one above the diagonal offset by the period.",
            )
    if state != "untrained":
        require_trained(baby_runs, "each seed's baby GPT")
    xs = list(range(1, 2 * P))
    outcome.plot_lines(
        "loss-by-position",
        {
            f"{state}: repeated": (xs, np.mean(per_pos, axis=0)),
            f"{state}: control, another row after the seam": (xs, np.mean(per_pos_control, axis=0)),
        },
        xlabel="position of the predicted token",
        ylabel="loss (nats), mean over sequences and seeds",
        title=f"{state}: a sequence, then its repeat (seam at {P})",
        hlines={"ln V (uniform guess)": float(np.log(char_data.vocab_size))},
        caption="The control has the same first half and the same kind of seam, but no repeat.",
    )
    outcome.note(
        f"Second-half loss with the repeat / without it (after the same kind of seam): "
        f"{np.mean(over_splice):.3f}, mean over seeds (1 = the repeat does not help at all)."
        + (
            ""
            if state == "untrained"
            else " repeat_loss_ratio also carries the seam's own cost: the characters right after it are predicted "
            "from a context that joins the end of a stretch to its start, which the model reads as contiguous text."
        )
    )


@pytest.mark.parametrize("method", ["full", "lora"])
@prediction(
    "Fine-tuning changes attention most in the last layer (where Track A found the weights move most)",
    metric="last_minus_max_other",
    expect=greater_than(0),
)
def test_finetune_attention_shift(lab, ft_base, ft_runs, milton_data, method, outcome, require_finetuned):
    """Does fine-tuning change attention most in the last layer?

    Track A's base (Llama-style GQA, pretrained on Shakespeare, Hugging Face format) and
    its Milton fine-tunes (full, or LoRA rank 8 merged), one per fine-tuning seed. On
    n_windows windows of Milton's validation text, capture every layer's pattern in
    both models and take the Jensen-Shannon divergence between them query by query
    (nats; 0 = identical, ln 2 = disjoint), averaged per layer over heads, queries >= 1
    and windows. last_minus_max_other = the last layer's divergence minus the largest
    other layer's. Base vs fine-tuned: Track A's models. Valid only if the base learned
    Shakespeare and every fine-tuning run moved its Milton loss.
    """
    f = lab.profile.finetune
    idx, _ = windows(milton_data.val, lab.profile.inspect.n_windows, f.base.block_size)
    base = load_hf_causal_lm(ft_base)[0]
    base_pats = patterns(base, idx)
    runs = ft_runs(method="full") if method == "full" else ft_runs(method="lora", rank=8)
    curves = {}
    for seed, result in runs.items():
        tuned = load_finetuned(result, merge=True)
        js = torch.stack([js_divergence(base_pats[layer], p).mean() for layer, p in enumerate(patterns(tuned, idx))])
        outcome.record("last_minus_max_other", (js[-1] - js[:-1].max()).item(), seed=seed)
        outcome.record("mean_js", js.mean().item(), seed=seed, unit="nats")
        curves[f"seed {seed}"] = (list(range(len(js))), js.numpy())
    outcome.plot_lines(
        "js-by-layer",
        curves,
        xlabel="layer",
        ylabel="JS divergence base vs fine-tuned (nats)",
        title=f"{method} fine-tuning on Milton",
    )
    require_finetuned({method: runs})


@prediction(
    "In the first layer the value vectors cluster by character class: the class means explain at least {bound} of "
    "their variance",
    metric="class_share_first",
    expect=at_least(0.3),
)
@prediction(
    "Deeper value vectors hold less of the current character's class: the last layer's share is below the first's",
    metric="class_share_last",
    expect=less_than("class_share_first"),
)
def test_value_vectors_by_char_class(baby_runs, inspect_windows, char_data, outcome, require_trained):
    """What do the value vectors hold: do they cluster by the class of the current character?

    Run each seed's baby GPT on the validation windows and take every layer's value
    vectors (all heads concatenated, one row per token). Label each token by its
    character's class (vowel, other letter, space, newline, anything else) and measure
    how much of the vectors' variance the class means explain (eta squared: 1 when every
    vector sits on its class mean). Per seed, the first layer's share and the last
    layer's; the first seed's vectors projected on each layer's top two principal
    components, coloured by class. Valid only if every seed's model trained.
    """
    idx, _ = inspect_windows
    tok = char_data.tokenizer
    labels = torch.tensor([char_class(tok.decode(r.tolist())) for r in idx]).reshape(-1)
    for seed, run in baby_runs.items():
        n = run.model.config.n_layer
        names = [f"blocks.{i}.attn.hook_v" for i in range(n)]
        _, cache = run_with_cache(run.model, idx, names)
        values = [cache[name].reshape(labels.numel(), -1).float() for name in names]
        shares = [class_variance_share(v, labels) for v in values]
        outcome.record("class_share_first", shares[0], seed=seed)
        outcome.record("class_share_last", shares[-1], seed=seed)
        for layer, share in enumerate(shares):
            outcome.record(f"class_share_layer{layer}", share, seed=seed)
        if seed == min(baby_runs):
            pts = [pca(v).project(v).numpy() for v in values]
            outcome.plot(
                "value_pca",
                scatter_grid(
                    pts,
                    [labels.numpy()] * n,
                    titles=[f"layer {i}" for i in range(n)],
                    label="class: " + ", ".join(f"{i} {c}" for i, c in enumerate(CHAR_CLASSES)),
                ),
                caption="Value vectors on each layer's top two principal components, coloured by character class.",
            )
    require_trained(baby_runs, "each seed's baby GPT")


# Attention of queries this close to an edited character counts as near, this far as far.
NEAR_DISTANCES = range(1, 5)
FAR_DISTANCE = 16


@prediction(
    "Editing one character changes the attention of nearby queries (1-4 characters later) more than that of "
    "distant ones (16 or more characters later)",
    metric="near_js",
    expect=greater_than("far_js"),
)
def test_one_character_edit_changes_attention(baby_runs, inspect_windows, char_data, outcome, require_trained):
    """How does a systematic one-character change of the prompt change attention, by distance?

    Take the validation windows and make one systematic edit: the character a quarter of
    the way into each window becomes the next character of the vocabulary (id + 1,
    wrapping). Run each seed's baby GPT on the original and the edited windows and take,
    for every layer, head and query, the Jensen-Shannon divergence between the two
    attention rows (nats). The statistic is the mean divergence (over windows, heads and
    layers) of queries 1-4 characters after the edit against queries 16 or more after,
    paired by seed; the divergence by distance is drawn per layer. Valid only if every
    model trained and the queries before the edit attend exactly as before (causal
    masking: they cannot see it).
    """
    idx, _ = inspect_windows
    T, V = idx.shape[1], char_data.vocab_size
    at = T // 4
    edited = idx.clone()
    edited[:, at] = (edited[:, at] + 1) % V
    curves, before = {}, 0.0
    for seed, run in baby_runs.items():
        js = js_rows(patterns(run.model, idx), patterns(run.model, edited))  # (layers, B, H, T)
        before = max(before, float(js[..., :at].abs().max()))
        by_distance = js[..., at:].mean(dim=(1, 2))  # (layers, T - at): distance 0, 1, ...
        near = by_distance[:, list(NEAR_DISTANCES)].mean()
        far = by_distance[:, FAR_DISTANCE:].mean()
        outcome.record("near_js", float(near), seed=seed, unit="nats")
        outcome.record("far_js", float(far), seed=seed, unit="nats")
        if seed == min(baby_runs):
            for layer, row in enumerate(by_distance):
                curves[f"layer {layer}"] = (list(range(len(row))), row.numpy())
    outcome.plot_lines(
        "js_by_distance",
        curves,
        xlabel="query distance after the edited character",
        ylabel="JS divergence of the attention row (nats)",
        title=f"One-character edit at position {at}, seed {min(baby_runs)}",
    )
    outcome.require(
        "queries before the edit attend exactly as before",
        before < 1e-6,
        f"largest divergence of a query before position {at}: {before:.2e} nats",
    )
    require_trained(baby_runs, "each seed's baby GPT")


@prediction(
    "Previous-token heads appear at every size: in at least {bound} of the scaling family's models (every size, "
    "every seed) some head puts >= 50% of its attention on the previous character",
    metric="sizes_with_previous_token_head",
    expect=at_least(0.75),
)
def test_previous_token_head_across_sizes(lab, char_data, outcome, require_trained):
    """Does the previous-token head appear at every model size?

    The neighbour-share measurement of the heatmap hypothesis (for each head, the mean
    share of attention each query puts on the previous character) on every model of
    curriculum 13's scaling family (five or more lab GPTs of growing size at the
    family's largest data budget, one per seed), on validation windows of the family's
    context length. A model has a previous-token head when its largest share is at least
    0.5. The statistic is the share of models that have one (a count of sizes per seed,
    judged with an exact binomial interval over all seeds' models); each size's largest
    share is recorded and drawn against its non-embedding parameters. Valid only if
    every model trained.
    """
    s = lab.profile.scaling
    idx, _ = windows(char_data.val, lab.profile.inspect.n_windows, s.sizes[0].block_size)
    runs, curves = {}, {}
    for seed in lab.seeds:
        found = 0
        for scale in s.sizes:
            label = f"{scale.n_layer}L d{scale.n_embd}"
            run = family_run(lab, char_data, scale, seed)
            runs.setdefault(label, {})[seed] = run
            share = per_head(offset_share, patterns(run.model, idx), offset=-1).max().item()
            found += share >= 0.5
            outcome.record(f"max_previous_share_{label.replace(' ', '_')}", share, seed=seed)
            curves.setdefault(f"seed {seed}", ([], []))
            curves[f"seed {seed}"][0].append(non_embedding_params(run.model.config))
            curves[f"seed {seed}"][1].append(share)
        outcome.record_fraction("sizes_with_previous_token_head", found, len(s.sizes), seed=seed, unit="share of sizes")
    outcome.plot_lines(
        "previous_share_by_size",
        curves,
        xlabel="non-embedding parameters",
        ylabel="largest head's attention on the previous character",
        title="Previous-token heads across the scaling family",
        logx=True,
        hlines={"threshold": 0.5},
    )
    require_trained(runs, "every model of the family")
