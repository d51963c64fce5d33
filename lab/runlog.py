"""What a training run shows people while it runs and leaves beside its checkpoints:
progress (lab.progress: a tqdm bar, or lines under pytest), TensorBoard event files
(loss, validation loss, learning rate, gradient norm, tokens/s, a sample generation at
every evaluation) and `about.json` (what was trained on what, with the tokenizer, so the
playground can decode the run's text later).

The trainers (lab.train, lab.finetune, lab.windtunnel) each hold one RunLog:

    log = RunLog(out_dir / "tb", desc="GPT 4L/4H/128d on tinyshakespeare/char, seed 0", total=2000)
    log.step(step, loss=..., lr=..., grad_norm=..., tokens_per_s=...)
    log.eval(step, val_loss=..., train_loss=...)
    log.text("sample", text, step)
    log.close()

Logging never changes a run: it consumes no random numbers (samples use their own
generator: sample_text for a lab GPT, hf_sample_text for a Hugging Face model), adds no
device synchronisation inside a step (tensor values are kept and written at the next
flush: an evaluation or checkpoint, which synchronises anyway), and a failure to write
events is reported once and otherwise ignored. `tensorboard --logdir $LAB_CACHE` (or
`lab board`) shows every run, live while it trains.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from lab import progress as _progress

EVENTS_DIR = "tb"  # inside a run directory
ABOUT_FILE = "about.json"
TOKENIZER_FILE = "tokenizer.txt"  # beside about.json: the char alphabet (JSON) or the BPE ranks


def slug(text: str, limit: int = 80) -> str:
    """A folder name from a description: TensorBoard shows it as the run's name."""
    s = re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-.")
    return (s or "run")[:limit]


class RunLog:
    """Progress plus TensorBoard events for one training run.

    log_dir=None writes no events (progress only). `initial` is the step a resumed run
    starts from: TensorBoard then drops the events an interrupted attempt wrote after its
    last checkpoint (purge_step), so curves never zigzag.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike | None,
        *,
        desc: str,
        total: int,
        initial: int = 0,
        progress: bool = True,
        unit: str = "step",
        name: str | None = None,
    ):
        self.desc = desc
        self.task = _progress.task(desc, total, initial=initial, unit=unit, enabled=progress)
        self.log_dir = Path(log_dir) / slug(name or desc) if log_dir is not None else None
        self._writer = None
        self._failed = False
        self._pending: list[tuple[int, dict]] = []
        self._initial = initial
        self._last_flush = time.monotonic()
        if self.log_dir is not None:
            self._open()

    # -- events ----------------------------------------------------------------------

    def _open(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(
                str(self.log_dir), purge_step=self._initial if self._initial > 0 else None, flush_secs=5
            )
        except Exception as exc:  # tensorboard missing, unwritable folder: train on without events
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        if not self._failed:
            print(f"lab: TensorBoard events for {self.desc!r} are off: {exc}", file=sys.stderr)
        self._failed = True
        writer, self._writer = self._writer, None
        if writer is not None:
            try:  # its background thread and open file; a broken writer may fail again here
                writer.close()
            except Exception:
                pass

    def _write(self, fn) -> None:
        if self._writer is None:
            return
        try:
            fn(self._writer)
        except Exception as exc:
            self._fail(exc)

    def scalars(self, step: int, group: str, values: dict) -> None:
        """values {name: number or 0-d tensor} as `group/name` at `step`. Tensors are not
        read now (that would synchronise a device): they wait for the next flush()."""
        if self._writer is None:
            return
        numbers = {k: v for k, v in values.items() if isinstance(v, int | float)}
        tensors = {f"{group}/{k}": v for k, v in values.items() if v is not None and k not in numbers}
        if tensors:
            self._pending.append((step, tensors))
        if numbers:  # written now, so a run between evaluations still shows its loss live
            self._write(lambda w: [w.add_scalar(f"{group}/{k}", float(v), step) for k, v in numbers.items()])

    @property
    def writes_events(self) -> bool:
        return self._writer is not None

    def text(self, tag: str, text: str | None, step: int) -> None:
        if text is None:
            return
        # TensorBoard renders text as Markdown: keep a sample's line breaks and spacing
        self._write(lambda w: w.add_text(tag, "    " + text.replace("\n", "\n    "), step))

    def flush(self) -> None:
        """Write values held back as tensors and push everything to disk."""
        pending, self._pending = self._pending, []

        def write(w):
            for step, values in pending:
                for tag, v in values.items():
                    w.add_scalar(tag, float(v), step)
            w.flush()

        self._write(write)
        self._last_flush = time.monotonic()

    # -- what the trainers call ------------------------------------------------------------

    def step(self, step: int, **values) -> None:
        """After optimizer step `step`: loss, lr, grad_norm, tokens_per_s... to TensorBoard
        (train/...) and the progress display."""
        self.scalars(step, "train", values)
        shown = {k: values[k] for k in ("loss", "tokens_per_s") if isinstance(values.get(k), int | float)}
        self.task.update(step, **shown)

    def eval(self, step: int, **values) -> None:
        """After an evaluation at `step`: val_loss, train_loss... (eval/...); flushes."""
        self.scalars(step, "eval", values)
        self.flush()

    def close(self, ok: bool = True) -> None:
        self.task.close(ok)
        if self._writer is not None:
            self.flush()
            self._write(lambda w: w.close())
            self._writer = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def read_samples(run_dir: str | os.PathLike, tag: str = "sample") -> list[tuple[int, str]]:
    """[(step, text)] of the sample generations a run wrote to TensorBoard at its
    evaluations, read back with TensorBoard's own reader (one per step: the last written
    wins, as after a resume). Raises FileNotFoundError naming the folder when the run has
    no events (trained with events off, or by an older lab)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = Path(run_dir) / EVENTS_DIR
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(folders) != 1:
        raise FileNotFoundError(f"expected one TensorBoard run under {root}, found {len(folders)}")
    acc = EventAccumulator(str(folders[0]), size_guidance={"tensors": 0})
    acc.Reload()
    if f"{tag}/text_summary" not in acc.Tags().get("tensors", []):
        raise FileNotFoundError(f"no {tag!r} text events in {folders[0]}")
    out = {}
    for event in acc.Tensors(f"{tag}/text_summary"):
        text = event.tensor_proto.string_val[0].decode("utf-8")
        out[event.step] = "\n".join(line.removeprefix("    ") for line in text.split("\n"))
    return sorted(out.items())


