"""lab.rlhf: SFT, preference files, the Bradley-Terry reward model, DPO and the KL estimate."""

import itertools
import json
import math

import pytest
import torch

from lab.models import GPT, GPTConfig
from lab.rlhf import (
    PreferencePair,
    RewardModel,
    WordTask,
    bradley_terry_loss,
    dpo,
    dpo_loss,
    encode_batch,
    kl_estimate,
    pairwise_accuracy,
    preference_pairs,
    read_preferences,
    sample_completions,
    sequence_logprobs,
    sft,
    token_logprobs,
    train_reward_model,
    vowel_fraction,
    write_preferences,
)
from lab.tokenizers.char import CharTokenizer

TEXT = "the thee then thou this think thus that than thane a ab abc abbey about above cat cot coat cute cater\n"
TOK = CharTokenizer(sorted(set(TEXT + ":;!dmqxyz")))


def _gpt(seed=0, vocab=None, block_size=32, n_embd=16):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab or TOK.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=n_embd)
    return GPT(cfg).eval()


def _state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- DPO loss


def test_dpo_loss_is_log2_when_policy_equals_reference():
    logp = torch.tensor([-3.0, -7.5, -0.2])
    other = torch.tensor([-1.0, -2.0, -9.0])
    for beta in (0.02, 0.1, 1.0, 10.0):
        assert dpo_loss(logp, other, logp, other, beta).item() == pytest.approx(math.log(2), abs=1e-7)


def test_dpo_loss_hand_computed():
    # pair 1: chosen gained 1 nat over ref, rejected lost 1 -> margin 2; beta 0.5 -> -log sigmoid(1)
    # pair 2: the reverse -> -log sigmoid(-1)
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    one = math.log1p(math.exp(-1.0))  # -log sigmoid(1) = 0.3133
    two = math.log1p(math.exp(1.0))  # -log sigmoid(-1) = 1.3133
    assert dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], 0.5).item() == pytest.approx(one, rel=1e-6)
    assert dpo_loss(pc, pr, rc, rr, 0.5).item() == pytest.approx((one + two) / 2, rel=1e-6)
    # the reference cancels where it is shared: only the differences of log-ratios count
    assert dpo_loss(pc + 5, pr + 5, rc + 5, rr + 5, 0.5).item() == pytest.approx((one + two) / 2, rel=1e-6)


def test_dpo_loss_gradient_direction():
    """At pi = ref the gradient is -beta/2 per pair on log pi(y_w) and +beta/2 on log pi(y_l)
    (divided by the batch size): descending it raises the chosen and lowers the rejected."""
    beta, n = 0.1, 4
    pc = torch.full((n,), -2.0, requires_grad=True)
    pr = torch.full((n,), -3.0, requires_grad=True)
    dpo_loss(pc, pr, pc.detach().clone(), pr.detach().clone(), beta).backward()
    assert torch.allclose(pc.grad, torch.full((n,), -beta / 2 / n))
    assert torch.allclose(pr.grad, torch.full((n,), beta / 2 / n))


def test_dpo_loss_rejects_bad_input():
    x = torch.zeros(3)
    for beta in (0, -0.1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(x, x, x, x, beta)
    with pytest.raises(ValueError, match="share one shape"):
        dpo_loss(x, x, x, torch.zeros(2), 0.1)


def test_bradley_terry_loss():
    r = torch.tensor([0.3, -1.0])
    assert bradley_terry_loss(r, r).item() == pytest.approx(math.log(2))
    two = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0])).item()
    assert two == pytest.approx(math.log1p(math.exp(-2)))


# ---------------------------------------------------------------- log-probs, sampling, KL


def test_token_logprobs_counts_only_completion_tokens():
    model = _gpt()
    idx, mask, lengths = encode_batch(TOK, ["the ", "a"], ["cat\n", "bc"])
    assert lengths.tolist() == [8, 3] and mask.sum(1).tolist() == [4, 2]
    got = token_logprobs(model, idx, mask)
    with torch.no_grad():
        logits, _ = model(idx)
    logp = torch.log_softmax(logits, -1)
    want0 = sum(logp[0, t - 1, idx[0, t]] for t in range(4, 8))
    want1 = sum(logp[1, t - 1, idx[1, t]] for t in range(1, 3))
    assert torch.allclose(got, torch.stack([want0, want1]), atol=1e-5)


def test_encode_batch_errors_name_the_pair():
    with pytest.raises(ValueError, match="pair 1: prompt and completion must be non-empty"):
        encode_batch(TOK, ["a", "b"], ["c", ""])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        encode_batch(TOK, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="block_size=4"):
        encode_batch(TOK, ["the "], ["cat\n"], block_size=4)


