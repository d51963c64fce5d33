"""Bayesian wind tunnels (Aggarwal, Dalal & Misra, arXiv 2512.22471): tasks whose exact
posterior is known in closed form and which cannot be memorised, each with its oracle.

Bijection elimination. Every sequence draws a fresh random bijection pi of V values.
Keys are tokens 0..V-1, values V..2V-1 (the authors' released checkpoint's
"separate key/value vocabulary" format, no separators):

    k1 v1 k2 v2 ... k_{L-1} v_{L-1} k_L        (2L - 1 tokens)

At every key position the model predicts the value that follows. Keys are drawn
without replacement (the paper's main setting): the posterior is uniform over the
values not yet revealed, entropy log2(V - t) at the t-th key. With replacement, a
key seen before has a certain answer and a new one is uniform over the unrevealed
values: the entropy then varies across sequences at a fixed position.

HMM state tracking. Every sequence draws a fresh HMM (S states, O symbols): rows of
the transition and emission matrices ~ Dirichlet(1), floored at 0.05 and rounded to
hundredths (so the model can be given them exactly). The matrices are written into
the context as probability tokens, then the observations:

    [TRANS] T00 ... T(S-1)(S-1) [EMIT] E00 ... [SEP] [OBS] o0 [OBS] o1 ... [OBS] o(K-1)

At each observation token the model outputs a distribution over hidden states, and
the target is the filtering posterior p(s_t | o_0..o_t), exact by the forward algorithm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import permutations

import numpy as np
import torch


@dataclass
class Batch:
    """Sequences and their exact Bayes answers.

    tokens: (n, T) model input; positions: (P,) the positions where a prediction is
    scored; targets: (n, T) next-token ids at those positions, -1 elsewhere (for the
    language-model loss; HMM leaves it all -1); posterior: (n, P, C) the exact
    predictive distribution over the C answer classes at each scored position;
    entropy: (n, P) its entropy in bits."""

    tokens: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    posterior: torch.Tensor
    entropy: torch.Tensor

    def to(self, device) -> Batch:
        """The same batch on `device` (the oracle's float64 posterior included)."""
        return Batch(*(t.to(device) for t in (self.tokens, self.positions, self.targets, self.posterior, self.entropy)))

    def head(self, n: int) -> Batch:
        """The first n sequences."""
        return Batch(self.tokens[:n], self.positions, self.targets[:n], self.posterior[:n], self.entropy[:n])


def entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of distributions along the last axis (0 log 0 = 0)."""
    p = p.double() if p.dtype != torch.float64 else p
    return -(p * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum(-1)


# ---------------------------------------------------------------- bijection elimination


@dataclass(frozen=True)
class BijectionTask:
    n_values: int  # V: keys and values each take V ids
    n_keys: int  # L: keys per sequence (<= V without replacement)
    with_replacement: bool = False

    def __post_init__(self):
        if not isinstance(self.n_values, int) or self.n_values < 2:
            raise ValueError(f"n_values must be an int >= 2, got {self.n_values!r}")
        if not isinstance(self.n_keys, int) or self.n_keys < 1:
            raise ValueError(f"n_keys must be an int >= 1, got {self.n_keys!r}")
        if not self.with_replacement and self.n_keys > self.n_values:
            raise ValueError(
                f"a bijection of {self.n_values} values runs out of keys after {self.n_values}: "
                f"n_keys={self.n_keys} needs n_values >= {self.n_keys} (or with_replacement=True)"
            )

    @property
    def name(self) -> str:
        return f"bijection-V{self.n_values}-L{self.n_keys}" + ("-repl" if self.with_replacement else "")

    @property
    def vocab_size(self) -> int:
        return 2 * self.n_values

    @property
    def seq_len(self) -> int:
        return 2 * self.n_keys - 1

    @property
    def n_classes(self) -> int:
        return self.n_values

    @property
    def positions(self) -> torch.Tensor:
        return torch.arange(0, self.seq_len, 2)

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """n sequences, each with its own uniformly random bijection."""
        V, L = self.n_values, self.n_keys
        perm = torch.argsort(torch.rand(n, V, generator=generator), dim=1)  # pi: key -> value
        if self.with_replacement:
            keys = torch.randint(V, (n, L), generator=generator)
        else:
            keys = torch.argsort(torch.rand(n, V, generator=generator), dim=1)[:, :L]
        values = perm.gather(1, keys)
        tokens = torch.empty(n, 2 * L, dtype=torch.long)
        tokens[:, 0::2] = keys
        tokens[:, 1::2] = values + V
        tokens = tokens[:, :-1]  # the last value is only a target
        targets = torch.full_like(tokens, -1)
        targets[:, 0::2] = values + V
        posterior = bijection_posterior(keys, values, V)
        return Batch(tokens, self.positions, targets, posterior, entropy_bits(posterior).float())


def bijection_posterior(keys: torch.Tensor, values: torch.Tensor, n_values: int) -> torch.Tensor:
    """(n, L, V) exact posterior over the value of key t given pairs 0..t-1: certain if the
    key was seen (its value is the one it had then, which is values[t]), else uniform over
    the values not yet revealed (a uniform prior over bijections, conditioned by
    elimination). Vectorised over sequences and positions."""
    n, L = keys.shape
    onehot = torch.nn.functional.one_hot(values, n_values).double()  # (n, L, V)
    revealed = (onehot.cumsum(1) - onehot) > 0  # values revealed strictly before t
    free = (~revealed).double()
    uniform = free / free.sum(-1, keepdim=True)
    earlier = torch.ones(L, L, dtype=torch.bool).tril(-1)  # [t, s]: s < t
    seen = ((keys.unsqueeze(2) == keys.unsqueeze(1)) & earlier).any(-1)  # (n, L): key t appeared before
    return torch.where(seen.unsqueeze(-1), onehot, uniform)


def bijection_posterior_brute_force(pairs: list[tuple[int, int]], query: int, n_values: int) -> np.ndarray:
    """The same posterior by enumerating all V! bijections consistent with the pairs (tiny V)."""
    counts = np.zeros(n_values)
    for pi in permutations(range(n_values)):
        if all(pi[k] == v for k, v in pairs):
            counts[pi[query]] += 1
    return counts / counts.sum()


def uniform_floor_bits(n_values: int, n_keys: int) -> float:
    """Entropy MAE of a context-blind predictor (uniform over all V values at every key),
    without replacement: log2 V - mean_t log2(V - t)."""
    return math.log2(n_values) - sum(math.log2(n_values - t) for t in range(n_keys)) / n_keys


# ---------------------------------------------------------------- HMM state tracking

PROB_FLOOR = 0.05


@dataclass(frozen=True)
class HMMTask:
    n_states: int = 5
    n_symbols: int = 5
    length: int = 20  # K observations

    def __post_init__(self):
        for name in ("n_states", "n_symbols", "length"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (2 if name != "length" else 1):
                raise ValueError(f"{name} must be an int >= {2 if name != 'length' else 1}, got {v!r}")
        if max(self.n_states, self.n_symbols) * PROB_FLOOR > 1:
            raise ValueError(f"rows of {max(self.n_states, self.n_symbols)} entries cannot all be >= {PROB_FLOOR}")

    # token ids: probabilities 0.05..1.00 in hundredths, then markers, then symbols
    @property
    def n_prob_tokens(self) -> int:
        return 100 - round(PROB_FLOOR * 100) + 1

    @property
    def TRANS(self) -> int:
        return self.n_prob_tokens

    @property
    def EMIT(self) -> int:
        return self.n_prob_tokens + 1

    @property
    def SEP(self) -> int:
        return self.n_prob_tokens + 2

    @property
    def OBS(self) -> int:
        return self.n_prob_tokens + 3

    @property
    def vocab_size(self) -> int:
        return self.n_prob_tokens + 4 + self.n_symbols

    @property
    def header_len(self) -> int:
        return 3 + self.n_states * self.n_states + self.n_states * self.n_symbols

    @property
    def seq_len(self) -> int:
        return self.header_len + 2 * self.length

    @property
    def n_classes(self) -> int:
        return self.n_states

    @property
    def name(self) -> str:
        return f"hmm-S{self.n_states}-O{self.n_symbols}-K{self.length}"

    @property
    def positions(self) -> torch.Tensor:
        return self.header_len + 1 + 2 * torch.arange(self.length)

    def prob_token(self, hundredths: np.ndarray) -> np.ndarray:
        return hundredths - round(PROB_FLOOR * 100)

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
        S, n_obs, K = self.n_states, self.n_symbols, self.length
        T = discretized_rows(rng.dirichlet(np.ones(S), size=(n, S)).reshape(n * S, S)).reshape(n, S, S)
        E = discretized_rows(rng.dirichlet(np.ones(n_obs), size=(n, S)).reshape(n * S, n_obs)).reshape(n, S, n_obs)
        _, obs = sample_hmm_batch(T / 100, E / 100, K, rng)
        posterior = forward_posterior_batch(T / 100, E / 100, obs)
        header = np.concatenate(
            [
                np.full((n, 1), self.TRANS),
                self.prob_token(T).reshape(n, -1),
                np.full((n, 1), self.EMIT),
                self.prob_token(E).reshape(n, -1),
                np.full((n, 1), self.SEP),
            ],
            axis=1,
        )
        body = np.empty((n, 2 * K), dtype=np.int64)
        body[:, 0::2] = self.OBS
        body[:, 1::2] = self.n_prob_tokens + 4 + obs
        tok = torch.from_numpy(np.concatenate([header, body], axis=1).astype(np.int64))
        post = torch.from_numpy(posterior)
        return Batch(tok, self.positions, torch.full_like(tok, -1), post, entropy_bits(post).float())


def discretized_rows(p: np.ndarray, floor: float = PROB_FLOOR) -> np.ndarray:
    """Rows of p floored at `floor`, renormalised and rounded to integer hundredths that sum
    to exactly 100, none below the floor."""
    lo = round(floor * 100)
    p = np.maximum(p, floor)
    p = p / p.sum(-1, keepdims=True)
    h = np.maximum(np.round(p * 100).astype(np.int64), lo)
    # one hundredth at a time, all rows at once: take it from the largest entry still above
    # the floor of a row that sums to more than 100, give it to the largest of one below
    while True:
        total = h.sum(-1)
        over, under = np.flatnonzero(total > 100), np.flatnonzero(total < 100)
        if not over.size and not under.size:
            return h
        h[over, np.argmax(np.where(h[over] > lo, h[over], -1), axis=-1)] -= 1
        h[under, np.argmax(h[under], axis=-1)] += 1


def check_stochastic(m: np.ndarray, name: str) -> None:
    """ValueError naming the first row of m that is not a probability distribution."""
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {m.shape}")
    if (m < 0).any() or not np.isfinite(m).all():
        r = int(np.argwhere((m < 0) | ~np.isfinite(m))[0][0])
        raise ValueError(f"{name} row {r} has negative or non-finite entries: {m[r].tolist()}")
    sums = m.sum(-1)
    bad = np.flatnonzero(np.abs(sums - 1) > 1e-6)
    if bad.size:
        r = int(bad[0])
        raise ValueError(f"{name} is not row-stochastic: row {r} sums to {sums[r]:.6g}, expected 1")


def _categorical(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of the (n, C) probability rows."""
    u = rng.random((len(p), 1))
    return np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), p.shape[1] - 1)