# ---------------------------------------------------------------- lab GPT runs


def describe_run(model_config, train_config=None, data=None) -> str:
    """'GPT 4L/4H/128d ctx 64 (rope, rmsnorm) on tinyshakespeare/char, seed 0': what a run trains."""
    from lab.models import GPTConfig

    mc = model_config
    defaults = GPTConfig(vocab_size=mc.vocab_size, block_size=mc.block_size, n_layer=1, n_head=1, n_embd=1)
    parts = []
    for name in ("pos", "norm", "mlp", "norm_position"):
        if getattr(mc, name) != getattr(defaults, name):
            parts.append(str(getattr(mc, name)))
    if mc.n_kv_head not in (None, mc.n_head):
        parts.append("MQA" if mc.n_kv_head == 1 else f"GQA {mc.n_kv_head}kv")
    if mc.n_expert:
        parts.append(f"MoE {mc.n_expert}x top-{mc.moe_top_k}")
    if mc.sliding_window:
        parts.append(f"window {mc.sliding_window}")
    if not mc.residual:
        parts.append("no residual")
    text = f"GPT {mc.n_layer}L/{mc.n_head}H/{mc.n_embd}d ctx {mc.block_size}"
    if parts:
        text += f" ({', '.join(parts)})"
    if data is not None:
        corpus = getattr(data, "corpus", None)
        tok = getattr(getattr(data, "tokenizer", None), "name", None)
        if corpus or tok:
            text += f" on {corpus or '?'}/{tok or '?'}"
    if train_config is not None:
        if train_config.objective != "clm":
            text += f" [{train_config.objective}]"
        text += f", seed {train_config.seed}"
    return text


def save_tokenizer(tokenizer, folder: Path) -> dict:
    """What about.json records of a tokenizer; the char alphabet or BPE ranks go beside it."""
    spec = {"name": getattr(tokenizer, "name", None), "identity": getattr(tokenizer, "identity", None)}
    try:
        if hasattr(tokenizer, "to_json"):
            _atomic_text(folder / TOKENIZER_FILE, tokenizer.to_json())
            spec["file"] = TOKENIZER_FILE
        elif hasattr(tokenizer, "mergeable_ranks") and hasattr(tokenizer, "save"):
            tokenizer.save(folder / TOKENIZER_FILE)
            spec["file"] = TOKENIZER_FILE
    except OSError:
        pass
    return spec


