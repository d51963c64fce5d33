"""Inference stacks: the same weights decoded greedily through several engines, with
first-token latency and decode throughput measured the same way for each (curriculum 15).

A stack takes a prompt of shape (1, T) and a number of new tokens and returns the greedy
tokens and the latency of every new token (the first one includes the prefill):

| name | what decodes |
|---|---|
| `lab` | the lab `GPT.generate(temperature=0)` with its KV cache |
| `lab-compile` | `lab`, every token after the prefill through the compiled step of `lab.models.compiled` |
| `hf-eager` | transformers `generate` on the exported checkpoint, dynamic cache, no compile |
| `hf-static` | the same with `cache_implementation="static"` (compile disabled) |
| `torch-compile` | `hf-static`, its per-token forward under `torch.compile` (transformers' path; prefill eager) |
| `vllm` | vLLM's offline `LLM.generate` on the exported checkpoint (CUDA only) |
| `exllamav2` | ExLlamaV2 on the exported checkpoint, a plain greedy loop (CUDA only) |

The three Hugging Face stacks share one `LlamaForCausalLM` (or GPT-2 / Mistral) with
`attn_implementation="eager"` (plain matmul-softmax attention), so each step from one to
the next changes one thing: dynamic -> static cache -> compiled forward. The static
caches are sized once (`max_len`) for every request, as a server sizes them, so the
compiled decode step keeps one shape and compiles once.

A stack that cannot run here (not installed, no CUDA, a compile that fails) is still
built, with `available=False` and the reason; calling it raises `StackUnavailable`.
Speed is compared with pytest-benchmark in `hypotheses/curriculum/test_m15_inference_stacks.py`;
this module only measures.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lab.checks import bounded_int, check_int, describe
from lab.decoding import hf_greedy

STACK_NAMES = ("lab", "lab-compile", "hf-eager", "hf-static", "torch-compile", "vllm", "exllamav2")
HF_STACKS = ("hf-eager", "hf-static", "torch-compile")

DESCRIPTIONS = {
    "lab": "lab GPT.generate, greedy, with the lab KV cache",
    "lab-compile": "lab KV cache, decode step compiled with torch.compile (CompiledDecoder), prefill eager",
    "hf-eager": "transformers generate, eager attention, dynamic cache",
    "hf-static": "transformers generate, eager attention, static cache (no compile)",
    "torch-compile": "transformers generate, static cache, decode step compiled with torch.compile",
    "vllm": "vLLM offline LLM.generate (CUDA)",
    "exllamav2": "ExLlamaV2 greedy loop (CUDA)",
}

__all__ = [
    "DESCRIPTIONS", "Decoded", "GreedyComparison", "STACK_NAMES", "Stack", "StackUnavailable",
    "build_stack", "build_stacks", "check_stack_name", "compare_greedy", "decode_tokens_per_s",
    "first_token_latency", "random_prompt",
]  # fmt: skip


class StackUnavailable(RuntimeError):
    """A stack that cannot run here was asked to decode; the message says why."""


def check_stack_name(name) -> str:
    """`name` if it names a stack, else ValueError listing the valid names."""
    if name not in STACK_NAMES:
        raise ValueError(f"unknown inference stack {name!r}; expected one of {list(STACK_NAMES)}")
    return name


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class Decoded:
    """One greedy decode: the new tokens and each one's latency in seconds (the first
    latency runs from the call to the first new token, so it includes the prefill)."""

    tokens: list[int]
    latencies: list[float]

    @property
    def first_token_s(self) -> float:
        """Time to first token: prefill plus the first decoded token."""
        return self.latencies[0]

    @property
    def decode_s(self) -> float:
        """Time of every token after the first."""
        return sum(self.latencies[1:])

    @property
    def total_s(self) -> float:
        return sum(self.latencies)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens after the first over their time (prefill excluded)."""
        n = len(self.latencies) - 1
        if n < 1:
            raise ValueError("decode throughput needs at least 2 new tokens (the first one includes the prefill)")
        return n / self.decode_s


