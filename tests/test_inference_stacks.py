"""The inference-stack registry behind curriculum 15: names, greedy equality of every stack
that runs here, and stacks that cannot run saying why."""

import pytest
import torch

from lab.inference_stacks import (
    STACK_NAMES,
    Decoded,
    StackUnavailable,
    build_stack,
    build_stacks,
    check_stack_name,
    compare_greedy,
    decode_tokens_per_s,
    first_token_latency,
)
from lab.models import GPT, GPTConfig

pytest.importorskip("transformers")

# init_std well above 0.02 so a random model's greedy tokens vary (no runs of one token)
CFG = dict(
    vocab_size=23,
    block_size=40,
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    n_embd=32,
    pos="rope",
    norm="rmsnorm",
    mlp="swiglu",
    bias=False,
    init_std=0.3,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(**CFG)).eval()


@pytest.fixture(scope="module")
def stacks(model, tmp_path_factory):
    # the "eager" backend still captures the decode step with dynamo; inductor's code
    # generation would take tens of seconds on a small CPU
    return build_stacks(
        model, max_len=32, export_dir=tmp_path_factory.mktemp("stacks") / "export", compile_backend="eager"
    )


def prompts(n=3, T=6):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, CFG["vocab_size"], (1, T), generator=g) for _ in range(n)]


def test_registry_names_every_stack(stacks):
    assert STACK_NAMES == ("lab", "lab-compile", "hf-eager", "hf-static", "torch-compile", "vllm", "exllamav2")
    assert list(stacks) == list(STACK_NAMES)
    for name, st in stacks.items():
        assert st.name == name and st.description
        assert st.available == (st.reason is None)
    for name in ("lab", "lab-compile", "hf-eager", "hf-static", "torch-compile"):
        assert stacks[name].available, stacks[name].reason


@pytest.mark.parametrize("bad", ["tensorrt", "HF-eager", "", None])
def test_unknown_stack_name_lists_the_valid_ones(model, bad):
    with pytest.raises(ValueError, match="unknown inference stack") as err:
        check_stack_name(bad)
    assert all(n in str(err.value) for n in STACK_NAMES)
    with pytest.raises(ValueError, match="expected one of"):
        build_stack(model, bad)
    with pytest.raises(ValueError, match="unknown inference stack"):
        build_stacks(model, ["lab", bad])


def test_bad_arguments_are_value_errors(model, stacks):
    with pytest.raises(ValueError, match="lab GPT"):
        build_stacks(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="max_len"):
        build_stacks(model, ["lab"], max_len=CFG["block_size"] + 1)
    with pytest.raises(ValueError, match="repeat"):
        build_stacks(model, ["lab", "lab"])
    lab = stacks["lab"]
    with pytest.raises(ValueError, match="n_new"):
        lab.decode(prompts(1)[0], 0)
    with pytest.raises(ValueError, match="shape \\(1, T\\)"):
        lab.decode(torch.zeros(2, 4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="int64"):
        lab.decode(torch.zeros(1, 4), 3)
    with pytest.raises(ValueError, match="static cache"):
        stacks["hf-static"].decode(prompts(1, T=30)[0], 5)  # 35 > max_len 32
    with pytest.raises(ValueError, match=">= 2"):
        decode_tokens_per_s(lab, prompts(1)[0], 1)


def test_lab_stack_is_gpt_generate(model, stacks):
    p = prompts(1)[0]
    want = model.generate(p, 12, temperature=0.0)[0, p.shape[1] :].tolist()
    out = stacks["lab"].decode(p, 12)
    assert out.tokens == want
    assert len(set(want)) > 2  # the random model does not just repeat one token


def test_every_available_stack_decodes_the_same_greedy_tokens(stacks):
    available = {n: s for n, s in stacks.items() if s.available}
    result = compare_greedy(available, prompts(), 14)
    assert set(result) == set(available) - {"lab"}
    for name, cmp in result.items():
        assert cmp.sequences == 3
        assert cmp.identical == 3, f"{name} differs from lab at {cmp.first_mismatch}"
        assert cmp.agreement == 1.0 and cmp.first_mismatch == [None] * 3
        assert len(cmp.reference_tokens) == 3 and all(len(t) == 14 for t in cmp.reference_tokens)


@pytest.mark.parametrize("name", ["lab", "hf-eager", "hf-static", "torch-compile"])
def test_timings_one_per_token(stacks, name):
    st = stacks[name]
    out = st.decode(prompts(1)[0], 9)
    assert isinstance(out, Decoded) and len(out.tokens) == len(out.latencies) == 9
    assert all(t > 0 for t in out.latencies)
    assert out.first_token_s == out.latencies[0]
    assert out.total_s == pytest.approx(out.first_token_s + out.decode_s)
    assert out.tokens_per_s == pytest.approx(8 / out.decode_s)
    assert first_token_latency(st, prompts(1, T=20)[0]) > 0
    assert decode_tokens_per_s(st, prompts(1)[0], 4) > 0


def test_decoded_needs_two_tokens_for_throughput():
    with pytest.raises(ValueError, match="at least 2"):
        _ = Decoded([1], [0.1]).tokens_per_s


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine vLLM / ExLlamaV2 may really run")
@pytest.mark.parametrize("name", ["vllm", "exllamav2"])
def test_gpu_only_stacks_report_why_they_cannot_run(stacks, name):
    st = stacks[name]
    assert not st.available
    assert "CUDA" in st.reason or "not installed" in st.reason
    with pytest.raises(StackUnavailable, match=name):
        st.decode(prompts(1)[0], 3)


def test_unavailable_stacks_are_left_out_of_the_comparison(stacks):
    result = compare_greedy(
        {"lab": stacks["lab"], "vllm": stacks["vllm"], "hf-eager": stacks["hf-eager"]}, prompts(1), 4
    )
    assert ("vllm" in result) == stacks["vllm"].available and "hf-eager" in result
    with pytest.raises(ValueError, match="reference stack"):
        compare_greedy({"hf-eager": stacks["hf-eager"]}, prompts(1), 4)


def test_a_failing_compile_makes_the_stack_unavailable_with_the_error(model, tmp_path):
    st = build_stack(
        model, "torch-compile", max_len=32, export_dir=tmp_path / "export", compile_backend="no_such_backend"
    )
    assert not st.available
    assert st.reason.startswith("torch.compile failed here") and "no_such_backend" in st.reason
    with pytest.raises(StackUnavailable, match="no_such_backend"):
        st.decode(prompts(1)[0], 2)


def test_a_failing_lab_compile_makes_its_stack_unavailable_with_the_error(model):
    st = build_stack(model, "lab-compile", max_len=32, compile_backend="no_such_backend")
    assert not st.available and "torch.compile failed" in st.reason and "no_such_backend" in st.reason
    with pytest.raises(StackUnavailable, match="no_such_backend"):
        st.decode(prompts(1)[0], 2)
