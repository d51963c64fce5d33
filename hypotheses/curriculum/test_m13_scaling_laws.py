"""Curriculum 13: scaling laws — a family of lab GPTs of five or more sizes, trained on
char-level tiny Shakespeare at several data budgets and seeds; power-law fits of the
validation loss against non-embedding parameters N, L(N) = E + A N^-alpha, and against
N and training tokens D, L(N, D) = E + A N^-alpha + B D^-beta (Chinchilla's form), with
bootstrap intervals; and the compute-optimal tokens per parameter the fit implies,
against Chinchilla's ~20."""

import math

import numpy as np
import pytest

from lab.profiles import ModelScale
from lab.report import at_least, between, greater_than, prediction
from lab.report.plots import plt
from lab.scaling import (
    CHINCHILLA_TOKENS_PER_PARAM,
    FLOPS_PER_PARAM_TOKEN,
    bootstrap_fit,
    compute_optimal,
    fit_chinchilla,
    fit_power_law,
    non_embedding_params,
    pareto_front,
)

pytestmark = [pytest.mark.curriculum, pytest.mark.m13_scaling_laws]


ALPHA_PRIOR = (0.1, 1.0)  # exponent of N with an irreducible term (Chinchilla: 0.34; Kaplan's E-free 0.076)
BETA_PRIOR = (0.1, 1.0)  # exponent of D (Chinchilla: 0.28)
RATIO_PRIOR = (CHINCHILLA_TOKENS_PER_PARAM / 10, CHINCHILLA_TOKENS_PER_PARAM * 10)  # within a factor 10 of 20


def _label(m: ModelScale) -> str:
    return f"{m.n_layer}L d{m.n_embd}"


