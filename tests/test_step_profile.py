"""lab.step_profile: per-operator self time grouped by kind of work, and the small text
helpers the baby GPT's samples hypothesis uses (lab.diversity.words/known_words,
lab.runlog.read_samples)."""

import pytest
import torch

from lab.diversity import known_words, words
from lab.step_profile import OTHER, kind_of, profile_step


@pytest.mark.parametrize(
    "op, kind",
    [
        ("aten::mm", "matmul (GEMM)"),
        ("aten::addmm", "matmul (GEMM)"),
        ("aten::bmm", "matmul (GEMM)"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention kernel"),
        ("aten::_foreach_mul_", "optimizer update"),
        ("Optimizer.step#AdamW.step", "optimizer update"),
        ("aten::native_layer_norm_backward", "normalisation"),
        ("aten::gelu_backward", "activation"),
        ("aten::_log_softmax", "softmax and loss"),
        ("aten::embedding_dense_backward", "embedding"),
        ("aten::add_", "elementwise and copies"),
        ("aten::copy_", "elementwise and copies"),
        ("autograd::engine::evaluate_function: MmBackward0", OTHER),
        ("aten::topk", OTHER),  # no fragment catches what it should not
        ("aten::mmx", OTHER),  # GEMMs are named exactly
    ],
)
def test_operators_are_grouped_by_kind(op, kind):
    assert kind_of(op) == kind


def test_a_linear_models_step_is_mostly_gemm_and_shares_add_to_one():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(512, 256)

    def step():
        loss = model(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    prof = profile_step(step, steps=3, warmup=1)
    shares = prof.shares()
    assert sum(shares.values()) == pytest.approx(1.0)
    assert list(shares) == sorted(shares, key=lambda k: -shares[k])
    assert {"matmul (GEMM)", "activation", "optimizer update"} <= set(shares)
    # two 256x1024 layers on 512 rows: the multiplies are a large share (how large depends on
    # the machine and what else runs on it, so no ranking is asserted)
    assert shares["matmul (GEMM)"] >= 0.15
    top = prof.top(5)
    assert len(top) == 5 and top[0]["share"] >= top[-1]["share"]
    assert prof.total_us > 0 and prof.steps == 3


def test_profile_step_refuses_bad_counts():
    with pytest.raises(ValueError, match="steps"):
        profile_step(lambda: None, steps=0)
    with pytest.raises(ValueError, match="warmup"):
        profile_step(lambda: None, steps=1, warmup=-1)


def test_words_and_known_words():
    assert words("O'er the HILLS, thou'rt -- 'tis 42 a-b") == ["o'er", "the", "hills", "thou'rt", "tis", "a", "b"]
    assert known_words(["the cat", "thee dgo"], {"the", "cat", "thee"}) == (3, 4)
    assert known_words([""], {"the"}) == (0, 0)


def test_read_samples_gives_each_evaluations_sample_back(tmp_path):
    from lab.runlog import RunLog, read_samples

    with RunLog(tmp_path / "tb", desc="a run", total=4, progress=False) as log:
        for step, text in [(0, "ROMEO:\n⟶xq z"), (2, "ROMEO:\n⟶the king"), (4, "ROMEO:\n⟶  indented\nline")]:
            log.text("sample", text, step)
    assert read_samples(tmp_path) == [(0, "ROMEO:\n⟶xq z"), (2, "ROMEO:\n⟶the king"), (4, "ROMEO:\n⟶  indented\nline")]


def test_read_samples_names_the_folder_without_events(tmp_path):
    from lab.runlog import read_samples

    with pytest.raises(FileNotFoundError, match="expected one TensorBoard run"):
        read_samples(tmp_path)
