"""The checkpoint playground (`lab playground`): browse the cached training runs, load a
checkpoint (or MiniLM, or a local Hugging Face causal LM), generate with temperature /
top-k / top-p and the KV cache on or off, and look inside while it does: the next-token
distribution at every step, attention heatmaps per layer and head, the logit lens.

The functions here are plain Python (usable and tested without a browser); `build_app()`
puts a Gradio page over them (the optional `playground` extra). Looking inside goes
through lab.inspect's hook points (`blocks.{i}.attn.hook_pattern`, the residual stream
`blocks.{i}.hook_resid_post` read through the model's own final norm and unembedding).
Every failure a person can cause (no runs yet, a model that does not load, a prompt
longer than the context) is a PlaygroundError whose message the page shows.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from lab.runlog import ABOUT_FILE, load_tokenizer

MINILM = "MiniLM-L6 (all-MiniLM-L6-v2, a pretrained BERT encoder)"
HF_PREFIX = "Hugging Face model: "
CHECKPOINTS = ("last", "best")


class PlaygroundError(ValueError):
    """Something the page shows as a message instead of a result."""


def cache_root() -> Path:
    return Path(os.environ.get("LAB_CACHE") or Path.home() / ".cache" / "llm-lab")


# ---------------------------------------------------------------- the cached runs


@dataclass
class RunInfo:
    """One cached pretraining run ($LAB_CACHE/runs/<key>)."""

    key: str
    path: Path
    description: str
    model_config: dict
    train_config: dict
    corpus: str
    status: str  # done, in progress, diverged
    checkpoints: dict[str, int] = field(default_factory=dict)  # name -> step
    evals: list[dict] = field(default_factory=list)
    tokenizer: dict | None = None

    @property
    def steps(self) -> int:
        return max(self.checkpoints.values(), default=0)

    @property
    def max_steps(self) -> int:
        return int(self.train_config.get("max_steps") or 0)

    @property
    def val_loss(self) -> float | None:
        return self.evals[-1]["val_loss"] if self.evals else None

    @property
    def best_val_loss(self) -> float | None:
        vals = [e["val_loss"] for e in self.evals if _finite(e.get("val_loss"))]
        return min(vals) if vals else None

    def choice(self, checkpoint: str) -> str:
        """The playground's label for one of this run's checkpoints."""
        return f"{self.key[:8]} {checkpoint} (step {self.checkpoints[checkpoint]}): {self.description}"


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def list_runs(root: str | os.PathLike | None = None) -> list[RunInfo]:
    """Every pretraining run in the cache that has a checkpoint, newest first. Reads only
    JSON (each checkpoint's config.json, the run's about.json): nothing is unpickled."""
    runs_dir = Path(root) / "runs" if root is not None else cache_root() / "runs"
    if not runs_dir.is_dir():
        return []
    out = []
    for path in runs_dir.iterdir():
        if not path.is_dir() or path.name.startswith("."):
            continue
        metas = {name: _read_json(path / name / "config.json") for name in CHECKPOINTS}
        metas = {k: v for k, v in metas.items() if v and isinstance(v.get("step"), int)}
        if not metas:
            continue
        about = _read_json(path / ABOUT_FILE) or {}
        newest = metas.get("last") or next(iter(metas.values()))
        state = (newest.get("extra") or {}).get("train_state") or {}
        mc = newest.get("model_config") or {}
        status = "done" if (path / "done").exists() else "in progress"
        if (path / "diverged.json").exists():
            status = "diverged"
        out.append(
            RunInfo(
                key=path.name,
                path=path,
                description=about.get("description") or _fallback_description(mc),
                model_config=mc,
                train_config=newest.get("train_config") or {},
                corpus=(about.get("data") or {}).get("corpus") or "?",
                status=status,
                checkpoints={k: v["step"] for k, v in metas.items()},
                evals=[e for e in state.get("evals", []) if isinstance(e, dict)],
                tokenizer=about.get("tokenizer"),
            )
        )
    out.sort(key=lambda r: max((r.path / c / "config.json").stat().st_mtime for c in r.checkpoints), reverse=True)
    return out


def _fallback_description(mc: dict) -> str:
    if not mc:
        return "GPT"
    return f"GPT {mc.get('n_layer')}L/{mc.get('n_head')}H/{mc.get('n_embd')}d ctx {mc.get('block_size')}"


def runs_table(runs: list[RunInfo]) -> list[list]:
    """Rows for the page's table: run, config, data, steps, val loss, best val, status."""
    rows = []
    for r in runs:
        val = f"{r.val_loss:.4f}" if _finite(r.val_loss) else "-"
        best = f"{r.best_val_loss:.4f}" if _finite(r.best_val_loss) else "-"
        steps = f"{r.steps}/{r.max_steps}" if r.max_steps else str(r.steps)
        rows.append([r.key[:8], r.description, r.corpus, steps, val, best, r.status])
    return rows