def load_tokenizer(folder: str | os.PathLike, spec: dict | None):
    """The tokenizer save_tokenizer recorded (None when it cannot be rebuilt here)."""
    if not spec:
        return None
    folder = Path(folder)
    name = spec.get("name")
    try:
        if spec.get("file") and name == "char":
            from lab.tokenizers.char import CharTokenizer

            return CharTokenizer.from_json((folder / spec["file"]).read_text())
        if spec.get("file") and name == "bpe":
            from lab.tokenizers.bpe import BPETokenizer

            return BPETokenizer.load(folder / spec["file"])
        if name in ("cl100k", "gpt2"):
            from lab.tokenizers import get_tokenizer

            return get_tokenizer(name)
    except (OSError, ValueError, RuntimeError):
        return None
    return None


def write_about(out_dir: Path, *, desc: str, model_config, train_config, data, kind: str = "pretrain") -> None:
    """out_dir/about.json: the run's description, configs, data and tokenizer (for people
    and the playground; nothing reads it to train or resume)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tok = getattr(data, "tokenizer", None)
        about = {
            "kind": kind,
            "description": desc,
            "model_config": model_config.to_dict(),
            "train_config": train_config.to_dict(),
            "data": {
                "identity": getattr(data, "identity", None),
                "corpus": getattr(data, "corpus", None),
                "train_tokens": len(data.train),
                "val_tokens": len(data.val),
            },
            "tokenizer": save_tokenizer(tok, out_dir) if tok is not None else None,
            "started_at": time.time(),
        }
        _atomic_text(out_dir / ABOUT_FILE, json.dumps(about, indent=1, default=str))
    except OSError as exc:
        print(f"lab: could not write {out_dir / ABOUT_FILE}: {exc}", file=sys.stderr)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


SAMPLE_TOKENS = 96
SAMPLE_SEED = 0


def sample_text(model, data, *, temperature: float = 0.8, max_new_tokens: int = SAMPLE_TOKENS) -> str | None:
    """A short sample from a lab GPT for the TensorBoard text tab: continues the first
    tokens of the validation split, with its own seeded generator (the global random
    state is untouched). None where the model or data cannot make one."""
    generate = getattr(model, "generate", None)
    if generate is None:
        return None

    def continue_(prompt, n_new, gen):
        return generate(prompt, n_new, temperature=temperature, generator=gen)

    return _sample(model, data, model.config.block_size, continue_, max_new_tokens)


def hf_sample_text(
    model, data, *, block_size: int, temperature: float = 0.8, max_new_tokens: int = SAMPLE_TOKENS
) -> str | None:
    """sample_text for a Hugging Face causal LM (a peft one too) within `block_size` tokens.
    Its own sampling loop: transformers' generate() would draw from the global generator."""
    import torch

    def continue_(ids, n_new, gen):
        for _ in range(n_new):
            logits = model(input_ids=ids).logits[:, -1, :].float()
            probs = torch.softmax(logits / temperature, dim=-1)
            ids = torch.cat((ids, torch.multinomial(probs, 1, generator=gen)), dim=1)
        return ids

    return _sample(model, data, block_size, continue_, max_new_tokens)


def _sample(model, data, block: int, continue_, max_new_tokens: int) -> str | None:
    """'prompt⟶continuation': the first tokens of data.val continued by continue_(prompt,
    n_new, generator) in eval mode without gradients, the generator seeded SAMPLE_SEED."""
    import torch

    tok = getattr(data, "tokenizer", None)
    if tok is None:
        return None
    n_prompt = max(1, min(8, block // 4))
    n_new = min(max_new_tokens, block - n_prompt)
    if n_new < 1:
        return None
    device = next(model.parameters()).device
    prompt = torch.as_tensor(data.val[:n_prompt].astype("int64"), device=device).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        gen = torch.Generator(device=device).manual_seed(SAMPLE_SEED)
        with torch.no_grad():
            out = continue_(prompt, n_new, gen)
        head = tok.decode(out[0, :n_prompt].tolist())
        tail = tok.decode(out[0, n_prompt:].tolist())
        return f"{head}⟶{tail}"
    except Exception:  # a sample is a courtesy: never let it stop training
        return None
    finally:
        model.train(was_training)


class DeferredInterrupt:
    """Ctrl-C (SIGINT) during training, deferred to the end of the current step, so the
    trainer can write a consistent checkpoint before stopping; a second Ctrl-C interrupts
    at once. Only in the main thread (elsewhere signals cannot be handled): there it is
    inert and Ctrl-C behaves as usual.

        with DeferredInterrupt() as stop:
            for ...:
                one_step()
                if stop.requested:
                    save(); raise KeyboardInterrupt
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> DeferredInterrupt:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handle)
            except ValueError:  # not allowed here (e.g. an embedded interpreter)
                self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        print("\nlab: interrupted; stopping after this step (Ctrl-C again to stop at once)", file=sys.stderr)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._previous is not None:
            import signal

            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
