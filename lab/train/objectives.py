"""Pretraining objectives: what a batch of text is turned into before the loss.

- clm (causal LM): predict every next token, causal attention. GPT.
- prefix_lm: each row gets a random prefix length k in [1, T-1]; the first k
  positions see each other (bidirectional), the rest are causal; only the
  tokens after the prefix are predicted. T5/UniLM's prefix LM.
- mlm (masked LM): a fraction of positions is replaced by a [MASK] id, full
  bidirectional attention, only the masked tokens are predicted. BERT. With
  mask_strategy "mask" every chosen position becomes [MASK]; with "bert",
  BERT's 80/10/10: 80% [MASK], 10% a random token, 10% left unchanged (all
  still predicted). The [MASK] id is the model's last vocabulary id, so an MLM
  model's vocab_size is the tokenizer's plus one.

Each returns (inputs, targets, prefix_len) for GPT.forward(inputs, targets,
prefix_len=...); targets of -1 are not scored.
"""

from __future__ import annotations

import torch

from lab.checks import check_choice

OBJECTIVES = ("clm", "prefix_lm", "mlm")
MASK_STRATEGIES = ("mask", "bert")


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def objective_batch(
    objective: str,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    generator: torch.Generator,
    mask_prob: float = 0.15,
    mask_id: int | None = None,
    mask_strategy: str = "mask",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Turn a causal batch (x, y = x shifted by one) into the objective's (inputs, targets, prefix_len).

    Random choices (prefix lengths, masked positions, BERT's replacements) are drawn
    from `generator` on the CPU, so they are reproducible across devices."""
    check_objective(objective)
    check_choice("mask_strategy", mask_strategy, MASK_STRATEGIES)
    if objective == "clm":
        return x, y, None
    B, T = x.shape
    if objective == "prefix_lm":
        if T < 2:
            raise ValueError(f"prefix_lm needs sequences of at least 2 tokens, got T={T}")
        k = torch.randint(1, T, (B,), generator=generator).to(x.device)
        # position i predicts y[i] = x[i+1]; score only tokens after the prefix (i + 1 >= k)
        scored = torch.arange(T, device=x.device).unsqueeze(0) >= (k - 1).unsqueeze(1)
        return x, torch.where(scored, y, torch.full_like(y, -1)), k
    if mask_id is None:
        raise ValueError("mlm needs mask_id (the model's last vocabulary id)")
    masked = torch.rand(B, T, generator=generator) < mask_prob
    # every row predicts at least one token, so no row is wasted
    forced = torch.randint(0, T, (B,), generator=generator)
    masked[torch.arange(B), forced] = True
    masked = masked.to(x.device)
    inputs = torch.where(masked, torch.full_like(x, mask_id), x)
    if mask_strategy == "bert":
        inputs = _bert_replace(inputs, x, masked, mask_id, generator)
    targets = torch.where(masked, x, torch.full_like(x, -1))
    return inputs, targets, torch.full((B,), T, dtype=torch.long, device=x.device)


def _bert_replace(inputs, x, masked, mask_id: int, generator: torch.Generator) -> torch.Tensor:
    """BERT's 80/10/10 on the chosen positions: keep 80% [MASK], put a uniformly random
    non-[MASK] id in 10%, the original token back in 10%. Drawn only for "bert", after
    the positions, so the "mask" strategy's draws are unchanged."""
    if mask_id < 1:
        raise ValueError(f"mask_strategy 'bert' needs a non-[MASK] id to draw from, got mask_id={mask_id}")
    B, T = x.shape
    u = torch.rand(B, T, generator=generator).to(x.device)
    random_ids = torch.randint(0, mask_id, (B, T), generator=generator).to(device=x.device, dtype=x.dtype)
    inputs = torch.where(masked & (u >= 0.8) & (u < 0.9), random_ids, inputs)
    return torch.where(masked & (u >= 0.9), x, inputs)


@torch.no_grad()
def next_token_nll(model, objective: str, windows: torch.Tensor, positions) -> torch.Tensor:
    """-log p(windows[:, t] | windows[:, :t]) for each t in positions, under each objective's
    own way of predicting a next token: (B, len(positions)) in nats.

    - clm: causal forward, the logits at t-1.
    - prefix_lm: the context x[:t] is the prefix (bidirectional), the logits at t-1.
    - mlm: x[:t] followed by one [MASK], bidirectional, the logits at the mask.
    The causal LM needs one forward for all positions; the others one per position.
    """
    check_objective(objective)
    positions = list(positions)
    B, L = windows.shape
    if not positions or min(positions) < 1 or max(positions) >= L:
        raise ValueError(f"positions must lie in [1, {L - 1}] (a context and a target), got {positions}")
    was_training = model.training
    model.eval()
    try:
        out = []
        if objective == "clm":
            logp = model(windows[:, : max(positions)])[0].log_softmax(-1)
            for t in positions:
                out.append(-logp[:, t - 1].gather(1, windows[:, t : t + 1]).squeeze(1))
        for t in positions if objective != "clm" else ():
            if objective == "prefix_lm":
                logits = model(windows[:, :t], prefix_len=t)[0][:, -1]
            else:
                mask = torch.full((B, 1), model.config.vocab_size - 1, dtype=windows.dtype, device=windows.device)
                inputs = torch.cat((windows[:, :t], mask), dim=1)
                logits = model(inputs, prefix_len=t + 1)[0][:, -1]
            out.append(-logits.log_softmax(-1).gather(1, windows[:, t : t + 1]).squeeze(1))
        return torch.stack(out, dim=1)
    finally:
        model.train(was_training)