RUN_COLUMNS = ["run", "model", "data", "steps", "val loss", "best val", "status"]


def choices(runs: list[RunInfo]) -> list[str]:
    """Every checkpoint of every run, then MiniLM."""
    return [r.choice(c) for r in runs for c in CHECKPOINTS if c in r.checkpoints] + [MINILM]


def find_run(runs: list[RunInfo], choice: str) -> tuple[RunInfo, str] | None:
    for r in runs:
        for c in r.checkpoints:
            if r.choice(c) == choice:
                return r, c
    return None


# ---------------------------------------------------------------- loaded models


class Tokens:
    """encode / decode / one token's text, for lab and Hugging Face tokenizers alike."""

    def __init__(self, tokenizer, hf: bool = False):
        self.tok, self.hf = tokenizer, hf

    def encode(self, text: str) -> list[int]:
        if self.hf:
            return list(self.tok.encode(text, add_special_tokens=False))
        return list(self.tok.encode(text))

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        try:
            text = self.decode([token_id])
        except Exception:  # a byte-level token that is not text on its own
            return f"<{token_id}>"
        return text.replace("\n", "\\n").replace("\t", "\\t") or f"<{token_id}>"

    def quoted(self, token_id: int) -> str:
        """The piece in quotes for the page's tables (repr would escape its backslashes twice)."""
        return f"'{self.piece(token_id)}'"


@dataclass
class Loaded:
    """A model ready for the page: the lab GPT, a Hugging Face decoder, or an encoder."""

    name: str
    model: torch.nn.Module
    tokens: Tokens | None
    kind: str  # "lab", "hf", "encoder"
    context: int | None
    run: RunInfo | None = None

    @property
    def can_generate(self) -> bool:
        return self.kind in ("lab", "hf")


_LOADED: OrderedDict[str, Loaded] = OrderedDict()  # a few models stay in memory between clicks


def load(choice: str, runs: list[RunInfo] | None = None) -> Loaded:
    """Load the checkpoint, MiniLM or Hugging Face model a page choice names."""
    if not choice:
        raise PlaygroundError("choose a checkpoint first")
    if choice in _LOADED:
        _LOADED.move_to_end(choice)
        return _LOADED[choice]
    loaded = _load(choice, runs if runs is not None else list_runs())
    _LOADED[choice] = loaded
    while len(_LOADED) > 3:
        _LOADED.popitem(last=False)
    return loaded


