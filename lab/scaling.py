"""Scaling laws: fit how loss falls with model size and data, with uncertainty.

    from lab.scaling import fit_power_law, fit_chinchilla, bootstrap_fit, compute_optimal
    fit = fit_power_law(N, L)                      # L(N) = E + A * N^-alpha
    fit.alpha, fit.predict(1e6)
    nd = fit_chinchilla(N, D, L)                   # L(N, D) = E + A * N^-alpha + B * D^-beta
    compute_optimal(nd, 1e15).tokens_per_param     # D_opt / N_opt at C = 6 N D FLOPs
    boot = bootstrap_fit(fit_chinchilla, N, D, L, strata=cells)   # percentile intervals
    boot.intervals["alpha"].low, boot.intervals["alpha"].high

Both fits are least squares on the loss itself. For fixed exponents the model is linear
in its coefficients, so the coefficients come from non-negative least squares (E, A, B
>= 0: a negative irreducible loss or a loss that rises with scale is no power law) and
only the exponents are searched: a log-spaced grid over EXPONENT_RANGE, then a local
refinement (bounded scalar search for L(N), Nelder-Mead over (log alpha, log beta) for
L(N, D)). N and D are scaled by their geometric means inside the fit, so the
coefficients stay well conditioned; A and B are reported in the original units.

N is meant to be Kaplan et al.'s non-embedding parameter count (`non_embedding_params`)
and D the number of training tokens; compute is C = 6 N D (forward + backward, attention
FLOPs left out, as in Chinchilla's approximation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from lab.checks import PROBABILITY, check_int

FLOPS_PER_PARAM_TOKEN = 6.0  # C = 6 N D
EXPONENT_RANGE = (1e-3, 4.0)  # exponents are searched inside this interval
CHINCHILLA_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. (2022): about 20 tokens per parameter


# ---------------------------------------------------------------- input checks


def _positive_array(values, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a 1-D sequence of positive numbers, got {values!r}") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of positive numbers, got shape {arr.shape}")
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{name} must be finite and > 0 (power laws live on log axes); {name}[{i}] = {float(arr[i])!r}"
        )
    return arr


def _check_inputs(fit_name: str, n_params: int, param_names: str, **named) -> list[np.ndarray]:
    arrays = [_positive_array(v, k) for k, v in named.items()]
    lengths = {k: a.size for k, a in zip(named, arrays)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{fit_name}: mismatched lengths {lengths}; every point needs one value of each")
    n = arrays[0].size
    if n < n_params:
        raise ValueError(
            f"{fit_name} has {n_params} parameters ({param_names}) but got only {n} point(s): "
            f"a fit needs at least as many points as parameters"
        )
    return arrays


def _check_distinct(fit_name: str, arr: np.ndarray, name: str, need: int, why: str) -> None:
    k = np.unique(arr).size
    if k < need:
        raise ValueError(
            f"{fit_name} needs at least {need} distinct {name} values ({why}); got {k} distinct among {arr.size} points"
        )


# ---------------------------------------------------------------- non-negative least squares over a grid


def _nnls_batch(Z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact non-negative least squares for each of G small designs at once.

    Z: (G, n, k) with k <= 3, y: (n,). Enumerates the active sets (every subset of
    columns), solves each unconstrained on that subset, keeps the feasible solution with
    the least residual. Returns coefficients (G, k) and residual sums of squares (G,)."""
    G, n, k = Z.shape
    best_rss = np.full(G, float(y @ y))  # the empty set: everything zero
    best_coef = np.zeros((G, k))
    for size in range(1, k + 1):
        for cols in combinations(range(k), size):
            Zs = Z[:, :, cols]  # (G, n, s)
            M = np.einsum("gni,gnj->gij", Zs, Zs)
            r = np.einsum("gni,n->gi", Zs, y)
            d = np.sqrt(np.einsum("gii->gi", M))  # column norms: solve the scaled system
            d = np.where(d > 0, d, 1.0)
            Mn = M / (d[:, :, None] * d[:, None, :]) + 1e-13 * np.eye(size)
            c = np.linalg.solve(Mn, (r / d)[..., None])[..., 0] / d
            resid = y[None, :] - np.einsum("gns,gs->gn", Zs, c)
            rss = np.einsum("gn,gn->g", resid, resid)
            ok = np.all(c >= 0, axis=1) & np.isfinite(rss) & (rss < best_rss)
            if ok.any():
                best_rss = np.where(ok, rss, best_rss)
                full = np.zeros((G, k))
                full[:, cols] = c
                best_coef = np.where(ok[:, None], full, best_coef)
    return best_coef, best_rss