def test_completion_probabilities_sum_to_one():
    """Over every outcome the sampler can return (cut at the first newline or after
    max_new_tokens characters), the sequence probabilities sum to 1."""
    tok = CharTokenizer(["\n", "a", "b"])
    model = _gpt(vocab=3, block_size=8)
    outcomes = ["\n"] + [a + "\n" for a in "ab"] + ["".join(p) for p in itertools.product("ab", repeat=2)]
    p = sequence_logprobs(model, tok, ["a"] * len(outcomes), outcomes).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_kl_estimate_is_zero_for_identical_models_and_matches_exact_kl():
    tok = CharTokenizer(["\n", "a", "b"])
    pi, ref = _gpt(seed=0, vocab=3, block_size=8), _gpt(seed=1, vocab=3, block_size=8)
    with torch.no_grad():  # make the two models visibly different
        pi.lm_head.weight.mul_(40)
    g = torch.Generator().manual_seed(0)
    prompts = ["a"] * 3000
    ys = sample_completions(pi, tok, prompts, max_new_tokens=2, generator=g)
    same = kl_estimate(pi, pi, tok, prompts, ys)
    assert same.mean == 0.0 and same.n == 3000
    outcomes = ["\n", "a\n", "b\n", "aa", "ab", "ba", "bb"]
    lp, lq = (sequence_logprobs(m, tok, ["a"] * 7, outcomes) for m in (pi, ref))
    exact = float((lp.exp() * (lp - lq)).sum())
    est = kl_estimate(pi, ref, tok, prompts, ys)
    assert exact > 0.05
    assert abs(est.mean - exact) < 4 * est.sem + 1e-3


def test_sample_completions_cut_after_newline_and_are_deterministic():
    model = _gpt()
    prompts = ["the ", "a", "the "]
    a = sample_completions(model, TOK, prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(3))
    b = sample_completions(model, TOK, prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(3))
    assert a == b
    for c in a:
        assert 1 <= len(c) <= 6 and "\n" not in c[:-1]
    with pytest.raises(ValueError, match="block_size=32"):
        sample_completions(model, TOK, ["the "], max_new_tokens=30, generator=torch.Generator())


# ---------------------------------------------------------------- the task


def test_vowel_fraction():
    assert vowel_fraction("thee\n") == 0.5
    assert vowel_fraction("xyz") == 0.0
    assert vowel_fraction("\n") == 0.0
    assert vowel_fraction("aa\nbbbb") == 1.0  # only the answer before the newline counts
    with pytest.raises(ValueError, match="str"):
        vowel_fraction(3)


def test_word_task_split_and_format():
    task = WordTask.from_text(TEXT, min_words=2, held_out_fraction=0.5)
    assert set(task.train_prefixes).isdisjoint(task.held_out_prefixes)
    assert set(task.train_prefixes) | set(task.held_out_prefixes) == set(task.words)
    assert WordTask.from_text(TEXT, min_words=2, held_out_fraction=0.5) == task
    assert task.words["th"] == ("than", "thane", "that", "the", "thee", "then", "think", "this", "thou", "thus")
    p = task.prompt("th")
    assert p == "name th: " and task.prefix_of(p) == "th"
    assert task.well_formed(p, "thee\n") and task.known_word(p, "thee\n")
    assert task.well_formed(p, "thxq\n") and not task.known_word(p, "thxq\n")
    for bad in ("th\n", "thee", "the e\n", "Thee\n", "cat\n", "thee\nx"):
        assert not task.well_formed(p, bad), bad
    with pytest.raises(ValueError, match="not a prompt of this task"):
        task.prefix_of("name t: ")
    prompts, answers = task.sft_examples(20, torch.Generator().manual_seed(0))
    assert all(task.known_word(q, a) and task.prefix_of(q) in task.train_prefixes for q, a in zip(prompts, answers))
    with pytest.raises(ValueError, match="split must be"):
        task.prompts("test", 3, torch.Generator())
    with pytest.raises(ValueError, match="prefix_len < min_len"):
        WordTask.from_text(TEXT, prefix_len=3, min_len=3)


# ---------------------------------------------------------------- preference files


