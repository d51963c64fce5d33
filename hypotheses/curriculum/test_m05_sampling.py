import math

import pytest
import torch

from lab.data import split_text
from lab.diversity import distinct_n, loop_start
from lab.inspect.texts import windows
from lab.report import at_least, at_most, greater_than, less_than, prediction
from lab.report.intervals import spearman
from lab.truncation import entropy_nats, top_p_matching_entropy, truncated_probs

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


# The seed's "focused" settings (temperature 0.7, top_k=10, top_p=0.9) name these filters.
TOP_K = 10
TOP_P = 0.9
# A token the untruncated model gives less than this is "unlikely" (uniform over 65 chars: 1.5%).
UNLIKELY = 0.01
# Top-k and top-p count as matched when their mean entropies differ by at most this.
MATCH_TOLERANCE = 0.02  # nats


@prediction(
    "Top-k sampling (k = 10) yields lower per-token surprisal under the model than pure sampling at T=1",
    metric="surprisal_top_k",
    expect=less_than("surprisal_pure"),
)
def test_top_k_lowers_surprisal(lab, char_data, baby_runs, outcome, require_trained):
    """Does top-k sampling lower the surprisal of what is sampled?

    The top-p hypothesis' method with top-k = 10 instead (the seed's "focused" setting):
    with each seed's baby GPT, sample from every prompt at T=1 unrestricted and with
    top-k = 10, score each sampled token by its surprisal (-ln p) under the model's
    unmodified T=1 distribution, and average per token. Compared per seed.
    """
    inf = lab.profile.inference
    prompts = _prompts(lab, char_data, inf.n_prompts)
    for seed, run in baby_runs.items():
        pure = _sample(run.model, prompts, inf.sample_len, seed=seed, temperature=1.0)
        top_k = _sample(run.model, prompts, inf.sample_len, seed=seed, temperature=1.0, top_k=TOP_K)
        outcome.record("surprisal_pure", _mean_surprisal(run.model, prompts, pure), seed=seed, unit="nats/token")
        outcome.record("surprisal_top_k", _mean_surprisal(run.model, prompts, top_k), seed=seed, unit="nats/token")
    require_trained(baby_runs, "each seed's baby GPT")


@torch.no_grad()
def _next_token_logits(lab, data, model) -> torch.Tensor:
    """(N, V): the model's logits at every position of the profile's validation windows."""
    x, _ = windows(data.val, lab.profile.sampling.n_windows, model.config.block_size)
    logits, _ = model(x)
    return logits.reshape(-1, logits.size(-1)).float()