def _nnls_one(Z: np.ndarray, y: np.ndarray) -> float:
    """Residual sum of squares of non-negative least squares for one design Z (n, k)."""
    from scipy.optimize import nnls

    d = np.linalg.norm(Z, axis=0)
    d = np.where(d > 0, d, 1.0)
    _, rnorm = nnls(Z / d, y)
    return float(rnorm) ** 2


def _at_bound(x: float) -> bool:
    lo, hi = EXPONENT_RANGE
    return x <= lo * 1.02 or x >= hi / 1.02


# ---------------------------------------------------------------- L(N)


@dataclass(frozen=True)
class PowerLawFit:
    """L(N) = E + A * N^-alpha, fitted by least squares on L."""

    E: float
    A: float
    alpha: float
    rss: float  # residual sum of squares (loss units squared)
    n_points: int
    at_bound: bool = False  # alpha sits at the edge of EXPONENT_RANGE: the data barely constrain it

    n_params = 3
    param_names = ("E", "A", "alpha")

    def predict(self, N):
        N = np.asarray(N, dtype=float)
        out = self.E + self.A * N ** (-self.alpha)
        return float(out) if out.ndim == 0 else out

    def params(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "alpha": self.alpha}

    @property
    def rmse(self) -> float:
        return math.sqrt(self.rss / self.n_points)

    def describe(self) -> str:
        return f"L(N) = {self.E:.4g} + {self.A:.4g} * N^-{self.alpha:.4g}"


def fit_power_law(N: Sequence[float], L: Sequence[float], *, grid: int = 400) -> PowerLawFit:
    """Fit L = E + A * N^-alpha (E, A >= 0, alpha in EXPONENT_RANGE) by least squares.

    Needs at least 3 points (3 parameters) at 3 or more distinct N: with two sizes any
    alpha fits. Raises ValueError on non-positive or non-finite values and on mismatched
    lengths."""
    N, L = _check_inputs("fit_power_law", 3, "E, A, alpha", N=N, L=L)
    _check_distinct("fit_power_law", N, "N", 3, "with two sizes every alpha fits equally well")
    check_int("grid", grid, 10)
    n0 = math.exp(np.log(N).mean())
    logx = np.log(N / n0)

    def solve(alphas: np.ndarray):
        Z = np.stack([np.ones((alphas.size, N.size)), np.exp(-alphas[:, None] * logx[None, :])], axis=2)
        return _nnls_batch(Z, L)

    lo, hi = EXPONENT_RANGE
    alphas = np.geomspace(lo, hi, grid)
    _, rss = solve(alphas)
    i = int(np.argmin(rss))
    from scipy.optimize import minimize_scalar

    a_lo, a_hi = math.log(alphas[max(i - 1, 0)]), math.log(alphas[min(i + 1, grid - 1)])
    ones = np.ones(N.size)
    res = minimize_scalar(
        lambda la: _nnls_one(np.stack([ones, np.exp(-math.exp(la) * logx)], axis=1), L),
        bounds=(a_lo, a_hi),
        method="bounded",
        options={"xatol": 1e-10},
    )
    alpha = math.exp(res.x) if res.fun <= rss[i] else float(alphas[i])
    coef, best = solve(np.array([alpha]))
    E, A_scaled = coef[0]
    return PowerLawFit(
        E=float(E),
        A=float(A_scaled * n0**alpha),
        alpha=float(alpha),
        rss=float(best[0]),
        n_points=int(N.size),
        at_bound=_at_bound(alpha),
    )


# ---------------------------------------------------------------- L(N, D)


