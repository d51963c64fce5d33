"""Curriculum 12: fine-tuning and RLHF — supervised fine-tuning of the baby GPT on a tiny
instruction ("name th: " -> a word starting with "th"), preference pairs labelled by an
exactly computable property (the answer's share of vowels), a Bradley-Terry reward model
on those pairs, and DPO against the SFT model: does the property rise on prompts none of
the stages saw, how far does the policy drift from its reference as beta falls, and how
many pairs does a reward model need?"""

import copy

import pytest
import torch

from lab.models import export_hf, load_lab_from_hf
from lab.report import at_least, between, greater_than, prediction
from lab.rlhf import (
    WordTask,
    dpo,
    kl_estimate,
    pairwise_accuracy,
    preference_pairs,
    read_preferences,
    sample_completions,
    sft,
    train_reward_model,
    vowel_fraction,
    write_preferences,
)
from lab.rlhf.trl_side import hf_pairwise_accuracy, hf_rewards, trl_dpo, trl_reward_model, trl_sft

PILOT_NOTE = (
    "Disclosure: these predictions were written after pilot runs on seed 0 (used to choose sizes and "
    "learning rates): SFT well-formed 0.65, DPO score 0.38 -> 0.64, KL 5.7 / 8.4 / 12.0 nats at beta "
    "0.5 / 0.1 / 0.02, RM accuracy 0.65 -> 0.90 from 16 to 768 pairs. Seeds 1 and 2 were unseen."
)

pytestmark = [pytest.mark.curriculum, pytest.mark.m12_finetuning_rlhf]


# independent random streams per stage, so a result does not depend on which hypotheses ran first
STREAMS = {"sft_data": 1, "train_pairs": 2, "held_pairs": 3, "eval_prompts": 4, "eval_samples": 5}


