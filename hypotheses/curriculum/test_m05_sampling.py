import math

import pytest
import torch

from lab.data import split_text
from lab.diversity import distinct_n, loop_start
from lab.report import at_least, less_than, prediction
from lab.report.intervals import spearman

pytestmark = [pytest.mark.curriculum, pytest.mark.m05_sampling]


def _prompts(lab, data, n: int, length: int = 16) -> torch.Tensor:
    """`n` prompts cut at evenly spaced places from the validation text."""
    _, val = split_text(lab.corpus("tinyshakespeare"))
    step = len(val) // (n + 1)
    ids = [data.tokenizer.encode(val[(i + 1) * step : (i + 1) * step + length]) for i in range(n)]
    return torch.tensor(ids, dtype=torch.long)


def _sample(model, prompts, n_tokens, *, seed, **kw) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    out = model.generate(prompts, n_tokens, generator=gen, crop=True, **kw)
    return out[:, prompts.shape[1] :].tolist()


@prediction(
    "Distinct-4 diversity of samples rises with temperature: it goes up at a share >= {low} of the steps up the "
    "temperature grid (all seeds' steps pooled)",
    metric="distinct4_rising_steps",
    expect=at_least(0.75),
)
def test_diversity_rises_with_temperature(lab, char_data, baby_runs, outcome, require_trained):
    """Does sample diversity rise with the sampling temperature?

    For each seed's baby GPT (char-level tiny Shakespeare), sample the profile's
    sample length from each of the profile's prompts (cut from the validation text) at
    every temperature of the grid, and pool distinct-4 (unique 4-grams / all 4-grams)
    over the samples. The statistic is the share of steps up the temperature grid (from
    each temperature to the next) at which distinct-4 rises: a count of steps per seed,
    judged with an exact binomial interval over all seeds' steps. Spearman's rho between
    temperature and distinct-4 is recorded per seed too. Context beyond the model's block
    size is cropped, as nanoGPT does.
    """
    inf = lab.profile.inference
    prompts = _prompts(lab, char_data, inf.n_prompts)
    curves = {}
    for seed, run in baby_runs.items():
        d4 = [
            distinct_n(_sample(run.model, prompts, inf.sample_len, seed=seed, temperature=t), 4)
            for t in inf.temperatures
        ]
        outcome.record("rho_temperature_distinct4", spearman(inf.temperatures, d4), seed=seed)
        rises = sum(b > a for a, b in zip(d4, d4[1:]))
        outcome.record_fraction("distinct4_rising_steps", rises, len(d4) - 1, seed=seed, unit="share of steps")
        curves[f"seed {seed}"] = (inf.temperatures, d4)
    outcome.plot_lines(
        "distinct4", curves, xlabel="temperature", ylabel="distinct-4", title="Sample diversity vs temperature"
    )
    require_trained(baby_runs, "each seed's baby GPT")


@prediction(
    "Greedy decoding of the Shakespeare model falls into a repeating loop within 200 tokens for at least 80% of "
    "prompts",
    metric="loop_fraction",
    expect=at_least(0.8),
)
def test_greedy_decoding_loops(lab, char_data, baby_runs, outcome, require_trained):
    """Does greedy decoding fall into a repeating loop?

    Greedy-decode (temperature 0) the profile's sample length (200 characters on the
    cpu profile) from each prompt with each seed's baby GPT, and call a continuation
    looped when its tail is periodic (some period p <= 100 repeated at least twice
    through to the end: tokens[i] == tokens[i + p] from the loop start on). The
    statistic is the share of prompts that looped: a count of prompts per seed, judged
    with an exact binomial interval over all seeds' prompts. A char model conditions
    on its last block-size characters only, so a repeated window means a cycle forever.
    """
    inf = lab.profile.inference
    prompts = _prompts(lab, char_data, inf.n_prompts)
    rows = []
    for seed, run in baby_runs.items():
        samples = _sample(run.model, prompts, inf.sample_len, seed=seed, temperature=0.0)
        starts = [loop_start(s, max_period=100) for s in samples]
        outcome.record_fraction("loop_fraction", sum(s is not None for s in starts), len(starts), seed=seed)
        if seed == min(baby_runs):
            for s, start in zip(samples[:3], starts[:3]):
                rows.append(
                    {
                        "loop starts at": start if start is not None else "no loop",
                        "greedy continuation": char_data.tokenizer.decode(s).replace("\n", " / ")[:160],
                    }
                )
    outcome.table("greedy_samples", rows, caption="Greedy continuations of the first prompts (first seed)")
    require_trained(baby_runs, "each seed's baby GPT")


@torch.no_grad()
def _mean_surprisal(model, prompts, samples) -> float:
    """Mean -log p (nats) of sampled tokens under the model's own T=1 distribution."""
    seq = torch.cat([prompts, torch.tensor(samples)], dim=1)
    total, count = 0.0, 0
    for t in range(prompts.shape[1], seq.shape[1]):
        ctx = seq[:, max(0, t - model.config.block_size) : t]
        logp = torch.log_softmax(model(ctx)[0][:, -1], dim=-1)
        total += -logp.gather(1, seq[:, t : t + 1]).sum().item()
        count += seq.shape[0]
    return total / count


@prediction(
    "Nucleus sampling (top-p 0.9) yields lower per-token surprisal under the model than pure sampling at T=1",
    metric="surprisal_top_p",
    expect=less_than("surprisal_pure"),
)
def test_top_p_lowers_surprisal(lab, char_data, baby_runs, outcome, require_trained):
    """Does top-p (nucleus) sampling lower the surprisal of what is sampled?

    With each seed's baby GPT, sample from every prompt at T=1 twice: unrestricted, and
    with top-p = 0.9. Score each sampled token by its surprisal (-ln p) under the
    model's unmodified T=1 distribution and average per token. Compared per seed.
    """
    inf = lab.profile.inference
    prompts = _prompts(lab, char_data, inf.n_prompts)
    for seed, run in baby_runs.items():
        pure = _sample(run.model, prompts, inf.sample_len, seed=seed, temperature=1.0)
        nucleus = _sample(run.model, prompts, inf.sample_len, seed=seed, temperature=1.0, top_p=0.9)
        outcome.record("surprisal_pure", _mean_surprisal(run.model, prompts, pure), seed=seed, unit="nats/token")
        outcome.record("surprisal_top_p", _mean_surprisal(run.model, prompts, nucleus), seed=seed, unit="nats/token")
    outcome.note(
        f"for reference, the uniform distribution over {char_data.vocab_size} characters has surprisal "
        f"{math.log(char_data.vocab_size):.2f} nats"
    )
    require_trained(baby_runs, "each seed's baby GPT")