@dataclass(frozen=True)
class ChinchillaFit:
    """L(N, D) = E + A * N^-alpha + B * D^-beta (Hoffmann et al. 2022, approach 3)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    rss: float
    n_points: int
    at_bound: bool = False  # an exponent sits at the edge of EXPONENT_RANGE

    n_params = 5
    param_names = ("E", "A", "alpha", "B", "beta")

    def predict(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        out = self.E + self.A * N ** (-self.alpha) + self.B * D ** (-self.beta)
        return float(out) if out.ndim == 0 else out

    def params(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "alpha": self.alpha, "B": self.B, "beta": self.beta}

    @property
    def rmse(self) -> float:
        return math.sqrt(self.rss / self.n_points)

    def describe(self) -> str:
        return f"L(N, D) = {self.E:.4g} + {self.A:.4g} * N^-{self.alpha:.4g} + {self.B:.4g} * D^-{self.beta:.4g}"


def fit_chinchilla(N: Sequence[float], D: Sequence[float], L: Sequence[float], *, grid: int = 40) -> ChinchillaFit:
    """Fit L = E + A * N^-alpha + B * D^-beta (E, A, B >= 0; alpha, beta in
    EXPONENT_RANGE) by least squares on L.

    Needs at least 5 points (5 parameters), at 3 or more distinct N and 3 or more
    distinct D: with two values of either, its coefficient and exponent trade off
    exactly. Raises ValueError on non-positive or non-finite values and mismatched
    lengths."""
    N, D, L = _check_inputs("fit_chinchilla", 5, "E, A, alpha, B, beta", N=N, D=D, L=L)
    why = "with two values its coefficient and exponent trade off exactly"
    _check_distinct("fit_chinchilla", N, "N", 3, why)
    _check_distinct("fit_chinchilla", D, "D", 3, why)
    check_int("grid", grid, 5)
    n0, d0 = math.exp(np.log(N).mean()), math.exp(np.log(D).mean())
    logx, logd = np.log(N / n0), np.log(D / d0)

    def solve(ab: np.ndarray):  # ab: (G, 2)
        G = ab.shape[0]
        Z = np.stack(
            [np.ones((G, N.size)), np.exp(-ab[:, :1] * logx[None, :]), np.exp(-ab[:, 1:] * logd[None, :])], axis=2
        )
        return _nnls_batch(Z, L)

    lo, hi = EXPONENT_RANGE
    axis = np.geomspace(lo, hi, grid)
    aa, bb = np.meshgrid(axis, axis, indexing="ij")
    ab = np.stack([aa.ravel(), bb.ravel()], axis=1)
    _, rss = solve(ab)
    from scipy.optimize import minimize

    bounds = [(math.log(lo), math.log(hi))] * 2
    best_ab, best_rss = ab[int(np.argmin(rss))], float(rss.min())
    ones = np.ones(N.size)

    def profile_rss(log_ab: np.ndarray) -> float:
        a, b = np.exp(log_ab)
        return _nnls_one(np.stack([ones, np.exp(-a * logx), np.exp(-b * logd)], axis=1), L)

    for start in np.argsort(rss)[:2]:  # refine the two best grid points
        res = minimize(
            profile_rss,
            np.log(ab[start]),
            method="Nelder-Mead",
            bounds=bounds,
            options={"xatol": 1e-7, "fatol": 1e-15, "maxiter": 1000},
        )
        if res.fun < best_rss:
            best_ab, best_rss = np.exp(res.x), float(res.fun)
    coef, final = solve(np.asarray(best_ab, dtype=float)[None, :])
    E, A_s, B_s = coef[0]
    alpha, beta = float(best_ab[0]), float(best_ab[1])
    return ChinchillaFit(
        E=float(E),
        A=float(A_s * n0**alpha),
        alpha=alpha,
        B=float(B_s * d0**beta),
        beta=beta,
        rss=float(final[0]),
        n_points=int(N.size),
        at_bound=_at_bound(alpha) or _at_bound(beta),
    )


# ---------------------------------------------------------------- compute-optimal allocation


@dataclass(frozen=True)
class ComputeOptimal:
    """The loss-minimising split of compute C = 6 N D under a ChinchillaFit."""

    C: float | np.ndarray
    N_opt: float | np.ndarray
    D_opt: float | np.ndarray
    tokens_per_param: float | np.ndarray  # D_opt / N_opt
    loss: float | np.ndarray  # the fit's loss at (N_opt, D_opt)


def compute_optimal(fit: ChinchillaFit, C) -> ComputeOptimal:
    """N_opt, D_opt minimising E + A N^-alpha + B D^-beta subject to 6 N D = C.

    Closed form (Hoffmann et al. 2022, eq. 4): N_opt = G (C/6)^(beta/(alpha+beta)),
    D_opt = G^-1 (C/6)^(alpha/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)).
    The ratio D_opt / N_opt = G^-2 (C/6)^((alpha-beta)/(alpha+beta)) depends on C unless
    alpha = beta. C may be a number or an array of positive numbers."""
    if not isinstance(fit, ChinchillaFit):
        raise ValueError(
            f"compute_optimal needs a ChinchillaFit (L(N, D) from fit_chinchilla), got {type(fit).__name__}: "
            "an L(N) fit alone says nothing about data"
        )
    if fit.A <= 0 or fit.B <= 0:
        raise ValueError(
            f"compute_optimal: the fit has A={fit.A:g}, B={fit.B:g}; with a zero coefficient the loss does not "
            "depend on N (or D) and there is no optimal split"
        )
    scalar = np.ndim(C) == 0
    c = _positive_array(np.atleast_1d(C), "C")
    a, b = fit.alpha, fit.beta
    G = (a * fit.A / (b * fit.B)) ** (1.0 / (a + b))
    x = c / FLOPS_PER_PARAM_TOKEN
    n_opt = G * x ** (b / (a + b))
    d_opt = x / n_opt
    loss = fit.predict(n_opt, d_opt)
    out = (c, n_opt, d_opt, d_opt / n_opt, np.asarray(loss))
    if scalar:
        out = tuple(float(v.reshape(-1)[0]) for v in out)
    return ComputeOptimal(*out)


# ---------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class FitInterval:
    """A fitted quantity: the estimate on all points and a bootstrap percentile interval."""

    estimate: float
    low: float
    high: float
    confidence: float
    n_boot: int  # resamples whose fit succeeded

    def describe(self) -> str:
        return f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}] ({self.confidence:.0%}, {self.n_boot} resamples)"


@dataclass
class BootstrapFit:
    fit: object  # the fit on all points (PowerLawFit or ChinchillaFit)
    intervals: dict[str, FitInterval]
    samples: dict[str, np.ndarray]  # each quantity's value in every successful resample
    n_boot: int  # resamples drawn
    n_failed: int  # resamples the fit (or `derived`) refused
    failures: list[str] = field(default_factory=list)  # the first few messages


def bootstrap_fit(
    fit_fn: Callable,
    *arrays: Sequence[float],
    strata: Sequence | None = None,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    derived: Callable[[object], dict[str, float]] | None = None,
) -> BootstrapFit:
    """Percentile intervals for every parameter of `fit_fn(*arrays)` (and for whatever
    `derived(fit)` computes from a fit, e.g. a compute-optimal ratio).

    Each resample draws points with replacement. With `strata` (one label per point,
    e.g. the (N, D) cell of each run) it draws within each stratum, keeping its size:
    with one point per seed in every cell this resamples seeds at every model size,
    so no resample loses a size. Without strata it resamples points freely; a resample
    that the fit refuses (too few distinct sizes) is counted in n_failed and left out.
    Fixed `seed`: the same inputs always give the same intervals."""
    if not callable(fit_fn):
        raise ValueError(f"fit_fn must be callable (fit_power_law or fit_chinchilla), got {fit_fn!r}")
    if not arrays:
        raise ValueError("bootstrap_fit needs the arrays to pass to fit_fn")
    arrs = [np.asarray(a, dtype=float) for a in arrays]
    n = arrs[0].size
    if any(a.ndim != 1 or a.size != n for a in arrs):
        raise ValueError(f"bootstrap_fit: arrays must be 1-D and of equal length, got shapes {[a.shape for a in arrs]}")
    check_int("n_boot", n_boot, 10)
    PROBABILITY.check("confidence", confidence)
    full = fit_fn(*arrs)

    def quantities(fit) -> dict[str, float]:
        q = dict(fit.params())
        if derived is not None:
            q.update({k: float(v) for k, v in derived(fit).items()})
        return q

    estimate = quantities(full)
    if strata is None:
        groups = [np.arange(n)]
    else:
        labels = list(strata)
        if len(labels) != n:
            raise ValueError(f"strata has {len(labels)} labels for {n} points; give one label per point")
        index: dict = {}
        for i, lab_ in enumerate(labels):
            index.setdefault(lab_, []).append(i)
        groups = [np.asarray(v) for v in index.values()]
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in estimate}
    failed, failures = 0, []
    for _ in range(n_boot):
        idx = np.concatenate([g[rng.integers(0, g.size, g.size)] for g in groups])
        try:
            q = quantities(fit_fn(*[a[idx] for a in arrs]))
        except (ValueError, ArithmeticError) as exc:
            failed += 1
            if len(failures) < 5:
                failures.append(str(exc))
            continue
        for k in samples:
            samples[k].append(q[k])
    if failed == n_boot:
        raise ValueError(f"every one of {n_boot} bootstrap resamples failed; first: {failures[0]}")
    tail = (1 - confidence) / 2
    out_samples = {k: np.asarray(v) for k, v in samples.items()}
    intervals = {}
    for k, v in out_samples.items():
        low, high = np.quantile(v, [tail, 1 - tail])
        intervals[k] = FitInterval(estimate[k], float(low), float(high), float(confidence), int(v.size))
    return BootstrapFit(full, intervals, out_samples, n_boot, failed, failures)


# ---------------------------------------------------------------- counting N and D


def non_embedding_params(model_config) -> int:
    """Kaplan et al.'s N: every parameter but the vocabulary and position tables.

    Counts the transformer blocks (attention, MLP or every MoE expert and its router,
    norms, biases) and the final norm; leaves out the token embedding, the output head
    (tied or not) and learned position embeddings. The model is built once to count
    (on the CPU, without touching the global RNG; on PyTorch's meta device, which takes
    no memory but a few seconds to set up, when it would hold over 50M parameters)."""
    import torch

    from lab.models import GPT, GPTConfig

    if isinstance(model_config, GPT):
        model_config = model_config.config
    if not isinstance(model_config, GPTConfig):
        raise ValueError(f"non_embedding_params expects a GPTConfig (or a GPT), got {type(model_config).__name__}")
    c = model_config
    rough = c.n_layer * 12 * c.n_embd**2 * (c.n_expert or 1) + (c.vocab_size + c.block_size) * c.n_embd
    with torch.random.fork_rng(devices=[]), torch.device("meta" if rough > 50_000_000 else "cpu"):
        model = GPT(c)
    return int(sum(p.numel() for name, p in model.named_parameters() if name.startswith(("blocks.", "ln_f."))))


def training_tokens(train_config, model_config) -> int:
    """D: tokens a causal-LM run predicts, max_steps * batch_size * block_size."""
    return int(train_config.max_steps * train_config.batch_size * model_config.block_size)


def pareto_front(costs: Sequence[float], losses: Sequence[float]) -> list[int]:
    """Indices of the points no other point dominates (a cost and a loss both at most its
    own, one of them strictly smaller), sorted by cost: the best loss each budget buys."""
    c, y = _positive_array(costs, "costs"), np.asarray(losses, dtype=float)
    if len(c) != len(y):
        raise ValueError(f"costs and losses must have the same length, got {len(c)} and {len(y)}")
    front = [
        i
        for i in range(len(c))
        if not any(c[j] <= c[i] and y[j] <= y[i] and (c[j] < c[i] or y[j] < y[i]) for j in range(len(c)))
    ]
    return sorted(front, key=lambda i: (c[i], y[i]))


def family_run(lab, data, scale, seed: int, budget_index: int = -1):
    """One run of curriculum 13's scaling family: the model of `scale` trained on `data`
    for the profile's budgets[budget_index] steps with the family's batch, lr and schedule
    (warmup a tenth of the steps, cosine to the end). Cached by the lab like any run, so
    every hypothesis asking for the same run shares it."""
    s = lab.profile.scaling
    steps = s.budgets[budget_index]
    return lab.pretrain(
        data,
        lab.model_config(data, scale),
        seed=seed,
        max_steps=steps,
        batch_size=s.batch_size,
        lr=s.lr,
        warmup_steps=max(1, steps // 10),
        eval_interval=steps,
        eval_batches=s.eval_batches,
    )