def _load(choice: str, runs: list[RunInfo]) -> Loaded:
    if choice == MINILM:
        from lab.inspect.pretrained import load_minilm

        try:
            model, tok = load_minilm()
        except Exception as exc:
            raise PlaygroundError(f"MiniLM could not be loaded: {exc}") from None
        return Loaded(MINILM, model, Tokens(tok, hf=True), "encoder", model.config.max_position_embeddings)
    if choice.startswith(HF_PREFIX):
        return load_hf(choice[len(HF_PREFIX) :])
    found = find_run(runs, choice)
    if found is None:
        raise PlaygroundError(f"no cached checkpoint {choice!r} (the cache changed? press Refresh)")
    run, ckpt = found
    from lab.train.checkpoint import load_checkpoint

    try:
        model = load_checkpoint(run.path / ckpt).model.eval()
    except Exception as exc:
        raise PlaygroundError(f"checkpoint {run.path / ckpt} could not be loaded: {exc}") from None
    tok = load_tokenizer(run.path, run.tokenizer) or _guess_tokenizer(model.config.vocab_size)
    return Loaded(choice, model, Tokens(tok) if tok is not None else None, "lab", model.config.block_size, run)


def _guess_tokenizer(vocab_size: int):
    """Runs cached before about.json existed: the Tiny Shakespeare character tokenizer if the
    vocabulary size matches, else none."""
    from lab.data import load_corpus
    from lab.tokenizers import get_tokenizer

    tok = get_tokenizer("char", text=load_corpus("tinyshakespeare"))
    return tok if tok.vocab_size == vocab_size else None


def load_hf(path: str) -> Loaded:
    """A local Hugging Face causal LM directory (with its tokenizer)."""
    path = path.strip()
    if not path:
        raise PlaygroundError("type the folder of a Hugging Face model")
    from lab.models.hf import load_hf_causal_lm

    try:
        model, tok = load_hf_causal_lm(path)
    except Exception as exc:
        raise PlaygroundError(f"the Hugging Face model at {path!r} could not be loaded: {exc}") from None
    if tok is None:
        raise PlaygroundError(f"{path} has no tokenizer files: the playground needs one to turn text into tokens")
    context = getattr(model.config, "max_position_embeddings", None)
    return Loaded(HF_PREFIX + path, model.eval(), Tokens(tok, hf=True), "hf", context)


def encode_prompt(loaded: Loaded, prompt: str) -> torch.Tensor:
    """(1, T) token ids of the prompt, refused when it is empty, not in the tokenizer's
    alphabet, or longer than the model's context."""
    if loaded.tokens is None:
        raise PlaygroundError(f"{loaded.name} has no recorded tokenizer: its text cannot be encoded")
    if not prompt:
        raise PlaygroundError("type a prompt first")
    try:
        ids = loaded.tokens.encode(prompt)
    except (ValueError, KeyError) as exc:
        raise PlaygroundError(f"the prompt cannot be encoded: {exc}") from None
    if not ids:
        raise PlaygroundError("the prompt encodes to no tokens")
    if loaded.context is not None and len(ids) > loaded.context:
        raise PlaygroundError(
            f"the prompt is {len(ids)} tokens but this model's context is {loaded.context} tokens: shorten it"
        )
    device = next(loaded.model.parameters()).device
    return torch.tensor([ids], dtype=torch.long, device=device)


# ---------------------------------------------------------------- generation


@dataclass
class Generation:
    prompt: str
    text: str  # the continuation
    token_ids: list[int]
    steps: list[dict]  # per new token: chosen id, its probability, top alternatives
    seconds: float
    use_cache: bool
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


def _distribution(logits: torch.Tensor, temperature: float, top_k, top_p) -> torch.Tensor:
    """The probabilities the next token is sampled from (greedy: the softmax at T=1)."""
    from lab.models.sampling import filter_top_k, filter_top_p

    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
        if top_k is not None:
            logits = filter_top_k(logits, top_k)
        if top_p is not None:
            logits = filter_top_p(logits, top_p)
    return F.softmax(logits, dim=-1)