def sample_hmm_batch(T: np.ndarray, E: np.ndarray, length: int, rng: np.random.Generator):
    """(states, observations), each (n, length): one run of each of n HMMs, T (n, S, S),
    E (n, S, O), starting uniformly."""
    n, S, _ = E.shape
    rows = np.arange(n)
    states = np.empty((n, length), dtype=np.int64)
    obs = np.empty((n, length), dtype=np.int64)
    s = rng.integers(0, S, size=n)
    for t in range(length):
        states[:, t] = s
        obs[:, t] = _categorical(E[rows, s], rng)
        s = _categorical(T[rows, s], rng)
    return states, obs


def forward_posterior_batch(T: np.ndarray, E: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """(n, K, S) forward_posterior for n HMMs at once (uniform start), T (n, S, S), E (n, S, O),
    obs (n, K)."""
    n, S, _ = E.shape
    rows = np.arange(n)
    out = np.empty((n, obs.shape[1], S))
    alpha = E[rows, :, obs[:, 0]] / S
    out[:, 0] = alpha / alpha.sum(-1, keepdims=True)
    for t in range(1, obs.shape[1]):
        alpha = np.einsum("ni,nij->nj", out[:, t - 1], T) * E[rows, :, obs[:, t]]
        out[:, t] = alpha / alpha.sum(-1, keepdims=True)
    return out


def forward_posterior(T: np.ndarray, E: np.ndarray, obs, pi0: np.ndarray | None = None) -> np.ndarray:
    """(K, S) filtering posteriors p(s_t | o_0..o_t) by the forward algorithm, normalised each
    step (float64). T[i, j] = p(s_{t+1} = j | s_t = i), E[i, o] = p(o | s = i)."""
    T, E = np.asarray(T, dtype=np.float64), np.asarray(E, dtype=np.float64)
    check_stochastic(T, "transition matrix")
    check_stochastic(E, "emission matrix")
    S = T.shape[0]
    if T.shape != (S, S) or E.shape[0] != S:
        raise ValueError(f"transition {T.shape} must be (S, S) and emission {E.shape} (S, O)")
    pi0 = np.full(S, 1.0 / S) if pi0 is None else np.asarray(pi0, dtype=np.float64)
    check_stochastic(pi0[None], "initial distribution")
    obs = np.asarray(obs)
    if obs.ndim != 1 or len(obs) == 0 or obs.min() < 0 or obs.max() >= E.shape[1]:
        raise ValueError(f"observations must be a non-empty 1-D array of symbols in [0, {E.shape[1]}), got {obs!r}")
    out = np.empty((len(obs), S))
    alpha = pi0 * E[:, obs[0]]
    out[0] = alpha / alpha.sum()
    for t in range(1, len(obs)):
        alpha = (out[t - 1] @ T) * E[:, obs[t]]
        out[t] = alpha / alpha.sum()
    return out


def hmm_posterior_brute_force(T, E, obs, pi0=None) -> np.ndarray:
    """p(s_t | o_0..o_t) for the last t by summing over all S^K state paths (tiny K)."""
    from itertools import product

    T, E = np.asarray(T, dtype=np.float64), np.asarray(E, dtype=np.float64)
    S = T.shape[0]
    pi0 = np.full(S, 1.0 / S) if pi0 is None else pi0
    post = np.zeros(S)
    for path in product(range(S), repeat=len(obs)):
        p = pi0[path[0]] * E[path[0], obs[0]]
        for t in range(1, len(obs)):
            p *= T[path[t - 1], path[t]] * E[path[t], obs[t]]
        post[path[-1]] += p
    return post / post.sum()