class Family:
    """The module's runs {(size, budget, seed): TrainResult}, trained on demand (cached
    on disk by the lab), and the fits the hypotheses share."""

    def __init__(self, lab, data):
        self.lab, self.data = lab, data
        self.s = lab.profile.scaling
        if len(self.s.sizes) < 5:
            raise ValueError(f"the scaling family needs at least 5 sizes, the profile gives {len(self.s.sizes)}")
        self.configs = [lab.model_config(data, m) for m in self.s.sizes]
        self.N = [non_embedding_params(c) for c in self.configs]
        if sorted(self.N) != self.N or len(set(self.N)) != len(self.N):
            raise ValueError(f"sizes must grow strictly in non-embedding parameters, got {self.N}")
        block = {m.block_size for m in self.s.sizes}
        if len(block) != 1:
            raise ValueError(f"every size needs the same block_size (same tokens per step), got {sorted(block)}")
        (block_size,) = block
        self.D = [steps * self.s.batch_size * block_size for steps in self.s.budgets]
        self._runs, self._cache = {}, {}

    def run(self, i: int, j: int, seed: int):
        key = (i, j, seed)
        if key not in self._runs:
            steps = self.s.budgets[j]
            self._runs[key] = self.lab.pretrain(
                self.data,
                self.configs[i],
                seed=seed,
                max_steps=steps,
                batch_size=self.s.batch_size,
                lr=self.s.lr,
                warmup_steps=max(1, steps // 10),
                eval_interval=steps,
                eval_batches=self.s.eval_batches,
            )
        return self._runs[key]

    def loss(self, i, j, seed) -> float:
        return self.run(i, j, seed).final_val_loss

    def points(self, budgets, seeds):
        """Arrays N, D, L and each point's (size, budget) cell, for these budgets and seeds."""
        rows = [
            (self.N[i], self.D[j], self.loss(i, j, s), (i, j))
            for j in budgets
            for i in range(len(self.N))
            for s in seeds
        ]
        N, D, L, cells = zip(*rows)
        return np.array(N, float), np.array(D, float), np.array(L, float), list(cells)

    def strata(self, cells):
        """Resample seeds within each cell when there are several, else points freely."""
        return cells if len(self.lab.seeds) > 1 else None

    # -- L(N) at the largest budget

    def n_fit(self, seed):
        N, _, L, _ = self.points([len(self.D) - 1], [seed])
        return fit_power_law(N, L)

    def n_boot(self):
        if "n_boot" not in self._cache:
            N, _, L, cells = self.points([len(self.D) - 1], self.lab.seeds)
            self._cache["n_boot"] = bootstrap_fit(fit_power_law, N, L, strata=self.strata(cells), n_boot=self.s.n_boot)
        return self._cache["n_boot"]

    # -- L(N, D) over every budget

    @property
    def c_ref(self) -> float:
        """The middle of the measured compute range: geometric mean of 6 N D over the grid."""
        return float(math.exp(np.mean([math.log(FLOPS_PER_PARAM_TOKEN * n * d) for n in self.N for d in self.D])))

    def nd_fit(self, seed):
        key = ("nd", seed)
        if key not in self._cache:
            N, D, L, _ = self.points(range(len(self.D)), [seed])
            self._cache[key] = fit_chinchilla(N, D, L)
        return self._cache[key]

    def nd_boot(self):
        if "nd_boot" not in self._cache:
            N, D, L, cells = self.points(range(len(self.D)), self.lab.seeds)
            c = self.c_ref
            self._cache["nd_boot"] = bootstrap_fit(
                fit_chinchilla,
                N,
                D,
                L,
                strata=self.strata(cells),
                n_boot=self.s.n_boot,
                derived=lambda f: {"tokens_per_param": compute_optimal(f, c).tokens_per_param},
            )
        return self._cache["nd_boot"]

    def require_trained(self, require, budgets) -> None:
        """Validity: every size and seed at these budget indices trained (see require_trained)."""
        runs = {
            f"{_label(self.s.sizes[i])}, {self.s.budgets[j]} steps, seed {s}": self.run(i, j, s)
            for j in budgets
            for i in range(len(self.N))
            for s in self.lab.seeds
        }
        require(runs, "every model", self.data)

    def need_budgets(self):
        if len(self.D) < 3:
            pytest.skip(
                f"the {self.lab.profile.name} profile trains {len(self.D)} data budget(s); L(N, D) needs at least 3 "
                "(with two, B and beta trade off exactly and the fit cannot separate them)"
            )


@pytest.fixture(scope="module")
def family(lab, char_data):
    return Family(lab, char_data)


def _interval_rows(boot, names, seeds_values):
    rows = []
    for name in names:
        iv = boot.intervals[name]
        row = {
            "parameter": name,
            "pooled fit": f"{iv.estimate:.4g}",
            f"{iv.confidence:.0%} bootstrap interval": f"[{iv.low:.4g}, {iv.high:.4g}]",
        }
        for seed, v in seeds_values.get(name, {}).items():
            row[f"seed {seed}"] = f"{v:.4g}"
        rows.append(row)
    return rows


def _boot_note(outcome, boot, what):
    outcome.note(
        f"{what}: {boot.n_boot - boot.n_failed} of {boot.n_boot} bootstrap resamples fitted"
        + (f" ({boot.n_failed} refused, e.g. {boot.failures[0]!r})" if boot.n_failed else "")
        + "."
    )


@prediction(
    "Validation loss falls with model size: every larger model of the family beats the next smaller one "
    "at the same token budget",
    metric="min_gain_per_size_step",
    expect=greater_than(0.0),
)
@prediction(
    "The exponent of L(N) = E + A N^-alpha lies in [0.1, 1.0] (Chinchilla's alpha with an irreducible term is 0.34; "
    "Kaplan's 0.076 has none; tiny char models may differ)",
    metric="alpha",
    expect=between(*ALPHA_PRIOR),
)
def test_loss_vs_params_power_law(lab, family, outcome, require_trained):
    """Does validation loss fall with model size as a power law, L(N) = E + A N^-alpha?

    Train each size of the profile's family (GPT-2 layout, widths and depths growing
    together) for the profile's largest budget of optimizer steps, the same batches-per-step
    for all, so every model sees the same D tokens (steps x batch x block). N is Kaplan's
    non-embedding parameter count (blocks and final norm; token and position embeddings
    left out). For each seed, fit L(N) = E + A N^-alpha by least squares (E, A >= 0; alpha
    searched on a grid, then refined) to that seed's final validation losses; the alpha
    prediction is judged on the per-seed exponents. The pooled fit (all seeds) gets a
    bootstrap percentile interval from resampling seeds within each size. Monotonicity:
    per seed, the smallest loss drop between consecutive sizes (positive when every step
    up in size helps). Valid only if every run at that budget trained.
    """
    f, j = family, len(family.D) - 1
    per_seed = {}
    for seed in lab.seeds:
        losses = [f.loss(i, j, seed) for i in range(len(f.N))]
        fit = f.n_fit(seed)
        outcome.record(
            "min_gain_per_size_step", min(a - b for a, b in zip(losses, losses[1:])), seed=seed, unit="nats/char"
        )
        outcome.record("alpha", fit.alpha, seed=seed)
        outcome.record("E", fit.E, seed=seed, unit="nats/char")
        outcome.record("fit_rmse", fit.rmse, seed=seed, unit="nats/char")
        for name, v in fit.params().items():
            per_seed.setdefault(name, {})[seed] = v
        if fit.at_bound:
            outcome.note(
                f"seed {seed}: alpha = {fit.alpha:.3g} sits at the edge of the search range; "
                "the five points barely constrain it."
            )
    for i, n in enumerate(f.N):
        outcome.record(f"N_{_label(f.s.sizes[i]).replace(' ', '_')}", n, unit="parameters", deterministic=True)
    outcome.record("tokens_per_run", f.D[j], unit="tokens", deterministic=True)
    f.require_trained(require_trained, [j])
    boot = f.n_boot()
    outcome.table(
        "fit",
        _interval_rows(boot, ("E", "A", "alpha"), per_seed),
        caption=f"L(N) = E + A N^-alpha at D = {f.D[j]:,} tokens: pooled fit, bootstrap interval, per-seed fits",
    )
    outcome.table(
        "losses",
        [
            {
                "size": _label(m),
                "N (non-embedding)": f.N[i],
                "tokens per parameter": round(f.D[j] / f.N[i], 2),
                **{f"val loss seed {s}": round(f.loss(i, j, s), 4) for s in lab.seeds},
            }
            for i, m in enumerate(f.s.sizes)
        ],
        caption="Final validation loss (nats/char) per size and seed",
    )
    _boot_note(outcome, boot, "L(N)")
    outcome.note(f"Pooled fit: {boot.fit.describe()} (RMSE {boot.fit.rmse:.4f} nats/char).")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    grid = np.geomspace(min(f.N) / 1.5, max(f.N) * 1.5, 200)
    fit = boot.fit
    for k, seed in enumerate(lab.seeds):
        losses = [f.loss(i, j, seed) for i in range(len(f.N))]
        axes[0].scatter(f.N, losses, s=22, color=f"C{k}", label=f"seed {seed}", zorder=3)
        axes[1].scatter(f.N, np.maximum(np.array(losses) - fit.E, 1e-6), s=22, color=f"C{k}", zorder=3)
    axes[0].plot(grid, fit.predict(grid), color="k", linewidth=1.2, label=fit.describe())
    if fit.E > 0.05:  # a floor at (or near) zero would stretch the log axis over decades
        axes[0].axhline(fit.E, color="grey", linestyle="--", linewidth=1, label=f"E = {fit.E:.3f}")
    axes[1].plot(grid, fit.A * grid**-fit.alpha, color="k", linewidth=1.2, label=f"A N^-alpha, alpha = {fit.alpha:.3f}")
    for ax, ylabel in zip(axes, ("val loss (nats/char)", "val loss - E (nats/char)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("non-embedding parameters N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0].set_title(f"Loss vs size at D = {f.D[j]:,} tokens")
    axes[1].set_title("Reducible loss: a straight line if the power law holds")
    fig.tight_layout()
    outcome.plot("loss_vs_params", fig, caption="Per-seed points; the line is the pooled fit")


@prediction(
    "The N exponent of L(N, D) = E + A N^-alpha + B D^-beta lies in [0.1, 1.0] (Chinchilla: 0.34)",
    metric="alpha_nd",
    expect=between(*ALPHA_PRIOR),
)
@prediction(
    "The D exponent of L(N, D) lies in [0.1, 1.0] (Chinchilla: 0.28)",
    metric="beta",
    expect=between(*BETA_PRIOR),
)
def test_loss_vs_params_and_data(lab, family, outcome, require_trained):
    """Does validation loss follow Chinchilla's L(N, D) = E + A N^-alpha + B D^-beta with exponents like theirs?

    Train every size of the family at every data budget of the profile (at least 3
    budgets; D = steps x batch x block tokens, well under one epoch on cpu, at most about
    4 on gpu), each run with its own warmup + cosine schedule ending at its budget, as
    Chinchilla did. For each seed, fit L(N, D) = E + A N^-alpha + B D^-beta by least
    squares (E, A, B >= 0; exponents on a grid, then Nelder-Mead) to that seed's final
    validation losses; the predictions are judged on the per-seed exponents. The pooled
    fit gets bootstrap intervals from resampling seeds within each (N, D) cell. A profile
    with fewer than 3 budgets skips (B and beta are not identifiable from two). Valid
    only if every run at the largest budget trained.
    """
    f = family
    f.need_budgets()
    per_seed = {}
    for seed in lab.seeds:
        fit = f.nd_fit(seed)
        outcome.record("alpha_nd", fit.alpha, seed=seed)
        outcome.record("beta", fit.beta, seed=seed)
        outcome.record("E_nd", fit.E, seed=seed, unit="nats/char")
        outcome.record("fit_rmse_nd", fit.rmse, seed=seed, unit="nats/char")
        outcome.record(
            "min_gain_most_vs_least_data",
            min(f.loss(i, 0, seed) - f.loss(i, len(f.D) - 1, seed) for i in range(len(f.N))),
            seed=seed,
            unit="nats/char",
        )
        for name, v in fit.params().items():
            per_seed.setdefault(name, {})[seed] = v
        if fit.at_bound:
            outcome.note(
                f"seed {seed}: an exponent sits at the edge of the search range "
                f"(alpha {fit.alpha:.3g}, beta {fit.beta:.3g})."
            )
    f.require_trained(require_trained, [len(f.D) - 1])
    boot = f.nd_boot()
    outcome.table(
        "fit",
        _interval_rows(boot, ("E", "A", "alpha", "B", "beta"), per_seed),
        caption="L(N, D) = E + A N^-alpha + B D^-beta: pooled fit, bootstrap interval, per-seed fits",
    )
    outcome.table(
        "losses",
        [
            {
                "size": _label(m),
                "N": f.N[i],
                **{
                    f"D={d:,}": round(float(np.mean([f.loss(i, j, s) for s in lab.seeds])), 4)
                    for j, d in enumerate(f.D)
                },
            }
            for i, m in enumerate(f.s.sizes)
        ],
        caption="Final validation loss (nats/char), mean over seeds, per size and token budget",
    )
    _boot_note(outcome, boot, "L(N, D)")
    outcome.note(f"Pooled fit: {boot.fit.describe()} (RMSE {boot.fit.rmse:.4f} nats/char).")

    fit = boot.fit
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    n_grid = np.geomspace(min(f.N) / 1.5, max(f.N) * 1.5, 200)
    d_grid = np.geomspace(min(f.D) / 1.3, max(f.D) * 1.3, 200)
    for j, d in enumerate(f.D):
        for s in lab.seeds:
            axes[0].scatter(f.N, [f.loss(i, j, s) for i in range(len(f.N))], s=16, color=f"C{j}", zorder=3)
        axes[0].plot(n_grid, fit.predict(n_grid, d), color=f"C{j}", linewidth=1.2, label=f"D = {d:,} tokens")
    for i, n in enumerate(f.N):
        for s in lab.seeds:
            axes[1].scatter(f.D, [f.loss(i, j, s) for j in range(len(f.D))], s=16, color=f"C{i}", zorder=3)
        axes[1].plot(d_grid, fit.predict(n, d_grid), color=f"C{i}", linewidth=1.2, label=f"{_label(f.s.sizes[i])}")
    for ax, xlabel in zip(axes, ("non-embedding parameters N", "training tokens D")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss (nats/char)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0].set_title("Loss vs N, one curve per token budget")
    axes[1].set_title("Loss vs D, one curve per size")
    fig.tight_layout()
    outcome.plot("loss_vs_params_and_data", fig, caption=f"Points: every seed; curves: pooled fit {fit.describe()}")


@prediction(
    "The compute-optimal tokens per parameter implied by the L(N, D) fit, at the middle of the measured compute "
    "range, is within a factor 10 of Chinchilla's 20 (between 2 and 200)",
    metric="log10_tokens_per_param",
    expect=between(math.log10(RATIO_PRIOR[0]), math.log10(RATIO_PRIOR[1])),
)
def test_compute_optimal_tokens_per_param(lab, family, outcome, require_trained):
    """How many training tokens per parameter does the L(N, D) fit call compute-optimal, against Chinchilla's ~20?

    From each seed's L(N, D) fit (the previous hypothesis' fits), minimise the loss under
    a compute budget C = 6 N D: N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = C / (6 N_opt),
    G = (alpha A / (beta B))^(1/(alpha+beta)). The ratio D_opt / N_opt depends on C unless
    alpha = beta, so it is read at C_ref, the geometric mean of 6 N D over the trained grid
    (inside the measured range, no extrapolation). The prediction is judged on log10 of
    the per-seed ratios; the pooled fit's ratio gets a bootstrap interval (seeds resampled
    within each (N, D) cell). C counts 6 FLOPs per non-embedding parameter per token and
    leaves out attention's own FLOPs, as Chinchilla's approximation does. A profile with
    fewer than 3 budgets skips. Valid only if every run at the largest budget trained.
    """
    f = family
    f.need_budgets()
    c = f.c_ref
    outcome.record("C_ref", c, unit="FLOPs", deterministic=True)
    f.require_trained(require_trained, [len(f.D) - 1])
    c_grid = np.geomspace(FLOPS_PER_PARAM_TOKEN * min(f.N) * min(f.D), FLOPS_PER_PARAM_TOKEN * max(f.N) * max(f.D), 50)
    curves, rows = {}, []
    for seed in lab.seeds:
        fit = f.nd_fit(seed)
        try:
            opt = compute_optimal(fit, c)
        except ValueError as exc:
            pytest.fail(f"seed {seed}: no compute-optimal split from {fit.describe()}: {exc}")
        outcome.record("log10_tokens_per_param", math.log10(opt.tokens_per_param), seed=seed)
        outcome.record("tokens_per_param", opt.tokens_per_param, seed=seed)
        outcome.record("N_opt", opt.N_opt, seed=seed, unit="parameters")
        outcome.record("D_opt", opt.D_opt, seed=seed, unit="tokens")
        curves[f"seed {seed}"] = (c_grid, compute_optimal(fit, c_grid).tokens_per_param)
        rows.append(
            {
                "fit": f"seed {seed}",
                "alpha": round(fit.alpha, 4),
                "beta": round(fit.beta, 4),
                "N_opt": f"{opt.N_opt:.3g}",
                "D_opt": f"{opt.D_opt:.3g}",
                "tokens per parameter": f"{opt.tokens_per_param:.3g}",
            }
        )
    boot = f.nd_boot()
    pooled = compute_optimal(boot.fit, c)
    iv = boot.intervals["tokens_per_param"]
    rows.append(
        {
            "fit": "pooled",
            "alpha": round(boot.fit.alpha, 4),
            "beta": round(boot.fit.beta, 4),
            "N_opt": f"{pooled.N_opt:.3g}",
            "D_opt": f"{pooled.D_opt:.3g}",
            "tokens per parameter": f"{iv.estimate:.3g} [{iv.low:.3g}, {iv.high:.3g}]",
        }
    )
    curves["pooled fit"] = (c_grid, compute_optimal(boot.fit, c_grid).tokens_per_param)
    outcome.table(
        "compute_optimal",
        rows,
        caption=f"Compute-optimal split at C_ref = {c:.3g} FLOPs (pooled: {iv.confidence:.0%} bootstrap interval)",
    )
    outcome.plot_lines(
        "tokens_per_param_vs_compute",
        curves,
        xlabel="compute C = 6 N D (FLOPs)",
        ylabel="compute-optimal D / N",
        title="Compute-optimal tokens per parameter over the measured range",
        logx=True,
        logy=True,
        hlines={"Chinchilla ~20": CHINCHILLA_TOKENS_PER_PARAM},
    )
    _boot_note(outcome, boot, "L(N, D)")
    trained = {_label(m): round(f.D[-1] / n, 2) for m, n in zip(f.s.sizes, f.N)}
    outcome.note(
        f"Tokens per parameter the family actually trained at the largest budget: {trained}. "
        "Tokens here are characters, each carrying far less information than a BPE token."
    )


# fp32 weights, gradients and AdamW's two moments: 4 numbers of 4 bytes per parameter
TRAIN_STATE_BYTES = 16


def _train_seconds(run) -> float:
    """Seconds the run spent training (its tokens over its training throughput, evaluation
    and checkpoints excluded)."""
    return run.steps * run.train_config.batch_size * run.model_config.block_size / run.tokens_per_s


@prediction(
    "The best model size depends on the time budget: the Pareto frontier of validation loss against training time "
    "holds at least {bound} different model sizes over the time budgets every size reaches",
    metric="frontier_sizes",
    expect=at_least(2),
)
@prediction(
    "Early stopping beats training longer at fixed time: for at least {bound} of the smaller sizes, a larger model "
    "stopped at a smaller budget reaches lower loss in less time than the smaller model at the largest budget",
    metric="early_stop_wins",
    expect=at_least(0.25),
)
def test_time_and_memory_pareto_frontier(lab, family, outcome, require_trained):
    """Which model sizes are worth their training time and memory (the Pareto frontier)?

    Every run of the scaling family (each size at each data budget, its own warmup +
    cosine schedule) has a training time (its tokens over its measured training
    throughput, evaluation excluded), a memory (the training state, 16 bytes per
    parameter for fp32 weights, gradients and AdamW's moments, and the peak the trainer
    measured: GPU memory on CUDA, the process's peak RSS growth on CPU, which later runs
    in one process barely move) and a final validation loss. Per seed, the Pareto
    frontier of loss against time keeps the runs no other run beats on both: each is
    the best run for the time budgets from its own time to the next frontier run's.
    The statistic is how many different sizes are best at some time budget at which
    every size has a run (from the slowest size's shortest run on): below that only the
    smaller models can be chosen, and the fastest run of all is on any frontier by
    construction. 1: one size is best at every such budget. Also
    recorded per seed: the share of smaller sizes whose run at the largest budget
    (trained longest) is beaten on both time and loss by a larger model stopped at a
    smaller budget, which is early stopping winning at fixed time. Times are wall-clock
    measurements of runs that may have trained under different loads (cached runs keep
    the time they were trained in). Valid only if every run a statistic reads trained
    (the runs in the common time range, and every size at the largest budget).
    """
    s = family.s
    cells = [(i, j) for i in range(len(s.sizes)) for j in range(len(s.budgets))]
    last = len(s.budgets) - 1
    rows, lines, read = [], {}, {}
    for seed in lab.seeds:
        runs = {c: family.run(*c, seed) for c in cells}
        times = [_train_seconds(runs[c]) for c in cells]
        losses = [runs[c].final_val_loss for c in cells]
        order = pareto_front(times, losses)
        front = [cells[k] for k in order]
        # every size has a run from here on; a frontier run counts if it is the best for some budget past it
        start = max(min(times[cells.index((i, j))] for j in range(len(s.budgets))) for i in range(len(s.sizes)))
        best_after = [cells[k] for k, nxt in zip(order, order[1:] + [None]) if nxt is None or times[nxt] > start]
        outcome.record("frontier_sizes", len({i for i, _ in best_after}), seed=seed, unit="sizes")
        outcome.record("all_sizes_from_s", start, seed=seed, unit="s")
        for i, j in best_after + [(i, last) for i in range(len(s.sizes))]:
            read[f"{_label(s.sizes[i])}, {s.budgets[j]} steps, seed {seed}"] = runs[(i, j)]
        beaten = 0
        for i in range(len(s.sizes) - 1):
            long = runs[(i, last)]
            beaten += any(
                _train_seconds(runs[(k, j)]) < _train_seconds(long)
                and runs[(k, j)].final_val_loss < long.final_val_loss
                for k in range(i + 1, len(s.sizes))
                for j in range(last)
            )
        outcome.record_fraction("early_stop_wins", beaten, len(s.sizes) - 1, seed=seed, unit="share of smaller sizes")
        for (i, j), t, loss in zip(cells, times, losses):
            rows.append(
                {
                    "seed": seed,
                    "size": _label(s.sizes[i]),
                    "non-embedding params": family.N[i],
                    "steps": s.budgets[j],
                    "train time (s)": round(t, 2),
                    "weights + grads + AdamW state (MiB)": round(
                        TRAIN_STATE_BYTES * runs[(i, j)].model.num_params(non_embedding=False) / 2**20, 2
                    ),
                    "measured peak memory (MiB)": round(runs[(i, j)].peak_memory_bytes / 2**20, 1),
                    "final val loss": round(loss, 4),
                    "on frontier": (i, j) in front,
                    "best past the start of every size": (i, j) in best_after,
                }
            )
        if seed == lab.seeds[0]:
            for i in range(len(s.sizes)):
                lines[_label(s.sizes[i])] = (
                    [times[cells.index((i, j))] for j in range(len(s.budgets))],
                    [losses[cells.index((i, j))] for j in range(len(s.budgets))],
                )
            lines["Pareto frontier"] = ([times[cells.index(c)] for c in front], [losses[cells.index(c)] for c in front])
    outcome.table("runs", rows, caption="Every run: training time, peak memory, final validation loss")
    outcome.plot_lines(
        "frontier",
        lines,
        xlabel="training time (s)",
        ylabel="final val loss (nats/char)",
        title=f"Loss against training time, seed {lab.seeds[0]} (one line per size, points = budgets)",
        logx=True,
    )
    require_trained(read, "every run the statistics read", family.data)