@dataclass
class Stack:
    """One inference stack over fixed weights. `decode(prompt, n_new)` -> Decoded."""

    name: str
    description: str
    reason: str | None = None  # why it cannot run here; None when it can
    device: str = "cpu"
    _run: Callable[[torch.Tensor, int], tuple[list[int], list[float]]] | None = field(default=None, repr=False)

    @property
    def available(self) -> bool:
        return self.reason is None

    def decode(self, prompt: torch.Tensor, n_new: int) -> Decoded:
        """Greedily decode `n_new` tokens after `prompt` (a (1, T) or (T,) int64 tensor)."""
        if not self.available:
            raise StackUnavailable(f"stack {self.name!r} is unavailable: {self.reason}")
        prompt = _check_prompt(prompt).to(self.device)
        check_int("n_new", n_new, 1)
        tokens, latencies = self._run(prompt, n_new)
        if len(tokens) != n_new or len(latencies) != n_new:
            raise RuntimeError(
                f"stack {self.name!r} returned {len(tokens)} tokens and {len(latencies)} latencies for n_new={n_new}"
            )
        return Decoded([int(t) for t in tokens], [float(x) for x in latencies])


def _check_prompt(prompt) -> torch.Tensor:
    if isinstance(prompt, torch.Tensor) and prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    if not isinstance(prompt, torch.Tensor) or prompt.dtype != torch.int64 or prompt.dim() != 2 or prompt.shape[0] != 1:
        raise ValueError(
            f"prompt must be an int64 tensor of shape (1, T) or (T,) (one sequence), got {describe(prompt)}"
        )
    if prompt.shape[1] < 1:
        raise ValueError("prompt must hold at least one token")
    return prompt


def random_prompt(length: int, vocab_size: int, *, seed: int = 0) -> torch.Tensor:
    """A (1, length) prompt of uniformly random token ids (speed does not depend on them)."""
    check_int("length", length, 1)
    check_int("vocab_size", vocab_size, 1)
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def first_token_latency(stack: Stack, prompt: torch.Tensor) -> float:
    """Seconds from the call to the first new token (prefill + one greedy token)."""
    return stack.decode(prompt, 1).first_token_s


def decode_tokens_per_s(stack: Stack, prompt: torch.Tensor, n_new: int) -> float:
    """Greedy decode throughput after the first token (prefill excluded), tokens/s."""
    check_int("n_new", n_new, 2)  # the first token includes the prefill
    return stack.decode(prompt, n_new).tokens_per_s


# ------------------------------------------------------------------ correctness


@dataclass(frozen=True)
class GreedyComparison:
    """One stack's greedy tokens against the reference stack's, over several prompts."""

    stack: str
    reference: str
    sequences: int
    identical: int
    first_mismatch: list[int | None]  # per prompt: index of the first differing new token
    reference_tokens: list[list[int]] = field(default_factory=list, repr=False)  # per prompt

    @property
    def agreement(self) -> float:
        """Share of prompts whose new tokens are identical to the reference's."""
        return self.identical / self.sequences


def compare_greedy(
    stacks: Mapping[str, Stack], prompts: Sequence[torch.Tensor], n_new: int, *, reference: str = "lab"
) -> dict[str, GreedyComparison]:
    """Decode every prompt greedily with each available stack and compare its tokens with
    the reference stack's. Unavailable stacks are left out (their reason is on the Stack)."""
    if reference not in stacks:
        raise ValueError(f"reference stack {reference!r} is not among the stacks given: {sorted(stacks)}")
    if not stacks[reference].available:
        raise StackUnavailable(f"reference stack {reference!r} is unavailable: {stacks[reference].reason}")
    if not prompts:
        raise ValueError("compare_greedy needs at least one prompt")
    ref = [stacks[reference].decode(p, n_new).tokens for p in prompts]
    out = {}
    for name, stack in stacks.items():
        if name == reference or not stack.available:
            continue
        firsts = []
        for want, p in zip(ref, prompts):
            got = stack.decode(p, n_new).tokens
            firsts.append(next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None))
        identical = sum(f is None for f in firsts)
        out[name] = GreedyComparison(name, reference, len(prompts), identical, firsts, ref)
    return out


