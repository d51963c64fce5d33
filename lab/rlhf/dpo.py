"""DPO (Rafailov et al. 2023) against a frozen reference, and a Monte-Carlo estimate of
how far the policy drifted from it, KL(pi || ref). No library implements DPO in the
pinned environment (trl is not installed), hence `dpo_loss` here, tested on
hand-computed values."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lab.checks import POSITIVE, POSITIVE_INT
from lab.rlhf.preferences import PreferencePair, pair_tensors, stack_padded
from lab.rlhf.sequences import device_of, generator, sequence_logprobs, token_logprobs
from lab.rlhf.sft import adamw


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Mean DPO loss (Rafailov et al. 2023, eq. 7) from sequence log-probabilities:
    -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))).
    log 2 when pi equals ref; falls as pi moves mass from y_l to y_w relative to ref."""
    beta = float(POSITIVE.check("beta", beta))
    shapes = {tuple(t.shape) for t in (pi_chosen, pi_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"the four log-prob tensors must share one shape, got {sorted(shapes)}")
    margin = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def dpo(
    policy,
    reference,
    tokenizer,
    pairs: Sequence[PreferencePair],
    *,
    beta: float,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    history: list | None = None,
):
    """A copy of `policy` trained by DPO on `pairs` against the frozen `reference` (whose
    log-probabilities are computed once, up front). AdamW at a constant lr on random
    batches. `history` gets per step the loss, the mean implicit reward margin
    beta * ((pi - ref)(y_w) - (pi - ref)(y_l)) and the share of pairs it ranks right."""
    beta = float(POSITIVE.check("beta", beta))
    POSITIVE_INT.check("steps", steps)
    POSITIVE_INT.check("batch_size", batch_size)
    g = generator(seed)
    pol = copy.deepcopy(policy).train()
    dev = device_of(pol)
    block = pol.config.block_size
    (ci, cm, _), (ri, rm_, _) = pair_tensors(tokenizer, pairs, block)
    prompts = [p.prompt for p in pairs]
    ref_c = sequence_logprobs(reference, tokenizer, prompts, [p.chosen for p in pairs]).to(dev)
    ref_r = sequence_logprobs(reference, tokenizer, prompts, [p.rejected for p in pairs]).to(dev)
    opt = adamw(pol.parameters(), lr)
    for step in range(steps):
        rows = torch.randint(len(ci), (batch_size,), generator=g)
        idx = stack_padded(ci[rows], ri[rows]).to(dev)
        mask = stack_padded(cm[rows], rm_[rows]).to(dev)
        logp = token_logprobs(pol, idx, mask)
        pc, pr = logp[:batch_size], logp[batch_size:]
        loss = dpo_loss(pc, pr, ref_c[rows.to(dev)], ref_r[rows.to(dev)], beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if history is not None:
            with torch.no_grad():
                margin = beta * ((pc - ref_c[rows.to(dev)]) - (pr - ref_r[rows.to(dev)]))
            history.append(
                {
                    "step": step + 1,
                    "loss": float(loss.detach()),
                    "margin": float(margin.mean()),
                    "accuracy": float((margin > 0).float().mean()),
                }
            )
    return pol.eval()


# ---------------------------------------------------------------- KL to the reference


@dataclass(frozen=True)
class KLEstimate:
    """Monte-Carlo KL(pi || ref) = E_{y ~ pi}[log pi(y|x) - log ref(y|x)], nats per sequence."""

    mean: float
    sem: float  # standard error of the mean over samples
    n: int
    samples: tuple[float, ...] = field(repr=False, default=())


def kl_estimate(policy, reference, tokenizer, prompts: Sequence[str], completions: Sequence[str]) -> KLEstimate:
    """KL(pi || ref) from completions sampled from `policy` for `prompts` (one each):
    the mean of log pi(y|x) - log ref(y|x). Unbiased; single samples can be negative,
    and it is exactly 0 when the two models are the same."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"need equally many (>= 1) prompts and completions, got {len(prompts)} and {len(completions)}")
    d = (
        sequence_logprobs(policy, tokenizer, prompts, completions)
        - sequence_logprobs(reference, tokenizer, prompts, completions)
    ).double()
    n = len(d)
    sem = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    return KLEstimate(float(d.mean()), sem, n, tuple(d.tolist()))