def _write(tmp_path, lines):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"prompt": "name th: ", "chosen": "thee\n", "rejected": "thus\n"})


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"prompt": "x", "chosen": "a"', "line 3: not valid JSON"),
        ('["x", "a", "b"]', "line 3: expected a JSON object"),
        ('{"prompt": "x", "chosen": "a"}', r"line 3: missing key\(s\) \['rejected'\]"),
        ('{"prompt": "x", "chosen": "", "rejected": "b"}', "line 3: 'chosen' is an empty string"),
        ('{"prompt": "x", "chosen": "a", "rejected": "a"}', "line 3: 'chosen' equals 'rejected'"),
        ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "line 3: 'prompt' must be a string"),
        ('{"prompt": "x", "chosen": "a", "rejected": "b", "choosen": "a"}', r"line 3: unknown key\(s\) \['choosen'\]"),
        (
            '{"prompt": "x", "chosen": "a", "rejected": "b", "chosen_score": 0.1, "rejected_score": 0.9}',
            "line 3: 'chosen_score' 0.1 is below 'rejected_score' 0.9",
        ),
        ('{"prompt": "x", "chosen": "a", "rejected": "b", "chosen_score": 0.1}', "line 3: give both"),
        ("", "line 3: empty line"),
    ],
)
def test_read_preferences_names_the_bad_line(tmp_path, bad, message):
    path = _write(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(ValueError, match=message) as info:
        read_preferences(path)
    assert str(path) in str(info.value)


def test_read_preferences_checks_the_alphabet(tmp_path):
    path = _write(tmp_path, [GOOD, json.dumps({"prompt": "x", "chosen": "é\n", "rejected": "a\n"})])
    assert len(read_preferences(path)) == 2
    with pytest.raises(ValueError, match=r"line 2: 'chosen' has character\(s\) \['é'\] outside"):
        read_preferences(path, alphabet="".join(TOK.chars))


def test_preference_file_round_trip_and_empty(tmp_path):
    pairs = [PreferencePair("name th: ", "thee\n", "thus\n", 0.5, 0.25), PreferencePair("p", "a", "b")]
    path = write_preferences(tmp_path / "p.jsonl", pairs)
    assert read_preferences(path) == pairs
    assert '"chosen_score"' not in path.read_text().splitlines()[1]
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no pairs"):
        read_preferences(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="does not exist"):
        read_preferences(tmp_path / "missing.jsonl")


def test_preference_pairs_label_by_score_and_drop_ties():
    model = _gpt()
    prompts = ["the "] * 40
    pairs, ties = preference_pairs(
        model, TOK, prompts, len, max_new_tokens=4, generator=torch.Generator().manual_seed(0)
    )
    assert len(pairs) + ties == 40 and ties > 0 and pairs
    assert all(len(p.chosen) > len(p.rejected) and p.chosen_score == len(p.chosen) for p in pairs)


# ---------------------------------------------------------------- training loops


def test_sft_raises_answer_likelihood_leaves_the_base_untouched_and_is_deterministic():
    base = _gpt()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    prompts, answers = ["the "] * 4, ["cat\n", "coat\n", "cat\n", "cot\n"]
    lp0 = sequence_logprobs(base, TOK, prompts, answers).sum()
    history = []
    a = sft(base, TOK, prompts, answers, steps=30, batch_size=4, lr=1e-2, seed=0, history=history)
    b = sft(base, TOK, prompts, answers, steps=30, batch_size=4, lr=1e-2, seed=0)
    assert _state_equal(a, b)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert sequence_logprobs(a, TOK, prompts, answers).sum() > lp0 + 5
    assert len(history) == 30 and history[-1]["loss"] < history[0]["loss"]
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        sft(base, TOK, prompts, answers, steps=0, batch_size=4, lr=1e-2, seed=0)


def _planted_pairs(n, seed):
    """chosen answers hold more a's than rejected ones: a preference the reward model must find."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        k = int(torch.randint(1, 4, (1,), generator=g))
        letters = "bcdhmt"
        filler = "".join(letters[int(i)] for i in torch.randint(len(letters), (4,), generator=g))
        good = "a" * k + filler[k:] + "\n"
        bad = filler + "\n"
        pairs.append(PreferencePair("the ", good, bad))
    return pairs


def test_reward_model_learns_a_planted_preference():
    trunk = _gpt(n_embd=32)
    train, held = _planted_pairs(64, 0), _planted_pairs(64, 1)
    rm0 = RewardModel(trunk)
    assert torch.equal(rm0.rewards(TOK, ["the "] * 2, ["ab\n", "cd\n"]), torch.zeros(2))  # zero head at init
    assert pairwise_accuracy(rm0, TOK, held) == 0.5  # every reward ties
    rm = train_reward_model(trunk, TOK, train, steps=40, batch_size=16, lr=3e-3, seed=0)
    assert pairwise_accuracy(rm, TOK, held) >= 0.9
    again = train_reward_model(trunk, TOK, train, steps=40, batch_size=16, lr=3e-3, seed=0)
    assert _state_equal(rm, again)


def test_dpo_moves_mass_to_chosen_and_is_deterministic():
    ref = _gpt()
    pairs = [PreferencePair("the ", "cat\n", "cot\n"), PreferencePair("a", "bc\n", "bb\n")]
    prompts = [p.prompt for p in pairs]

    def log_ratio_margin(model):
        pc = sequence_logprobs(model, TOK, prompts, [p.chosen for p in pairs])
        pr = sequence_logprobs(model, TOK, prompts, [p.rejected for p in pairs])
        return pc - pr

    history = []
    pol = dpo(ref, ref, TOK, pairs, beta=0.1, steps=20, batch_size=2, lr=3e-3, seed=0, history=history)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # pi = ref at the first step
    assert history[-1]["loss"] < history[0]["loss"]
    assert bool((log_ratio_margin(pol) > log_ratio_margin(ref) + 1.0).all())
    again = dpo(ref, ref, TOK, pairs, beta=0.1, steps=20, batch_size=2, lr=3e-3, seed=0)
    assert _state_equal(pol, again)
    with pytest.raises(ValueError, match="beta"):
        dpo(ref, ref, TOK, pairs, beta=0.0, steps=1, batch_size=2, lr=1e-3, seed=0)
    with pytest.raises(ValueError, match="at least one preference pair"):
        dpo(ref, ref, TOK, [], beta=0.1, steps=1, batch_size=2, lr=1e-3, seed=0)