# ------------------------------------------------------------------ building


def _sync(device) -> Callable[[], None]:
    if torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _lab_runner(model):
    device = model.lm_head.weight.device
    sync = _sync(device)

    @torch.no_grad()
    def run(prompt, n_new):
        stamps = []

        def hook(module, inputs, output):  # logits for the next token are ready
            sync()
            stamps.append(time.perf_counter())

        handle = model.lm_head.register_forward_hook(hook)
        try:
            t0 = time.perf_counter()
            out = model.generate(prompt, n_new, temperature=0.0, use_cache=True)
        finally:
            handle.remove()
        stamps = stamps[-n_new:]  # a long prompt is prefilled in chunks: the last one predicts
        return out[0, prompt.shape[1] :].tolist(), [b - a for a, b in zip([t0, *stamps[:-1]], stamps)]

    return run


def _lab_compile_runner(model, *, max_len: int, backend: str, mode: str | None):
    from lab.decoding import lab_greedy
    from lab.models.compiled import CompiledDecoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fallback is reported as the stack's reason
        decoder = CompiledDecoder(model, max_len=max_len, backend=backend, mode=mode).warm_up()
    if not decoder.compiled:
        raise StackUnavailable(decoder.fallback_reason)

    def run(prompt, n_new):
        return lab_greedy(model, prompt, n_new, use_cache=True, decoder=decoder)

    return run


def _hf_runner(hf, *, static: bool, max_len: int, compile_config=None):
    @torch.no_grad()
    def run(prompt, n_new):
        if static and prompt.shape[1] + n_new > max_len:
            raise ValueError(
                f"prompt {prompt.shape[1]} + n_new {n_new} tokens exceed the static cache's max_len={max_len}"
            )
        kwargs = {}
        if static:
            kwargs.update(cache_implementation="static", max_cache_len=max_len)
        if compile_config is not None:
            kwargs["compile_config"] = compile_config
        else:
            kwargs["disable_compile"] = True  # on CUDA a static cache would otherwise auto-compile
        return hf_greedy(hf, prompt, n_new, **kwargs)

    return run


def default_export_dir(model) -> Path:
    """Where the model's Hugging Face export lives: the same directory the decode
    hypotheses' `hf_decode_model` fixture uses (keyed by the weights' hash)."""
    from lab.paths import cache_dir
    from lab.session import weights_hash

    return cache_dir("hf-exports") / weights_hash(model)


def _export(model, export_dir) -> Path:
    from lab.models.hf import export_hf

    path = Path(export_dir) if export_dir is not None else default_export_dir(model)
    if not (path / "config.json").exists():
        export_hf(model, path)
    return path


def load_hf_twin(model, export_dir=None, *, attn_implementation: str = "eager"):
    """The lab model's weights as a transformers causal LM (from its export, written on
    demand), on the model's device, checked to give the same logits."""
    import transformers

    path = _export(model, export_dir)
    device = model.lm_head.weight.device
    hf = (
        transformers.AutoModelForCausalLM.from_pretrained(
            path,
            local_files_only=True,
            attn_implementation=attn_implementation,
            dtype=model.lm_head.weight.dtype,
        )
        .to(device)
        .eval()
    )
    probe = torch.arange(min(8, model.config.block_size), device=device).remainder(model.config.vocab_size)[None]
    with torch.no_grad():
        want = model(probe)[0]
        got = hf(probe).logits
    if not torch.allclose(want, got, atol=1e-3, rtol=1e-3):
        raise RuntimeError(
            f"the Hugging Face export at {path} does not reproduce the lab model's logits "
            f"(max difference {(want - got).abs().max().item():.3g}): not the same weights"
        )
    return hf, path