def _gen(seed: int, stream: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(1000 * seed + STREAMS[stream])
    return g


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _fell(history) -> tuple[float, float]:
    """(mean loss over the first 10% of steps, over the last 10%) of a training history."""
    k = max(1, len(history) // 10)
    return _mean(h["loss"] for h in history[:k]), _mean(h["loss"] for h in history[-k:])


def _require_fell(outcome, what: str, histories: dict) -> None:
    """Validity: each training run in {label: history} moved its loss (last 10% of steps
    below the first 10%)."""
    ends = {label: _fell(h) for label, h in histories.items()}
    outcome.require(
        f"{what} moved its loss",
        all(last < first for first, last in ends.values()),
        "mean loss, first -> last 10% of steps: "
        + ", ".join(f"{label} {first:.3f} -> {last:.3f}" for label, (first, last) in ends.items()),
    )


class PosttrainBench:
    """Per seed: the SFT model, its preference pairs (through a JSONL file), reward models
    and DPO policies, each built on first use and shared by the module's hypotheses."""

    def __init__(self, lab, char_data, baby_runs, workdir):
        self.lab, self.runs, self.workdir = lab, baby_runs, workdir
        self.s = s = lab.profile.posttrain
        if s.dpo_beta not in s.dpo_betas or list(s.dpo_betas) != sorted(s.dpo_betas, reverse=True):
            raise ValueError(f"dpo_betas must descend and hold dpo_beta={s.dpo_beta}, got {s.dpo_betas}")
        if list(s.rm_sizes) != sorted(set(s.rm_sizes)):
            raise ValueError(f"rm_sizes must strictly ascend, got {s.rm_sizes}")
        self.tok = char_data.tokenizer
        self.alphabet = "".join(self.tok.chars)
        self.task = WordTask.from_text(self.tok.decode(char_data.train.tolist()))
        if s.max_new_tokens < self.task.max_completion_len:
            raise ValueError(
                f"max_new_tokens={s.max_new_tokens} cannot hold the longest answer "
                f"({self.task.max_completion_len} characters)"
            )
        self._c = {}

    def _cached(self, key, make):
        if key not in self._c:
            self._c[key] = make()
        return self._c[key]

    def base(self, seed):
        # a private copy: the shared run's model stays where other hypotheses expect it
        return self._cached(("base", seed), lambda: copy.deepcopy(self.runs[seed].model).to(self.lab.device).eval())

    def sft(self, seed):
        """(SFT model, loss history)."""

        def make():
            s, history = self.s, []
            prompts, answers = self.task.sft_examples(s.sft_examples, _gen(seed, "sft_data"))
            model = sft(
                self.base(seed),
                self.tok,
                prompts,
                answers,
                steps=s.sft_steps,
                batch_size=s.sft_batch_size,
                lr=s.sft_lr,
                seed=seed,
                history=history,
            )
            return model, history

        return self._cached(("sft", seed), make)

    def _pairs(self, seed, split, need):
        """At least `need` pairs from the SFT model on prompts of a split, sampled in rounds
        of pair_prompts prompts; returns (pairs, ties, prompts sampled)."""
        model, gen = self.sft(seed)[0], _gen(seed, "train_pairs" if split == "train" else "held_pairs")
        n = self.s.pair_prompts if split == "train" else self.s.rm_eval_prompts
        pairs, ties, asked = [], 0, 0
        while len(pairs) < need:
            if asked >= 10 * max(need, n):
                raise ValueError(
                    f"the SFT model of seed {seed} gave only {len(pairs)} untied pairs from {asked} "
                    f"{split} prompts, {need} needed"
                )
            got, t = preference_pairs(
                model,
                self.tok,
                self.task.prompts(split, n, gen),
                vowel_fraction,
                max_new_tokens=self.s.max_new_tokens,
                generator=gen,
            )
            pairs, ties, asked = pairs + got, ties + t, asked + n
        return pairs, ties, asked

    def train_pairs(self, seed):
        """The training preference pairs (max(rm_sizes) of them), written to a JSONL file
        and read back through the validating reader, and the tie count."""

        def make():
            pairs, ties, asked = self._pairs(seed, "train", max(self.s.rm_sizes))
            path = write_preferences(self.workdir / f"preferences-seed{seed}.jsonl", pairs[: max(self.s.rm_sizes)])
            return read_preferences(path, alphabet=self.alphabet), ties, asked

        return self._cached(("train_pairs", seed), make)

    def held_pairs(self, seed):
        return self._cached(("held_pairs", seed), lambda: self._pairs(seed, "held_out", 1)[0])

    def eval_prompts(self, seed):
        return self._cached(
            ("eval_prompts", seed),
            lambda: self.task.prompts("held_out", self.s.eval_prompts, _gen(seed, "eval_prompts")),
        )

    def evaluate(self, seed, which):
        """which: "base", "sft" or a DPO beta. One sample per held-out eval prompt (the same
        sampling stream for every model), its mean score, well-formed and known-word
        shares, and KL(model || SFT) estimated on those samples."""

        def make():
            model = self.model(seed, which)
            prompts = self.eval_prompts(seed)
            answers = sample_completions(
                model, self.tok, prompts, max_new_tokens=self.s.max_new_tokens, generator=_gen(seed, "eval_samples")
            )
            out = {
                "answers": answers,
                "score": _mean(vowel_fraction(a) for a in answers),
                "well_formed": _mean(self.task.well_formed(p, a) for p, a in zip(prompts, answers)),
                "well_formed_count": sum(self.task.well_formed(p, a) for p, a in zip(prompts, answers)),
                "known_word": _mean(self.task.known_word(p, a) for p, a in zip(prompts, answers)),
            }
            if which != "base":
                out["kl"] = kl_estimate(model, self.sft(seed)[0], self.tok, prompts, answers)
            return out

        return self._cached(("eval", seed, which), make)

    def model(self, seed, which):
        if which == "base":
            return self.base(seed)
        if which == "sft":
            return self.sft(seed)[0]
        return self.dpo(seed, which)[0]

    def dpo(self, seed, beta):
        """(policy, history): DPO from the SFT model against itself frozen, on the training pairs."""

        def make():
            s, history = self.s, []
            ref = self.sft(seed)[0]
            policy = dpo(
                ref,
                ref,
                self.tok,
                self.train_pairs(seed)[0],
                beta=beta,
                steps=s.dpo_steps,
                batch_size=s.dpo_batch_size,
                lr=s.dpo_lr,
                seed=seed,
                history=history,
            )
            return policy, history

        return self._cached(("dpo", seed, beta), make)

    def rm_accuracy(self, seed, n):
        """(held-out, training) pairwise accuracy of a reward model trained on the first n pairs."""

        def make():
            s, pairs = self.s, self.train_pairs(seed)[0][:n]
            rm = train_reward_model(
                self.sft(seed)[0], self.tok, pairs, steps=s.rm_steps, batch_size=s.rm_batch_size, lr=s.rm_lr, seed=seed
            )
            return pairwise_accuracy(rm, self.tok, self.held_pairs(seed)), pairwise_accuracy(rm, self.tok, pairs)

        return self._cached(("rm", seed, n), make)


@pytest.fixture(scope="module")
def bench(lab, char_data, baby_runs, tmp_path_factory):
    return PosttrainBench(lab, char_data, baby_runs, tmp_path_factory.mktemp("m12"))


@prediction(
    "SFT teaches the answer format: at least half of the SFT model's samples on held-out prompts are "
    "well formed (the prompt's two letters, more lowercase letters, a newline)",
    metric="well_formed_sft",
    expect=at_least(0.5),
)
def test_sft_learns_format(lab, bench, outcome):
    """Does supervised fine-tuning teach the baby GPT the format of a tiny instruction task?

    The task: "name th: " -> "thee\\n", a word that starts with the prompt's two letters.
    Its words are the lowercase words of 3 to 10 letters in the training split of tiny
    Shakespeare, grouped by their first two letters (prefixes with at least 3 words); a
    fixed hash of each prefix holds out about a quarter of them, and every later stage
    (SFT, preference pairs, reward model, DPO) sees only the rest. Fine-tune a copy of each
    seed's baby GPT (the pretraining hypotheses' model) on prompt + answer pairs drawn
    uniformly from the training prefixes' words, with cross-entropy on the answer
    characters only (AdamW, constant lr, the profile's steps). Then sample one answer per
    held-out prompt (temperature 1, up to max_new_tokens characters, cut after the first
    newline) from the base and the SFT model. well_formed = share of answers matching
    <prefix>[a-z]+\\n (a count of prompts per seed, judged with an exact binomial interval
    over all seeds' prompts); known_word = share that are also words of the text. Valid
    only if SFT moved its loss in every seed.
    """
    outcome.note(PILOT_NOTE)
    s = bench.s
    curves = {}
    for seed in lab.seeds:
        base, tuned = bench.evaluate(seed, "base"), bench.evaluate(seed, "sft")
        n = len(bench.eval_prompts(seed))
        outcome.record_fraction("well_formed_base", base["well_formed_count"], n, seed=seed)
        outcome.record_fraction("well_formed_sft", tuned["well_formed_count"], n, seed=seed)
        outcome.record("known_word_sft", tuned["known_word"], seed=seed)
        outcome.record("score_sft", tuned["score"], seed=seed, unit="vowel fraction")
        history = bench.sft(seed)[1]
        curves[f"seed {seed}"] = ([h["step"] for h in history], [h["loss"] for h in history])
    outcome.plot_lines(
        "sft_loss",
        curves,
        xlabel="SFT step",
        ylabel="answer cross-entropy (nats/char)",
        title=f"SFT on the word task ({s.sft_steps} steps, batch {s.sft_batch_size})",
    )
    _require_fell(outcome, "SFT", {f"seed {sd}": bench.sft(sd)[1] for sd in lab.seeds})
    seed = lab.seeds[0]
    prompts = bench.eval_prompts(seed)
    base, tuned = bench.evaluate(seed, "base")["answers"], bench.evaluate(seed, "sft")["answers"]
    outcome.table(
        "sft_examples",
        [
            {"prompt": p, "base": repr(b), "SFT": repr(t), "well formed": bench.task.well_formed(p, t)}
            for p, b, t in list(zip(prompts, base, tuned))[: s.example_rows]
        ],
        caption=f"Held-out prompts, one sample each (seed {seed}, temperature 1)",
    )
    outcome.note(
        f"{len(bench.task.train_prefixes)} training and {len(bench.task.held_out_prefixes)} held-out "
        f"prefixes; held-out examples: {', '.join(bench.task.held_out_prefixes[:8])}."
    )


@prediction(
    "DPO (beta 0.1) raises the mean vowel fraction of answers to held-out prompts above the SFT model's",
    metric="score_dpo",
    expect=greater_than("score_sft"),
)
def test_dpo_raises_score(lab, bench, outcome):
    """Does DPO on vowel-fraction preferences raise the score on held-out prompts above SFT's?

    Preference pairs: for each training prompt (prefixes drawn uniformly from the training
    split), two samples from the SFT model at temperature 1; the answer with the higher
    vowel fraction (a, e, i, o, u among the characters before the newline) is chosen,
    ties dropped (tie_fraction records how many), until max(rm_sizes) pairs; they go through a JSONL
    file and its validating reader. DPO (Rafailov et al. 2023) starts from the SFT model
    and trains against it frozen as the reference: loss -log sigmoid(beta * ((log pi(y_w)
    - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))), sequence log-probs over the answer
    characters, AdamW at a constant lr, the profile's steps and batch, beta = 0.1.
    score = mean vowel fraction of one sample per held-out
    prompt (the same prompts and sampling stream for both models), paired by seed. Valid
    only if DPO moved its loss (which starts at log 2, the policy equal to its reference).
    """
    outcome.note(PILOT_NOTE)
    s = bench.s
    beta = s.dpo_beta
    for seed in lab.seeds:
        tuned, pol = bench.evaluate(seed, "sft"), bench.evaluate(seed, beta)
        pairs, ties, asked = bench.train_pairs(seed)
        outcome.record("score_sft", tuned["score"], seed=seed, unit="vowel fraction")
        outcome.record("score_dpo", pol["score"], seed=seed, unit="vowel fraction")
        outcome.record("well_formed_dpo", pol["well_formed"], seed=seed)
        outcome.record("kl_dpo", pol["kl"].mean, seed=seed, unit="nats/answer")
        outcome.record("tie_fraction", ties / asked, seed=seed)
        outcome.record("final_implicit_accuracy", bench.dpo(seed, beta)[1][-1]["accuracy"], seed=seed)
    seed = lab.seeds[0]
    prompts = bench.eval_prompts(seed)
    columns = {
        "SFT": bench.evaluate(seed, "sft")["answers"],
        **{f"DPO beta={b:g}": bench.evaluate(seed, b)["answers"] for b in s.dpo_betas},
    }
    rows = []
    for i, p in enumerate(prompts[: s.example_rows]):
        rows.append({"prompt": p, **{k: f"{v[i]!r} ({vowel_fraction(v[i]):.2f})" for k, v in columns.items()}})
    outcome.table(
        "examples",
        rows,
        caption=f"One sample per held-out prompt, the same sampling stream for every "
        f"model (seed {seed}); vowel fraction in brackets",
    )
    curves = {
        f"seed {sd}": ([h["step"] for h in bench.dpo(sd, beta)[1]], [h["loss"] for h in bench.dpo(sd, beta)[1]])
        for sd in lab.seeds
    }
    outcome.plot_lines(
        "dpo_loss",
        curves,
        xlabel="DPO step",
        ylabel="DPO loss (batch)",
        title=f"DPO at beta={beta:g}",
        hlines={"log 2 (pi = ref)": 0.6931},
    )
    _require_fell(outcome, f"DPO (beta {beta:g})", {f"seed {sd}": bench.dpo(sd, beta)[1] for sd in lab.seeds})


@prediction(
    "The KL from the reference grows as beta falls: KL(pi || SFT) at the smallest beta exceeds that at the largest",
    metric="kl_smallest_beta",
    expect=greater_than("kl_largest_beta"),
)
@prediction(
    "...and it grows at every step down the beta grid (share of adjacent beta pairs where KL rises = 1)",
    metric="kl_monotone",
    expect=at_least(1.0),
)
def test_kl_grows_as_beta_falls(lab, bench, outcome):
    """Does the policy drift further from its reference (KL) as DPO's beta falls?

    For each beta of the profile's grid, DPO as in the score hypothesis (same pairs,
    steps, lr and seed). KL(pi || ref) on held-out prompts is estimated by Monte Carlo:
    one sample y ~ pi per held-out prompt, the mean of log pi(y|x) - log ref(y|x) over the
    answer characters (nats per answer; the same estimator gives exactly 0 for pi = ref).
    DPO's optimum is pi* proportional to ref * exp(r / beta), so the KL should grow with
    1/beta; a finite step budget may stop short of it. kl_monotone = share of adjacent
    beta pairs (descending beta) whose KL rises: a count of pairs per seed, judged with
    an exact binomial interval over all seeds' pairs. Valid only if every DPO run moved
    its loss.
    """
    outcome.note(PILOT_NOTE)
    betas = bench.s.dpo_betas
    kl_lines, score_lines, frontier = {}, {}, {}
    for seed in lab.seeds:
        kls = [bench.evaluate(seed, b)["kl"].mean for b in betas]
        scores = [bench.evaluate(seed, b)["score"] for b in betas]
        for b, kl, sc in zip(betas, kls, scores):
            outcome.record(f"kl_beta_{b:g}", kl, seed=seed, unit="nats/answer")
            outcome.record(f"score_beta_{b:g}", sc, seed=seed, unit="vowel fraction")
            outcome.record(f"well_formed_beta_{b:g}", bench.evaluate(seed, b)["well_formed"], seed=seed)
        outcome.record("kl_largest_beta", kls[0], seed=seed, unit="nats/answer")
        outcome.record("kl_smallest_beta", kls[-1], seed=seed, unit="nats/answer")
        outcome.record_fraction("kl_monotone", sum(b > a for a, b in zip(kls, kls[1:])), len(kls) - 1, seed=seed)
        inv = [1 / b for b in betas]
        kl_lines[f"seed {seed}"] = (inv, kls)
        score_lines[f"seed {seed}"] = (list(betas), scores)
        frontier[f"seed {seed}"] = ([0.0, *kls], [bench.evaluate(seed, "sft")["score"], *scores])
    sft_score = _mean(bench.evaluate(seed, "sft")["score"] for seed in lab.seeds)
    outcome.plot_lines(
        "kl_vs_inverse_beta",
        kl_lines,
        xlabel="1 / beta",
        ylabel="KL(pi || SFT), nats per answer",
        title="Drift from the reference vs 1/beta",
        logx=True,
    )
    outcome.plot_lines(
        "score_vs_beta",
        score_lines,
        xlabel="beta",
        ylabel="mean vowel fraction, held-out prompts",
        title="Score vs beta",
        logx=True,
        hlines={"SFT (mean over seeds)": sft_score},
    )
    outcome.plot_lines(
        "score_vs_kl",
        frontier,
        xlabel="KL(pi || SFT), nats per answer",
        ylabel="mean vowel fraction, held-out prompts",
        title="Score bought per nat of KL (first point: SFT; then beta descending)",
    )
    rows = [
        {
            "beta": b,
            "1/beta": round(1 / b, 1),
            "KL (nats), mean": round(_mean(bench.evaluate(sd, b)["kl"].mean for sd in lab.seeds), 3),
            "score, mean": round(_mean(bench.evaluate(sd, b)["score"] for sd in lab.seeds), 3),
            "well formed, mean": round(_mean(bench.evaluate(sd, b)["well_formed"] for sd in lab.seeds), 3),
        }
        for b in betas
    ]
    sft_row = {
        "beta": "SFT",
        "1/beta": "-",
        "KL (nats), mean": 0.0,
        "score, mean": round(sft_score, 3),
        "well formed, mean": round(_mean(bench.evaluate(sd, "sft")["well_formed"] for sd in lab.seeds), 3),
    }
    outcome.table("beta_grid", [sft_row, *rows], caption="Means over seeds on held-out prompts")
    _require_fell(
        outcome, "every DPO run", {f"beta {b:g}, seed {sd}": bench.dpo(sd, b)[1] for b in betas for sd in lab.seeds}
    )


@prediction(
    "A reward model trained on the most pairs ranks at least 70% of held-out pairs correctly",
    metric="rm_acc_largest",
    expect=at_least(0.7),
)
@prediction(
    "Reward-model accuracy grows with data: the largest training set beats the smallest on held-out pairs",
    metric="rm_acc_largest",
    expect=greater_than("rm_acc_smallest"),
)
def test_reward_model_accuracy_vs_pairs(lab, bench, outcome):
    """How does a Bradley-Terry reward model's held-out accuracy grow with its training pairs?

    The reward model is a copy of the seed's SFT model with a scalar head (zero at init)
    on the final hidden state of the answer's last character (the newline). Train one per
    size in rm_sizes on the first n training pairs (the DPO pairs), all for the same
    optimizer steps and batch (so small sets are seen for many epochs), with the loss
    -log sigmoid(r(chosen) - r(rejected)). Accuracy: share of pairs from held-out prompts
    (sampled from the SFT model as the training pairs were; ties dropped) whose chosen
    answer gets the higher reward (a tie, rare, counts half). Chance is 0.5. The smallest
    and largest sizes' accuracies are counts of held-out pairs per seed, judged with exact
    binomial intervals over all seeds' pairs. Valid only if the largest reward model
    ranks its own training pairs better than chance.
    """
    outcome.note(PILOT_NOTE)
    sizes = bench.s.rm_sizes
    lines, train_lines, fitted = {}, {}, {}
    for seed in lab.seeds:
        acc = [bench.rm_accuracy(seed, n) for n in sizes]
        for n, (held, train) in zip(sizes, acc):
            outcome.record(f"rm_acc_{n}", held, seed=seed)
            outcome.record(f"rm_train_acc_{n}", train, seed=seed)
        n_held = len(bench.held_pairs(seed))
        outcome.record_fraction("rm_acc_smallest", round(acc[0][0] * n_held), n_held, seed=seed)
        outcome.record_fraction("rm_acc_largest", round(acc[-1][0] * n_held), n_held, seed=seed)
        fitted[f"seed {seed}"] = acc[-1][1]
        outcome.record("rm_eval_pairs", len(bench.held_pairs(seed)), seed=seed)
        lines[f"held-out, seed {seed}"] = (list(sizes), [a[0] for a in acc])
        train_lines[f"training, seed {seed}"] = (list(sizes), [a[1] for a in acc])
    outcome.plot_lines(
        "rm_accuracy_vs_pairs",
        {**lines, **train_lines},
        xlabel="training pairs",
        ylabel="pairwise accuracy",
        title="Reward model: accuracy vs data",
        logx=True,
        hlines={"chance": 0.5},
    )
    outcome.require(
        f"the reward model on {sizes[-1]} pairs fits them",
        all(a > 0.5 for a in fitted.values()),
        "training-pair accuracy above chance (0.5): " + ", ".join(f"{k} {a:.3f}" for k, a in fitted.items()),
    )


# ----------------------------------------------------------------- the same recipe through trl


class TrlBench:
    """Per seed, curriculum 12's stages a second way: trl's SFTTrainer, RewardTrainer and
    DPOTrainer on the lab models exported to Hugging Face format (lab.rlhf.trl_side), each
    stage started from the same lab model and fed the same rows in the same order as the
    written-out loop it mirrors; trained causal LMs come back as lab GPTs."""

    def __init__(self, lab, bench):
        self.lab, self.bench, self._c = lab, bench, {}

    def _cached(self, key, make):
        if key not in self._c:
            self._c[key] = make()
        return self._c[key]

    def export(self, seed, which):
        """The lab's base or SFT model of a seed as a Hugging Face directory with its tokenizer."""
        b = self.bench
        path = b.workdir / f"trl-seed{seed}" / which
        return self._cached(("export", seed, which), lambda: export_hf(b.model(seed, which), path, tokenizer=b.tok))

    def sft(self, seed):
        def make():
            b, s = self.bench, self.bench.s
            prompts, answers = b.task.sft_examples(s.sft_examples, _gen(seed, "sft_data"))
            run = trl_sft(
                self.export(seed, "base"),
                prompts,
                answers,
                steps=s.sft_steps,
                batch_size=s.sft_batch_size,
                lr=s.sft_lr,
                seed=seed,
                out_dir=b.workdir / f"trl-seed{seed}" / "sft-run",
                device=self.lab.device,
            )
            return load_lab_from_hf(run.path).to(self.lab.device), run.history

        return self._cached(("sft", seed), make)

    def dpo(self, seed):
        def make():
            b, s = self.bench, self.bench.s
            run = trl_dpo(
                self.export(seed, "sft"),
                b.train_pairs(seed)[0],
                beta=s.dpo_beta,
                steps=s.dpo_steps,
                batch_size=s.dpo_batch_size,
                lr=s.dpo_lr,
                seed=seed,
                out_dir=b.workdir / f"trl-seed{seed}" / "dpo-run",
                device=self.lab.device,
            )
            return load_lab_from_hf(run.path).to(self.lab.device), run.history

        return self._cached(("dpo", seed), make)

    def reward(self, seed):
        """(lab reward model, its history, trl run) on the largest training set, same steps."""

        def make():
            b, s = self.bench, self.bench.s
            pairs, history = b.train_pairs(seed)[0][: max(s.rm_sizes)], []
            kw = dict(steps=s.rm_steps, batch_size=s.rm_batch_size, lr=s.rm_lr, seed=seed)
            lab_rm = train_reward_model(b.sft(seed)[0], b.tok, pairs, history=history, **kw)
            run = trl_reward_model(
                self.export(seed, "sft"),
                pairs,
                out_dir=b.workdir / f"trl-seed{seed}" / "rm-run",
                device=self.lab.device,
                **kw,
            )
            return lab_rm, history, run

        return self._cached(("rm", seed), make)

    def answers(self, seed, model):
        """One sample per held-out eval prompt, with the sampling stream every m12 evaluation uses."""
        b = self.bench
        return sample_completions(
            model, b.tok, b.eval_prompts(seed), max_new_tokens=b.s.max_new_tokens, generator=_gen(seed, "eval_samples")
        )


@pytest.fixture(scope="module")
def trl_bench(lab, bench):
    pytest.importorskip("trl")
    return TrlBench(lab, bench)


def _same(a, b) -> int:
    return sum(x == y for x, y in zip(a, b))


@prediction(
    "trl's DPOTrainer, on the lab's SFT model exported, raises the held-out vowel score above the SFT model's, "
    "as the written-out loop does",
    metric="score_dpo_trl",
    expect=greater_than("score_sft"),
)
@prediction(
    "The two DPO paths give the same answer on at least 90% of held-out prompts (same start, batches, "
    "optimizer and sampling stream)",
    metric="dpo_same_answers",
    expect=at_least(0.9),
)
@prediction(
    "Their KL to the reference agrees: KL(trl DPO || SFT) / KL(lab DPO || SFT) within {low} to {high}",
    metric="kl_ratio_trl_over_lab",
    expect=between(0.9, 1.1),
)
@prediction(
    "trl's SFTTrainer gives the same answer as the lab's SFT loop on at least 90% of held-out prompts",
    metric="sft_same_answers",
    expect=at_least(0.9),
)
@prediction(
    "trl's RewardTrainer and the lab's reward model rank at least 95% of held-out pairs the same way",
    metric="rm_same_ranking",
    expect=at_least(0.95),
)
def test_trl_reproduces_the_written_out_loops(lab, bench, trl_bench, outcome):
    """Do trl's SFTTrainer, RewardTrainer and DPOTrainer reproduce the written-out SFT, reward model and DPO?

    The lab writes each post-training loop out in plain torch (lab.rlhf). Here the same
    stages run through the library one would use at work: trl's trainers on the lab model
    exported to Hugging Face format (GPT2LMHeadModel, with its tokenizer), each started from
    the same lab model as the loop it mirrors (SFT from the seed's baby GPT; the reward
    model and DPO from the lab's SFT model) and fed the same rows in the same order (the
    lab's batch draws replayed, read sequentially), with the same optimizer (AdamW, betas
    0.9/0.95, no weight decay, constant lr, no warm-up, no clipping), steps, seed and float32
    numerics (trl's default is bfloat16 autocast). The reward model is a sequence
    classifier with a zero-initialised head reading the answer's newline; DPO uses trl's
    "sigmoid" loss at beta = dpo_beta against the SFT model frozen. Trained causal LMs come
    back as lab GPTs, so one evaluation serves both paths: one sample per held-out prompt
    from the same sampling stream, its vowel score, and KL(policy || SFT) on the policy's
    own samples. same_answers = share of held-out prompts where the two paths' samples are
    identical (a count per seed, judged with an exact binomial interval over all seeds'
    prompts); rm_same_ranking = share of held-out pairs both reward models order the same
    way (likewise). tests/test_side_by_side.py shows the losses equal on a fixed batch and
    the trajectories equal step by step on a tiny model; this hypothesis asks whether that
    still holds for the whole curriculum-12 budget, where float differences can compound.
    Valid only if every trl run moved its loss and each started where the lab loop did
    (its first-step loss within 1e-4 of the loop's: same weights, same first batch).
    """
    s = bench.s
    beta = s.dpo_beta
    rows, starts, trl_histories = [], [], {}
    for seed in lab.seeds:
        n = len(bench.eval_prompts(seed))
        # SFT
        lab_sft, trl_sft_model = bench.evaluate(seed, "sft"), trl_bench.sft(seed)[0]
        trl_sft_answers = trl_bench.answers(seed, trl_sft_model)
        outcome.record_fraction("sft_same_answers", _same(lab_sft["answers"], trl_sft_answers), n, seed=seed)
        prompts = bench.eval_prompts(seed)
        wf_trl = _mean(bench.task.well_formed(p, a) for p, a in zip(prompts, trl_sft_answers))
        outcome.record("well_formed_sft_lab", lab_sft["well_formed"], seed=seed)
        outcome.record("well_formed_sft_trl", wf_trl, seed=seed)
        # reward model
        lab_rm, rm_history, rm_run = trl_bench.reward(seed)
        held = bench.held_pairs(seed)
        hp = [p.prompt for p in held]
        lab_margin = lab_rm.rewards(bench.tok, hp, [p.chosen for p in held]) - lab_rm.rewards(
            bench.tok, hp, [p.rejected for p in held]
        )
        trl_margin = hf_rewards(rm_run.model, rm_run.tokenizer, hp, [p.chosen for p in held]) - hf_rewards(
            rm_run.model, rm_run.tokenizer, hp, [p.rejected for p in held]
        )
        same_rank = int(((lab_margin > 0) == (trl_margin > 0)).sum())
        outcome.record_fraction("rm_same_ranking", same_rank, len(held), seed=seed)
        outcome.record("rm_acc_lab", pairwise_accuracy(lab_rm, bench.tok, held), seed=seed)
        outcome.record("rm_acc_trl", hf_pairwise_accuracy(rm_run.model, rm_run.tokenizer, held), seed=seed)
        # DPO
        lab_dpo, (trl_policy, dpo_history) = bench.evaluate(seed, beta), trl_bench.dpo(seed)
        trl_answers = trl_bench.answers(seed, trl_policy)
        trl_kl = kl_estimate(trl_policy, bench.sft(seed)[0], bench.tok, prompts, trl_answers)
        trl_score = _mean(vowel_fraction(a) for a in trl_answers)
        outcome.record("score_sft", lab_sft["score"], seed=seed, unit="vowel fraction")
        outcome.record("score_dpo_lab", lab_dpo["score"], seed=seed, unit="vowel fraction")
        outcome.record("score_dpo_trl", trl_score, seed=seed, unit="vowel fraction")
        outcome.record("gain_lab", lab_dpo["score"] - lab_sft["score"], seed=seed, unit="vowel fraction")
        outcome.record("gain_trl", trl_score - lab_sft["score"], seed=seed, unit="vowel fraction")
        outcome.record("kl_dpo_lab", lab_dpo["kl"].mean, seed=seed, unit="nats/answer")
        outcome.record("kl_dpo_trl", trl_kl.mean, seed=seed, unit="nats/answer")
        outcome.record("kl_ratio_trl_over_lab", trl_kl.mean / lab_dpo["kl"].mean, seed=seed)
        outcome.record_fraction("dpo_same_answers", _same(lab_dpo["answers"], trl_answers), n, seed=seed)
        histories = {
            "SFT": (bench.sft(seed)[1], trl_bench.sft(seed)[1]),
            "reward model": (rm_history, rm_run.history),
            "DPO": (bench.dpo(seed, beta)[1], dpo_history),
        }
        for stage, (lab_h, trl_h) in histories.items():
            trl_histories[f"trl {stage}, seed {seed}"] = trl_h
            starts.append((stage, seed, lab_h[0]["loss"], trl_h[0]["loss"]))
            rows.append(
                {
                    "seed": seed,
                    "stage": stage,
                    "lab loss, first -> last": f"{lab_h[0]['loss']:.4f} -> {lab_h[-1]['loss']:.4f}",
                    "trl loss, first -> last": f"{trl_h[0]['loss']:.4f} -> {trl_h[-1]['loss']:.4f}",
                    "largest per-step gap": f"{max(abs(a['loss'] - b['loss']) for a, b in zip(lab_h, trl_h)):.2e}",
                }
            )
    outcome.table("losses", rows, caption="Training losses of the two paths, per stage and seed")
    side = [
        ("SFT well-formed share", "well_formed_sft_lab", "well_formed_sft_trl"),
        ("reward-model held-out accuracy", "rm_acc_lab", "rm_acc_trl"),
        ("vowel score after DPO", "score_dpo_lab", "score_dpo_trl"),
        ("score gain over SFT", "gain_lab", "gain_trl"),
        ("KL(policy || SFT), nats/answer", "kl_dpo_lab", "kl_dpo_trl"),
    ]
    values = outcome.measurements
    outcome.table(
        "side_by_side",
        [
            {
                "outcome": label,
                "written out (lab.rlhf)": round(_mean(values[a][sd] for sd in lab.seeds), 4),
                "trl": round(_mean(values[b][sd] for sd in lab.seeds), 4),
            }
            for label, a, b in side
        ],
        caption="Means over seeds on held-out prompts and pairs",
    )
    seed = lab.seeds[0]
    curves = {}
    for label, h in (("lab DPO", bench.dpo(seed, beta)[1]), ("trl DPO", trl_bench.dpo(seed)[1])):
        curves[label] = ([x["step"] for x in h], [x["loss"] for x in h])
    outcome.plot_lines("dpo_loss_both_paths", curves, xlabel="DPO step", ylabel="DPO loss", title=f"seed {seed}")
    outcome.require(
        "each trl run started where the lab loop did",
        all(abs(a - b) <= 1e-4 for _, _, a, b in starts),
        "first-step losses (lab, trl): " + ", ".join(f"{st} s{sd} {a:.5f}/{b:.5f}" for st, sd, a, b in starts),
    )
    _require_fell(outcome, "every trl run", trl_histories)


def _plain_sft(bench, seed):
    """(model, history): the SFT of test_sft_learns_format with the instruction wrapper
    removed: the same words, each split as "th" -> "ee\\n" (the prompt is the bare prefix,
    the answer the rest of the word), the same steps, batch, lr and seed."""
    s, history = bench.s, []
    prompts, answers = bench.task.sft_examples(s.sft_examples, _gen(seed, "sft_data"))
    n = bench.task.prefix_len
    plain_prompts = [a[:n] for a in answers]
    plain_answers = [a[n:] for a in answers]
    model = sft(
        bench.base(seed),
        bench.tok,
        plain_prompts,
        plain_answers,
        steps=s.sft_steps,
        batch_size=s.sft_batch_size,
        lr=s.sft_lr,
        seed=seed,
        history=history,
    )
    return model, history


@prediction(
    "The instruction format matters: SFT on 'name th: ' -> 'thee' answers held-out prefixes with a known word more "
    "often than the same SFT on the bare 'th' -> 'ee'",
    metric="known_word_instruction",
    expect=greater_than("known_word_plain"),
)
def test_instruction_format_vs_plain_sft(lab, bench, outcome):
    """Does the instruction format matter, against plain SFT on the same words?

    Two SFT runs per seed of the baby GPT on the same words of the training prefixes,
    the same steps, batch, learning rate and seed: the instruction format of the word
    task ("name th: " -> "thee\\n", the SFT model of the format hypothesis) and a plain
    format without the instruction (the bare prefix "th" -> "ee\\n": the model completes
    the word, as in pretraining text). Sample one answer per held-out prompt (prefixes no
    stage saw; the same prefixes and sampling stream for both) and count the answers
    that make a word of the text with the prompt's prefix (a count of prompts per seed,
    compared with an interval for a difference of proportions over all seeds' prompts).
    Valid only if both SFT runs moved their loss in every seed.
    """
    s, task = bench.s, bench.task
    histories = {}
    for seed in lab.seeds:
        prompts = bench.eval_prompts(seed)
        prefixes = [task.prefix_of(p) for p in prompts]
        tuned = bench.evaluate(seed, "sft")
        instructed = sum(task.known_word(p, a) for p, a in zip(prompts, tuned["answers"]))
        plain_model, histories[f"plain, seed {seed}"] = _plain_sft(bench, seed)
        plain = sample_completions(
            plain_model, bench.tok, prefixes, max_new_tokens=s.max_new_tokens, generator=_gen(seed, "eval_samples")
        )
        known_plain = sum(task.known_word(task.prompt(x), x + a) for x, a in zip(prefixes, plain))
        outcome.record_fraction("known_word_instruction", instructed, len(prompts), seed=seed)
        outcome.record_fraction("known_word_plain", known_plain, len(prompts), seed=seed)
        histories[f"instruction, seed {seed}"] = bench.sft(seed)[1]
        if seed == lab.seeds[0]:
            outcome.table(
                "examples",
                [
                    {"prefix": x, "instruction": repr(a), "plain": repr(x + b)}
                    for x, a, b in list(zip(prefixes, tuned["answers"], plain))[: s.example_rows]
                ],
                caption=f"Held-out prefixes, one sample each (seed {seed}, temperature 1)",
            )
    _require_fell(outcome, "every SFT run", histories)