@torch.no_grad()
def generate(
    loaded: Loaded,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    seed: int = 0,
    top_n: int = 5,
) -> Generation:
    """Sample a continuation token by token, recording the distribution at every step."""
    from lab.models.sampling import check_sampling_args, sample_next

    if not loaded.can_generate:
        raise PlaygroundError(
            f"{loaded.name} is an encoder (no next-token head): it cannot generate; its attention and hook "
            "points are under 'Look inside'"
        )
    top_k = int(top_k) if top_k else None
    top_p = float(top_p) if top_p is not None and 0 < float(top_p) < 1 else None
    try:
        check_sampling_args(float(temperature), top_k, top_p)
    except ValueError as exc:
        raise PlaygroundError(str(exc)) from None
    idx = encode_prompt(loaded, prompt)
    n_new, note = int(max_new_tokens), ""
    if n_new < 1:
        raise PlaygroundError("ask for at least one new token")
    room = loaded.context - idx.shape[1] if loaded.context is not None else n_new
    window = loaded.kind == "lab" and loaded.model.config.sliding_window is not None and use_cache
    if n_new > room and not window:
        if room < 1:
            raise PlaygroundError(
                f"the prompt fills the whole context ({loaded.context} tokens): nothing can follow it"
            )
        note = f"only {room} new tokens fit in the context of {loaded.context} after the prompt"
        n_new = room
    gen = torch.Generator(device=idx.device).manual_seed(int(seed))
    step_logits = _lab_steps if loaded.kind == "lab" else _hf_steps
    out, steps = [], []
    t0 = time.perf_counter()
    feed = step_logits(loaded.model, idx, n_new, use_cache)
    logits = next(feed)
    for i in range(n_new):
        probs = _distribution(logits, float(temperature), top_k, top_p)
        token = sample_next(logits, temperature=float(temperature), top_k=top_k, top_p=top_p, generator=gen)
        tid = int(token[0])
        top = torch.topk(probs[0], min(top_n, probs.shape[-1]))
        steps.append(
            {
                "step": i + 1,
                "token": tid,
                "p": float(probs[0, tid]),
                "top": [(int(j), float(p)) for p, j in zip(top.values, top.indices)],
            }
        )
        out.append(tid)
        if i + 1 < n_new:
            logits = feed.send(token.view(1, 1))
    seconds = time.perf_counter() - t0
    text = loaded.tokens.decode(out)
    return Generation(prompt, text, out, steps, seconds, use_cache, note)


def _lab_steps(model, idx, n_new, use_cache):
    """Next-token logits (1, V), then one set per token sent in: through the KV cache, or
    by recomputing the whole sequence."""
    if use_cache:
        cache = model.new_cache(1, max_len=None if model.config.sliding_window else idx.shape[1] + n_new)
        logits = model.prefill(idx, cache)
        while True:
            token = yield logits
            logits = model.decode_one(token, cache)
    seq = idx
    while True:
        token = yield model(seq)[0][:, -1]
        seq = torch.cat([seq, token], dim=1)


def _hf_steps(model, idx, n_new, use_cache):
    if use_cache:
        out = model(input_ids=idx, use_cache=True)
        while True:
            token = yield out.logits[:, -1]
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
    seq = idx
    while True:
        token = yield model(input_ids=seq, use_cache=False).logits[:, -1]
        seq = torch.cat([seq, token], dim=1)


def distribution_table(loaded: Loaded, g: Generation) -> list[list]:
    """Rows: step, the token chosen, its probability, the most likely alternatives."""
    rows = []
    for s in g.steps:
        alts = ", ".join(f"{loaded.tokens.quoted(j)} {p:.2f}" for j, p in s["top"])
        rows.append([s["step"], loaded.tokens.quoted(s["token"]), round(s["p"], 4), alts])
    return rows


DIST_COLUMNS = ["step", "token", "p(token)", "most likely next tokens"]


# ---------------------------------------------------------------- looking inside


