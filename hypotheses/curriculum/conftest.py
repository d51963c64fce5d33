"""Models for the inference comparisons. Speed does not depend on what the weights
learned, so the decode benchmarks use freshly initialised Llama-style models (seed 0)
long enough for the longest decode, exported once to Hugging Face format."""

import pytest
import torch

from lab.models import GPT
from lab.paths import cache_dir
from lab.seeding import seed_everything


@pytest.fixture(scope="session")
def decode_model(lab, char_data):
    """decode_model(n_kv_head, sliding_window=None) -> a lab GPT in eval mode."""
    inf = lab.profile.inference
    models = {}

    def get(n_kv_head: int, sliding_window: int | None = None) -> GPT:
        key = (n_kv_head, sliding_window)
        if key not in models:
            block = inf.prompt_len + max(inf.decode_lengths)
            config = lab.llama_config(
                char_data,
                n_kv_head=n_kv_head,
                sliding_window=sliding_window,
                block_size=block,
            )
            seed_everything(0)
            models[key] = GPT(config).eval()
        return models[key]

    return get


@pytest.fixture(scope="session")
def hf_decode_model(decode_model):
    """hf_decode_model(n_kv_head) -> the same weights through transformers' LlamaForCausalLM."""
    pytest.importorskip("transformers")
    from lab.models.hf import export_hf, load_hf_causal_lm
    from lab.session import weights_hash

    models = {}

    def get(n_kv_head: int):
        if n_kv_head not in models:
            model = decode_model(n_kv_head)
            path = cache_dir("hf-exports") / weights_hash(model)
            if not (path / "config.json").exists():
                export_hf(model, path)
            models[n_kv_head] = load_hf_causal_lm(path)[0].eval()
        return models[n_kv_head]

    return get


@pytest.fixture(scope="session")
def decode_prompt(lab):
    inf = lab.profile.inference
    return torch.randint(0, 65, (1, inf.prompt_len), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def decode_length(lab):
    """decode_length(i) -> the profile's i-th decode length, skipping when it has fewer.
    decode_length("long") -> the third (1,000 tokens on the cpu profile), or the last."""
    lengths = lab.profile.inference.decode_lengths

    def get(index):
        if index == "long":
            return lengths[min(2, len(lengths) - 1)]
        if index >= len(lengths):
            pytest.skip(f"the {lab.profile.name} profile has only {len(lengths)} decode lengths")
        return lengths[index]

    return get


@pytest.fixture(scope="session")
def compiled_decoder(lab, decode_model):
    """compiled_decoder(n_kv_head) -> a CompiledDecoder over decode_model(n_kv_head), its
    cache sized for the longest decode, compiled once per session (backend: the profile's
    inference_stacks.compile_backend; "eager" on smoke only traces)."""
    from lab.models.compiled import CompiledDecoder

    inf, built = lab.profile.inference, {}

    def get(n_kv_head: int) -> CompiledDecoder:
        if n_kv_head not in built:
            max_len = inf.prompt_len + max(inf.decode_lengths)
            backend = lab.profile.inference_stacks.compile_backend
            built[n_kv_head] = CompiledDecoder(decode_model(n_kv_head), max_len=max_len, backend=backend).warm_up()
        return built[n_kv_head]

    return get


DECODE_IMPLEMENTATIONS = ("recompute", "lab_kv_cache", "lab_compiled", "hf_dynamic_cache")


@pytest.fixture(scope="session")
def decode_rounds(lab, decode_model, hf_decode_model, compiled_decoder, decode_prompt):
    """decode_rounds(n) -> {implementation: [(tokens, latencies) per round]}: greedy decodes
    of n tokens after the decode prompt on the MHA decode model by full recompute, the lab
    KV cache (eager), the lab's compiled single-token step and Hugging Face generate (dynamic
    cache, exported weights), interleaved within each of the profile's timing rounds (the
    order rotating by round so none always runs first), after one untimed 8-token call each.
    Measured once per n and shared, so every hypothesis comparing two of them takes its
    ratios from the same rounds."""
    from lab.decoding import hf_greedy, lab_greedy

    inf, done = lab.profile.inference, {}
    h = inf.llama.n_head

    def get(n: int) -> dict[str, list[tuple[list[int], list[float]]]]:
        if n not in done:
            model, hf, decoder = decode_model(h), hf_decode_model(h), compiled_decoder(h)
            run = {
                "recompute": lambda k: lab_greedy(model, decode_prompt, k, use_cache=False),
                "lab_kv_cache": lambda k: lab_greedy(model, decode_prompt, k, use_cache=True),
                "lab_compiled": lambda k: lab_greedy(model, decode_prompt, k, use_cache=True, decoder=decoder),
                "hf_dynamic_cache": lambda k: hf_greedy(hf, decode_prompt, k),
            }
            for f in run.values():
                f(8)
            names, rounds = list(run), {name: [] for name in run}
            for r in range(inf.timing_rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    rounds[name].append(run[name](n))
            done[n] = rounds
        return done[n]

    return get


@pytest.fixture(scope="session")
def memory_bound_model(lab, char_data):
    """memory_bound_model(n_kv_head) -> the wide random-init Llama-style model of the GQA
    memory-bound comparison (profile.inference.memory_bound), seed 0, in eval mode."""
    inf, models = lab.profile.inference, {}

    def get(n_kv_head: int) -> GPT:
        if n_kv_head not in models:
            mb = inf.memory_bound
            if mb.block_size < max(inf.context_lengths) + inf.context_new_tokens:
                raise ValueError(
                    f"memory_bound.block_size={mb.block_size} cannot hold the longest context "
                    f"{max(inf.context_lengths)} + {inf.context_new_tokens} new tokens"
                )
            seed_everything(0)
            models[n_kv_head] = GPT(lab.llama_config(char_data, mb, n_kv_head=n_kv_head)).eval()
        return models[n_kv_head]

    return get


@pytest.fixture(scope="session")
def hf_memory_bound_model(memory_bound_model):
    """hf_memory_bound_model(n_kv_head) -> memory_bound_model's weights as LlamaForCausalLM."""
    pytest.importorskip("transformers")
    from lab.models.hf import export_hf, load_hf_causal_lm
    from lab.session import weights_hash

    models = {}

    def get(n_kv_head: int):
        if n_kv_head not in models:
            model = memory_bound_model(n_kv_head)
            path = cache_dir("hf-exports") / weights_hash(model)
            if not (path / "config.json").exists():
                export_hf(model, path)
            models[n_kv_head] = load_hf_causal_lm(path)[0].eval()
        return models[n_kv_head]

    return get


@pytest.fixture(scope="session")
def ablation_runs(lab, char_data):
    """ablation_runs(train=None, **overrides) -> {seed: TrainResult}: the architecture
    ablations' shared small GPT (profile.architecture) with `overrides` changing one
    component, trained on char-level tiny Shakespeare with the shared budget for every
    seed. `train` overrides the training setup (objective, lr, steps...) the same way.
    A run that diverges is returned as its TrainingDivergedError."""
    from lab.train import TrainingDivergedError

    runs = {}

    def get(train: dict | None = None, **overrides):
        train = train or {}
        key = (tuple(sorted(overrides.items())), tuple(sorted(train.items())))
        if key not in runs:
            config = lab.arch_config(char_data, **overrides)
            by_seed = {}
            for seed in lab.seeds:
                try:
                    by_seed[seed] = lab.arch_pretrain(char_data, config, seed=seed, **train)
                except TrainingDivergedError as exc:
                    by_seed[seed] = exc
            runs[key] = by_seed
        return runs[key]

    return get