def _compile_runner(hf, *, max_len: int, backend: str, mode: str | None, warmup_prompt: torch.Tensor):
    from transformers import CompileConfig

    on_cuda = hf.device.type == "cuda"
    cfg = CompileConfig(backend=backend, mode=mode or ("reduce-overhead" if on_cuda else "default"))
    if not on_cuda:
        cfg._compile_all_devices = True  # transformers compiles the decode step only on GPUs unless told
    run = _hf_runner(hf, static=True, max_len=max_len, compile_config=cfg)
    run(warmup_prompt, 3)  # compile now (prefill eager, then compiled steps): errors surface here
    if getattr(hf, "_compiled_call", None) is None:
        raise StackUnavailable(
            f"transformers did not compile the forward on {hf.device.type} (no compiled call after a "
            "static-cache generate with a compile_config)"
        )
    return run


def _vllm_runner(model, export_dir, max_len: int):
    if not torch.cuda.is_available():
        raise StackUnavailable("vLLM needs a CUDA GPU and none is available here")
    if importlib.util.find_spec("vllm") is None:
        raise StackUnavailable("vllm is not installed (pip install vllm; it pins its own torch)")
    import vllm

    path = _export(model, export_dir)

    llm = vllm.LLM(
        model=str(path),
        skip_tokenizer_init=True,
        dtype=str(model.lm_head.weight.dtype).removeprefix("torch."),
        max_model_len=max_len,
        gpu_memory_utilization=0.3,
        seed=0,
    )

    def run(prompt, n_new):
        params = vllm.SamplingParams(
            temperature=0.0, max_tokens=n_new, min_tokens=n_new, ignore_eos=True, detokenize=False
        )
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt[0].tolist()}], params, use_tqdm=False)
        t1 = time.perf_counter()
        tokens = list(out[0].outputs[0].token_ids)
        m = getattr(out[0], "metrics", None)
        first = getattr(m, "first_token_time", None)
        arrival = getattr(m, "arrival_time", None)
        if first is not None and arrival is not None and n_new > 1:
            ttft = max(first - arrival, 0.0)
        else:  # this vLLM keeps no per-request timings: time a one-token request
            t2 = time.perf_counter()
            llm.generate(
                [{"prompt_token_ids": prompt[0].tolist()}],
                vllm.SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False),
                use_tqdm=False,
            )
            ttft = time.perf_counter() - t2 if n_new > 1 else t1 - t0
        rest = max(t1 - t0 - ttft, 0.0)
        return tokens, [ttft] + [rest / (n_new - 1)] * (n_new - 1)

    return run


def _exllamav2_runner(model, export_dir, max_len: int):
    if not torch.cuda.is_available():
        raise StackUnavailable("ExLlamaV2 needs a CUDA GPU and none is available here")
    if importlib.util.find_spec("exllamav2") is None:
        raise StackUnavailable("exllamav2 is not installed (pip install exllamav2)")
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

    path = _export(model, export_dir)
    config = ExLlamaV2Config(str(path))
    config.max_seq_len = max_len
    ex = ExLlamaV2(config)
    cache = ExLlamaV2Cache(ex, max_seq_len=max_len, lazy=True)
    ex.load_autosplit(cache)

    @torch.no_grad()
    def run(prompt, n_new):
        cache.current_seq_len = 0
        ids = prompt.cpu()
        tokens, stamps = [], []
        t0 = time.perf_counter()
        logits = ex.forward(ids, cache)
        for _ in range(n_new):
            nxt = logits[:, -1].argmax(-1, keepdim=True).cpu()
            tokens.append(int(nxt))
            stamps.append(time.perf_counter())
            if len(tokens) < n_new:
                logits = ex.forward(nxt, cache)
        return tokens, [b - a for a, b in zip([t0, *stamps[:-1]], stamps)]

    return run