@torch.no_grad()
def attention(loaded: Loaded, prompt: str) -> tuple[list[str], torch.Tensor]:
    """(token labels, patterns (layers, heads, T, T)) of the prompt, read at the hook
    points blocks.{i}.attn.hook_pattern."""
    from lab.inspect import run_with_cache

    idx = encode_prompt(loaded, prompt)
    _, cache = run_with_cache(loaded.model, idx, "blocks.*.attn.hook_pattern")
    pats = cache.stack("attn.hook_pattern")[:, 0].float().cpu()  # (layers, heads, T, T)
    return [loaded.tokens.piece(int(t)) for t in idx[0]], pats


@torch.no_grad()
def logit_lens(loaded: Loaded, prompt: str, top_n: int = 1) -> tuple[list[str], list[str], list[list]]:
    """What each depth of the residual stream would predict next at each prompt position,
    decoded through the model's own final norm and unembedding (hook points
    blocks.0.hook_resid_pre, blocks.{i}.hook_resid_post). Returns (depth names, token
    labels, rows of 'token p' cells)."""
    from lab.inspect import run_with_cache
    from lab.inspect.hooks import HookError, adapter
    from lab.inspect.residual import stream_names

    if loaded.kind == "encoder":
        raise PlaygroundError(f"{loaded.name} is an encoder with no unembedding: the logit lens needs one")
    idx = encode_prompt(loaded, prompt)
    a = adapter(loaded.model)
    names = stream_names(a.n_layers)
    _, cache = run_with_cache(loaded.model, idx, names)
    labels = [loaded.tokens.piece(int(t)) for t in idx[0]]
    depths, rows = [], []
    for i, name in enumerate(names):
        try:
            probs = F.softmax(a.unembed(cache[name]).float()[0], dim=-1)  # (T, V)
        except HookError as exc:
            raise PlaygroundError(str(exc)) from None
        top = torch.topk(probs, top_n, dim=-1)
        depth = "embedding" if i == 0 else f"after block {i - 1}"
        depths.append(depth)
        cells = [
            " / ".join(f"{loaded.tokens.quoted(int(j))} {float(p):.2f}" for p, j in zip(vals, ids))
            for vals, ids in zip(top.values, top.indices)
        ]
        rows.append([depth, *cells])
    return depths, labels, rows


# ---------------------------------------------------------------- figures


def _tick(piece: str) -> str:
    """A token piece as matplotlib text: a $ would start mathtext."""
    return piece.replace("$", r"\$")


