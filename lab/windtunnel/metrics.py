"""How close a model's predictive distribution is to the exact Bayes posterior, in bits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lab.windtunnel.tasks import Batch, entropy_bits


@dataclass
class Calibration:
    entropy_mae: float  # mean over sequences and positions of |H_model - H_Bayes| (bits)
    mae_of_means: float  # mean over positions of |mean H_model - mean H_Bayes| (the authors' code)
    kl: float  # mean KL(Bayes || model), bits
    tv: float  # mean total-variation distance
    per_position: dict  # name -> (P,) arrays: model_entropy, bayes_entropy, abs_error, kl


def kl_bits(p: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in bits along the last axis; q given as natural-log probabilities. Finite
    unless q gives (numerically) zero to an outcome p allows."""
    p = p.double()
    logq = logq.double()
    terms = torch.where(p > 0, p * (p.log() - logq), torch.zeros_like(p))
    return terms.sum(-1) / np.log(2)


@torch.no_grad()
def predict(model, tokens: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(n, P, C) natural-log predictive distributions, in eval mode, in chunks."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(tokens[i : i + batch_size]) for i in range(0, len(tokens), batch_size)])
    finally:
        model.train(was)


def calibration(logq: torch.Tensor, batch: Batch) -> Calibration:
    """Compare predictions (n, P, C log-probs) with the batch's exact posterior."""
    if logq.shape != batch.posterior.shape:
        raise ValueError(
            f"predictions {tuple(logq.shape)} and posterior {tuple(batch.posterior.shape)} differ in shape"
        )
    h_model = entropy_bits(logq.double().exp())
    h_bayes = batch.posterior.double()
    h_bayes = entropy_bits(h_bayes)
    err = (h_model - h_bayes).abs()
    kl = kl_bits(batch.posterior, logq)
    tv = 0.5 * (batch.posterior.double() - logq.double().exp()).abs().sum(-1)
    per = {
        "model_entropy": h_model.mean(0).numpy(),
        "bayes_entropy": h_bayes.mean(0).numpy(),
        "abs_error": err.mean(0).numpy(),
        "kl": kl.mean(0).numpy(),
    }
    return Calibration(
        entropy_mae=err.mean().item(),
        mae_of_means=(h_model.mean(0) - h_bayes.mean(0)).abs().mean().item(),
        kl=kl.mean().item(),
        tv=tv.mean().item(),
        per_position=per,
    )


def context_blind_floor(batch: Batch) -> float:
    """Entropy MAE (bits) of the best predictor that ignores the context: at each scored
    position the posterior averaged over the batch's sequences. A model must beat it to
    have used the context at all (bijection without replacement: the uniform floor)."""
    marginal = batch.posterior.double().mean(0, keepdim=True).expand_as(batch.posterior)
    return (entropy_bits(marginal) - entropy_bits(batch.posterior)).abs().mean().item()


def bayes_loss_nats(batch: Batch) -> float:
    """Expected cross-entropy (nats) of the exact posterior on this batch: the lowest training
    loss a model can reach in expectation (the mean posterior entropy, in nats)."""
    return batch.entropy.double().mean().item() * float(np.log(2))


def context_blind_kl_floor(batch: Batch) -> float:
    """The lowest mean KL(Bayes || model) in bits that a predictor ignoring the context can
    reach on this batch: KL to the per-position average posterior (which minimises it),
    i.e. how much the context tells about the answer. Unlike the entropy MAE, no
    context-blind predictor can beat it (a context-blind model can match an entropy
    without knowing which answers are possible)."""
    marginal = batch.posterior.double().mean(0, keepdim=True).expand_as(batch.posterior)
    return kl_bits(batch.posterior, marginal.clamp_min(1e-300).log()).mean().item()