def build_stacks(
    model,
    names: Sequence[str] = STACK_NAMES,
    *,
    max_len: int | None = None,
    export_dir=None,
    compile_backend: str = "inductor",
    compile_mode: str | None = None,
) -> dict[str, Stack]:
    """{name: Stack} over the weights of `model` (a lab GPT, used on its own device).

    The Hugging Face stacks share one model loaded from the export (`export_dir`, default
    the weights-hash directory under $LAB_CACHE/hf-exports, written if missing). `max_len`
    (default the model's block_size) sizes the static caches: prompt + new tokens must fit.
    `compile_backend` / `compile_mode` go to torch.compile (mode default: "reduce-overhead"
    on CUDA, "default" elsewhere; the lab-compile stack picks its own mode when None); the
    torch-compile and lab-compile stacks compile while they are built.
    A stack that cannot run is returned with `available=False` and the reason.
    """
    from lab.models import GPT

    if not isinstance(model, GPT):
        raise ValueError(f"build_stacks expects a lab GPT, got {type(model).__name__}")
    names = list(names)
    for n in names:
        check_stack_name(n)
    if len(set(names)) != len(names):
        raise ValueError(f"stack names repeat: {names}")
    block = model.config.block_size
    max_len = block if max_len is None else max_len
    bounded_int(2, block, "block_size").check("max_len", max_len)
    model.eval()
    device = str(model.lm_head.weight.device)
    stacks: dict[str, Stack] = {}
    hf = hf_error = None

    def hf_model():
        nonlocal hf, hf_error
        if hf is None and hf_error is None:
            try:
                hf, _ = load_hf_twin(model, export_dir)
            except Exception as exc:  # noqa: BLE001 - any failure makes these stacks unavailable
                hf_error = f"{type(exc).__name__}: {exc}"
        if hf_error is not None:
            raise StackUnavailable(f"the Hugging Face model could not be loaded: {hf_error}")
        return hf

    warm = torch.zeros(1, 2, dtype=torch.long, device=device)
    for name in names:
        try:
            if name == "lab":
                run = _lab_runner(model)
            elif name == "lab-compile":
                run = _lab_compile_runner(model, max_len=max_len, backend=compile_backend, mode=compile_mode)
            elif name in ("hf-eager", "hf-static"):
                if importlib.util.find_spec("transformers") is None:
                    raise StackUnavailable("transformers is not installed")
                run = _hf_runner(hf_model(), static=name == "hf-static", max_len=max_len)
            elif name == "torch-compile":
                if importlib.util.find_spec("transformers") is None:
                    raise StackUnavailable("transformers is not installed")
                m = hf_model()
                try:
                    run = _compile_runner(
                        m, max_len=max_len, backend=compile_backend, mode=compile_mode, warmup_prompt=warm
                    )
                except StackUnavailable:
                    raise
                except Exception as exc:  # noqa: BLE001 - compilers fail in many ways
                    raise StackUnavailable(f"torch.compile failed here: {type(exc).__name__}: {exc}") from exc
            elif name == "vllm":
                try:
                    run = _vllm_runner(model, export_dir, max_len)
                except StackUnavailable:
                    raise
                except Exception as exc:  # noqa: BLE001
                    raise StackUnavailable(f"vLLM could not load the export: {type(exc).__name__}: {exc}") from exc
            else:  # exllamav2
                try:
                    run = _exllamav2_runner(model, export_dir, max_len)
                except StackUnavailable:
                    raise
                except Exception as exc:  # noqa: BLE001
                    raise StackUnavailable(f"ExLlamaV2 could not load the export: {type(exc).__name__}: {exc}") from exc
            stacks[name] = Stack(name, DESCRIPTIONS[name], None, device, run)
        except StackUnavailable as exc:
            stacks[name] = Stack(name, DESCRIPTIONS[name], str(exc), device, None)
    return stacks


def build_stack(model, name: str, **kwargs) -> Stack:
    """One stack (see build_stacks for the options)."""
    return build_stacks(model, [check_stack_name(name)], **kwargs)[name]