def heatmap_figure(labels: list[str], pattern: torch.Tensor, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    size = min(9.0, 2.5 + 0.28 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(pattern.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    ticks = range(n) if n <= 48 else range(0, n, max(1, n // 24))
    ax.set_xticks(list(ticks), [_tick(labels[i]) for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(list(ticks), [_tick(labels[i]) for i in ticks], fontsize=7)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    fig.tight_layout()
    return fig


def curve_figure(run: RunInfo | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    if run is not None and run.evals:
        steps = [e["step"] for e in run.evals]
        ax.plot(steps, [e.get("train_loss") for e in run.evals], marker="o", ms=3, label="train (eval batches)")
        ax.plot(steps, [e.get("val_loss") for e in run.evals], marker="o", ms=3, label="validation")
        at: dict[int, list[str]] = {}
        for name, step in run.checkpoints.items():
            at.setdefault(step, []).append(name)
        for step, names in at.items():  # last and best often share a step: one label, not two on top
            ax.axvline(step, color="grey", lw=0.8, ls=":")
            ax.annotate(", ".join(names), (step, ax.get_ylim()[1]), fontsize=7, ha="right", va="top", rotation=90)
        ax.legend(fontsize=8)
        ax.set_title(f"{run.key[:8]}: {run.description}", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no evaluation curve", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    fig.tight_layout()
    return fig


def distribution_figure(loaded: Loaded, g: Generation, step: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = g.steps[max(0, min(len(g.steps) - 1, int(step) - 1))]
    names = [_tick(loaded.tokens.piece(j)) for j, _ in s["top"]]
    probs = [p for _, p in s["top"]]
    fig, ax = plt.subplots(figsize=(6, 2.8))
    colors = ["tab:orange" if j == s["token"] else "tab:blue" for j, _ in s["top"]]
    ax.bar(range(len(names)), probs, color=colors)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("probability")
    ax.set_title(f"step {s['step']}: sampled {_tick(loaded.tokens.quoted(s['token']))}", fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the page


def _message(exc: Exception) -> str:
    if isinstance(exc, PlaygroundError):
        return f"**Error:** {exc}"
    return f"**Error:** {type(exc).__name__}: {exc}"


def _layout(gr, runs: list[RunInfo], empty: str) -> SimpleNamespace:
    """The page's components, top to bottom, created inside the caller's gr.Blocks."""
    status = gr.Markdown("" if runs else empty, elem_id="lab-status")
    with gr.Row():
        refresh = gr.Button("Refresh runs", elem_id="lab-refresh", scale=0)
    table = gr.Dataframe(
        value=runs_table(runs),
        headers=RUN_COLUMNS,
        interactive=False,
        label="Cached training runs ($LAB_CACHE/runs)",
        elem_id="lab-runs",
        max_height=260,
    )
    first = choices(runs)[0] if runs else None
    with gr.Row():
        pick = gr.Dropdown(choices(runs), value=None, label="Checkpoint", elem_id="lab-checkpoint", scale=3)
        hf_path = gr.Textbox(label="... or a local Hugging Face model folder", elem_id="lab-hf-path", scale=2)
        hf_load = gr.Button("Load folder", elem_id="lab-hf-load", scale=0)
    curve = gr.Plot(label="Loss curve of the chosen run", elem_id="lab-curve")

    gr.Markdown("## Generate")
    with gr.Row():
        prompt = gr.Textbox("ROMEO:", label="Prompt", elem_id="lab-prompt", scale=3)
        generate_btn = gr.Button("Generate", variant="primary", elem_id="lab-generate", scale=0)
    with gr.Row():
        max_new = gr.Slider(1, 256, 64, step=1, label="new tokens", elem_id="lab-max-new")
        temperature = gr.Slider(0, 2, 0.8, step=0.05, label="temperature (0: greedy)", elem_id="lab-temp")
        top_k = gr.Slider(0, 200, 0, step=1, label="top-k (0: off)", elem_id="lab-top-k")
        top_p = gr.Slider(0.05, 1, 1, step=0.05, label="top-p (1: off)", elem_id="lab-top-p")
    with gr.Row():
        use_cache = gr.Checkbox(True, label="KV cache", elem_id="lab-kv-cache")
        seed = gr.Number(0, label="seed", precision=0, elem_id="lab-seed")
    output = gr.Textbox(label="Continuation", lines=4, elem_id="lab-output")
    speed = gr.Markdown(elem_id="lab-speed")
    dist = gr.Dataframe(
        headers=DIST_COLUMNS,
        interactive=False,
        label="Next-token distribution per step",
        elem_id="lab-dist",
        max_height=260,
    )
    with gr.Row():
        dist_step = gr.Slider(1, 64, 1, step=1, label="step", elem_id="lab-dist-step", scale=1)
        dist_plot = gr.Plot(label="The distribution at that step", elem_id="lab-dist-plot", scale=3)
    gen_state = gr.State(None)

    gr.Markdown("## Look inside (the prompt)")
    with gr.Row():
        layer = gr.Slider(0, 1, 0, step=1, label="layer", elem_id="lab-layer")
        head = gr.Slider(0, 1, 0, step=1, label="head", elem_id="lab-head")
        attend_btn = gr.Button("Attention and logit lens", elem_id="lab-attend", scale=0)
    heatmap = gr.Plot(label="Attention (blocks.{layer}.attn.hook_pattern)", elem_id="lab-heatmap")
    lens = gr.Dataframe(
        interactive=False,
        label="Logit lens: top next token by depth and position",
        elem_id="lab-lens",
        max_height=320,
        wrap=True,
    )
    att_state = gr.State(None)

    return SimpleNamespace(
        status=status,
        refresh=refresh,
        table=table,
        pick=pick,
        hf_path=hf_path,
        hf_load=hf_load,
        curve=curve,
        prompt=prompt,
        generate_btn=generate_btn,
        max_new=max_new,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        use_cache=use_cache,
        seed=seed,
        output=output,
        speed=speed,
        dist=dist,
        dist_step=dist_step,
        dist_plot=dist_plot,
        gen_state=gen_state,
        layer=layer,
        head=head,
        heatmap=heatmap,
        lens=lens,
        att_state=att_state,
        attend_btn=attend_btn,
        first=first,
    )


def _handlers(gr, fresh_runs, empty: str) -> SimpleNamespace:
    """The page's event handlers: each returns the status line first, then its outputs."""

    def on_refresh():
        fresh = fresh_runs()
        msg = "" if fresh else empty
        return msg, runs_table(fresh), gr.update(choices=choices(fresh))

    def on_pick(choice):
        if not choice:
            return "", gr.skip(), gr.skip(), gr.skip()
        loaded = load(choice, fresh_runs())
        from lab.inspect.hooks import adapter

        a = adapter(loaded.model)
        note = f"Loaded **{loaded.name}** ({loaded.kind}, context {loaded.context or '?'} tokens)."
        if loaded.tokens is None:
            note += " It has no recorded tokenizer: text cannot be encoded."
        return (
            note,
            curve_figure(loaded.run),
            gr.update(maximum=max(1, a.n_layers - 1), value=0, interactive=a.n_layers > 1),
            gr.update(maximum=max(1, a.n_heads - 1), value=0, interactive=a.n_heads > 1),
        )

    def on_hf(path):
        choice = HF_PREFIX + (path or "").strip()
        load(choice)
        return "", gr.update(choices=[*choices(fresh_runs()), choice], value=choice)

    def on_generate(choice, text, n, temp, k, p, cache, s):
        loaded = load(choice, fresh_runs())
        g = generate(
            loaded,
            text,
            max_new_tokens=int(n),
            temperature=float(temp),
            top_k=int(k) or None,
            top_p=float(p),
            use_cache=bool(cache),
            seed=int(s or 0),
        )
        how = "with the KV cache" if g.use_cache else "recomputing the sequence every token"
        speed_text = f"{len(g.token_ids)} tokens in {g.seconds:.2f} s: **{g.tokens_per_s:,.1f} tokens/s** ({how})"
        msg = f"Note: {g.note}" if g.note else ""
        return (
            msg,
            g.text,
            speed_text,
            distribution_table(loaded, g),
            gr.update(maximum=max(2, len(g.steps)), value=1),
            distribution_figure(loaded, g, 1),
            g,
        )

    def on_step(choice, g, step):
        if g is None:
            return "", gr.skip()
        return "", distribution_figure(load(choice, fresh_runs()), g, step)

    def on_attend(choice, text, li, hi):
        loaded = load(choice, fresh_runs())
        labels, pats = attention(loaded, text)
        li, hi = min(int(li), pats.shape[0] - 1), min(int(hi), pats.shape[1] - 1)
        fig = heatmap_figure(labels, pats[li, hi], f"blocks.{li}.attn.hook_pattern, head {hi}")
        msg = ""
        try:
            _, cols, rows = logit_lens(loaded, text)
            lens_value = {"headers": ["depth", *[f"{i}:'{c}'" for i, c in enumerate(cols)]], "data": rows}
        except PlaygroundError as exc:
            lens_value, msg = None, _message(exc)
        return msg, fig, lens_value if lens_value is not None else gr.skip(), (labels, pats)

    def on_head(state, li, hi):
        if state is None:
            return "", gr.skip()
        labels, pats = state
        li, hi = min(int(li), pats.shape[0] - 1), min(int(hi), pats.shape[1] - 1)
        return "", heatmap_figure(labels, pats[li, hi], f"blocks.{li}.attn.hook_pattern, head {hi}")

    return SimpleNamespace(
        on_refresh=on_refresh,
        on_pick=on_pick,
        on_hf=on_hf,
        on_generate=on_generate,
        on_step=on_step,
        on_attend=on_attend,
        on_head=on_head,
    )


def build_app(root: str | os.PathLike | None = None):
    """The Gradio page over this module's functions (needs the `playground` extra)."""
    try:
        import gradio as gr
    except ImportError:
        raise PlaygroundError(
            "the playground needs Gradio: .venv/bin/pip install -e '.[playground]' -c constraints.txt"
        ) from None

    def fresh_runs() -> list[RunInfo]:
        return list_runs(root)

    runs = fresh_runs()
    intro = (
        "# LLM Lab playground\n"
        "Pick a cached training run's checkpoint (or MiniLM, or a local Hugging Face model), generate from it, "
        "and look inside: the next-token distribution at every step, attention per layer and head, the logit lens."
    )
    empty = (
        "No cached training runs yet: train one with `lab train` (or run `pytest -m pretraining`), then press "
        "**Refresh runs**. MiniLM and Hugging Face models work without any."
    )

    def with_status(fn, n_outputs):
        """Run a handler; on any error, show it in the status line and leave the rest as is."""

        def wrapped(*args):
            try:
                out = fn(*args)
            except Exception as exc:
                return (_message(exc), *([gr.skip()] * n_outputs))
            return out

        return wrapped

    theme = gr.themes.Default(
        font=("ui-sans-serif", "system-ui", "sans-serif"), font_mono=("ui-monospace", "monospace")
    )
    with gr.Blocks(title="LLM Lab playground", analytics_enabled=False) as app:
        app.lab_theme = theme
        gr.Markdown(intro)
        c = _layout(gr, runs, empty)
        h = _handlers(gr, fresh_runs, empty)
        c.refresh.click(with_status(h.on_refresh, 2), None, [c.status, c.table, c.pick])
        c.pick.change(with_status(h.on_pick, 3), [c.pick], [c.status, c.curve, c.layer, c.head])
        c.hf_load.click(with_status(h.on_hf, 1), [c.hf_path], [c.status, c.pick])
        c.generate_btn.click(
            with_status(h.on_generate, 6),
            [c.pick, c.prompt, c.max_new, c.temperature, c.top_k, c.top_p, c.use_cache, c.seed],
            [c.status, c.output, c.speed, c.dist, c.dist_step, c.dist_plot, c.gen_state],
        )
        c.dist_step.release(with_status(h.on_step, 1), [c.pick, c.gen_state, c.dist_step], [c.status, c.dist_plot])
        c.attend_btn.click(
            with_status(h.on_attend, 3), [c.pick, c.prompt, c.layer, c.head], [c.status, c.heatmap, c.lens, c.att_state]
        )
        c.layer.release(with_status(h.on_head, 1), [c.att_state, c.layer, c.head], [c.status, c.heatmap])
        c.head.release(with_status(h.on_head, 1), [c.att_state, c.layer, c.head], [c.status, c.heatmap])
        if c.first is not None:
            app.load(lambda: gr.update(value=c.first), None, [c.pick])
    return app


def launch(*, host: str = "127.0.0.1", port: int = 7860, root=None, block: bool = True):
    """Serve the playground on host:port (local only by default; no share link, no analytics)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(root)
    app.queue()
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=not block,
        quiet=not block,
        theme=app.lab_theme,
        footer_links=[],
        ssr_mode=False,
        pwa=False,
    )
    return app