@prediction(
    "Nucleus sampling at p = 0.9 keeps on average at most {bound} of the 65 characters",
    metric="support_top_p",
    expect=at_most(12),
)
@prediction(
    "Truncating at p = 0.9 removes at least {bound} of the mean entropy of the model's next-character distribution",
    metric="entropy_removed_top_p",
    expect=at_least(0.2),
)
def test_truncation_entropy_and_support(lab, char_data, baby_runs, outcome, require_trained):
    """How much entropy and support do top-k and top-p leave of the model's next-token distributions?

    For each seed's baby GPT, take its next-character distribution (T=1) at every
    position of the profile's validation windows (each the model's context long) and
    truncate it with top-k for every k of the profile's grid and with top-p for every p
    of its grid, renormalising what is kept, exactly as sampling does. For each, the
    mean entropy (nats) and the mean support (characters kept) over positions. The
    statistics are the mean support at p = 0.9 and the share of the untruncated mean
    entropy that p = 0.9 removes (1 - H(p=0.9) / H(full)), one value per seed. The
    spread of the support over positions (its standard deviation) is recorded too: top-k
    keeps k everywhere, top-p as many as the context needs.
    """
    s = lab.profile.sampling
    entropy_curves, support_curves = {}, {}
    for seed, run in baby_runs.items():
        logits = _next_token_logits(lab, char_data, run.model)
        full = entropy_nats(truncated_probs(logits)).mean().item()
        by_k = [truncated_probs(logits, top_k=k) for k in s.top_ks]
        by_p = [truncated_probs(logits, top_p=p) for p in s.top_ps]
        nucleus = truncated_probs(logits, top_p=TOP_P)
        support = (nucleus > 0).sum(-1).float()
        outcome.record("entropy_full", full, seed=seed, unit="nats")
        outcome.record("support_top_p", support.mean().item(), seed=seed, unit="characters")
        outcome.record("support_top_p_std", support.std().item(), seed=seed, unit="characters")
        outcome.record("entropy_removed_top_p", 1 - entropy_nats(nucleus).mean().item() / full, seed=seed)
        entropy_curves[f"top-k, seed {seed}"] = (list(s.top_ks), [entropy_nats(q).mean().item() for q in by_k])
        support_curves[f"top-p, seed {seed}"] = (list(s.top_ps), [(q > 0).sum(-1).float().mean().item() for q in by_p])
        entropy_curves[f"top-p (x = 100 p), seed {seed}"] = (
            [100 * p for p in s.top_ps],
            [entropy_nats(q).mean().item() for q in by_p],
        )
    outcome.plot_lines(
        "entropy",
        entropy_curves,
        xlabel="k, or 100 p",
        ylabel="mean entropy (nats)",
        title="Entropy left by truncation",
    )
    outcome.plot_lines(
        "support", support_curves, xlabel="p", ylabel="mean characters kept", title="Support of the nucleus"
    )
    require_trained(baby_runs, "each seed's baby GPT")


@prediction(
    "At matched mean entropy, top-k (k = 10) puts more of its probability on unlikely characters (below 1% under "
    "the untruncated model) than top-p does",
    metric="unlikely_mass_top_k",
    expect=greater_than("unlikely_mass_top_p"),
)
def test_top_k_vs_top_p_at_matched_entropy(lab, char_data, baby_runs, outcome, require_trained):
    """At matched entropy, does top-k admit more unlikely tokens than top-p?

    "Use one, not both": the two filters cut the same distribution differently. For
    each seed's baby GPT, take its next-character distributions (T=1) at every
    position of the profile's validation windows, truncate them with top-k = 10, and
    find by bisection the top-p whose truncated distributions have the same mean
    entropy. Top-k keeps 10 characters everywhere, so where the model is sure it keeps
    characters the model all but rules out, and where it is unsure it cuts plausible
    ones; top-p keeps as many as the mass needs. The statistic is the probability
    each truncated distribution puts on characters the untruncated model gives less
    than 1%: the expected share of sampled characters that are unlikely (exact, no
    sampling), averaged over positions, per seed. Valid when the two mean entropies
    match within 0.02 nats.
    """
    for seed, run in baby_runs.items():
        logits = _next_token_logits(lab, char_data, run.model)
        unlikely = torch.softmax(logits, -1) < UNLIKELY
        by_k = truncated_probs(logits, top_k=TOP_K)
        h_k = entropy_nats(by_k).mean().item()
        p = top_p_matching_entropy(logits, h_k)
        by_p = truncated_probs(logits, top_p=p)
        h_p = entropy_nats(by_p).mean().item()
        outcome.require(
            f"seed {seed}: entropies matched",
            abs(h_k - h_p) <= MATCH_TOLERANCE,
            f"top-k {h_k:.3f} vs top-p {p:.3f}: {h_p:.3f} nats (tolerance {MATCH_TOLERANCE})",
        )
        outcome.record("matched_top_p", p, seed=seed)
        outcome.record("unlikely_mass_top_k", (by_k * unlikely).sum(-1).mean().item(), seed=seed)
        outcome.record("unlikely_mass_top_p", (by_p * unlikely).sum(-1).mean().item(), seed=seed)
    require_trained(baby_runs, "each seed's baby GPT")
