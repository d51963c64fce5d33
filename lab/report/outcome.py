"""What a hypothesis measured: numbers (per seed or exact), plots, tables, notes."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass
class Artifact:
    name: str
    kind: str  # "png" | "table" | "json"
    data: bytes
    caption: str = ""


def _finite(metric: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"outcome {metric!r} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"outcome {metric!r} is {v} (not finite): a measurement went wrong")
    return v


@dataclass
class Outcome:
    """Collects what one hypothesis measured. Handed to tests as the `outcome` fixture."""

    measurements: dict[str, dict[int | None, float]] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    deterministic: set[str] = field(default_factory=set)  # metrics declared exact
    trials: dict[str, dict[int | None, tuple[int, int]]] = field(default_factory=dict)  # fractions: (k, n)
    validity: list[tuple[str, bool, str]] = field(default_factory=list)  # (check, passed, detail)

    def record(
        self,
        metric: str,
        value: float,
        *,
        seed: int | None = None,
        unit: str = "",
        deterministic: bool = False,
    ) -> float:
        """Record `metric`: once per seed (`seed=s`) where randomness matters, or once
        without a seed. An unseeded value is one sample of a random quantity (a verdict
        on it alone is inconclusive) unless `deterministic=True` declares it exact: the
        same code and inputs always give this number (a byte count, an entropy of a
        fixed text), so it is its own interval. NaN/inf fail the test."""
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"metric name must be a non-empty string, got {metric!r}")
        v = _finite(metric, value)
        samples = self.measurements.setdefault(metric, {})
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        if deterministic and seed is not None:
            raise ValueError(
                f"metric {metric!r}: deterministic=True declares one exact value, so it takes no seed (got {seed})"
            )
        if (seed is None and samples) or (seed is not None and None in samples):
            raise ValueError(f"metric {metric!r} mixes per-seed and exact values; record it one way only")
        if seed in samples:
            raise ValueError(f"metric {metric!r} already recorded for seed {seed}")
        samples[seed] = v
        if deterministic:
            self.deterministic.add(metric)
        if unit:
            self.units[metric] = unit
        return v

    def record_fraction(
        self, metric: str, successes: int, trials: int, *, seed: int | None = None, unit: str = ""
    ) -> float:
        """Record a fraction (or a count out of `trials`) as successes / trials. A
        prediction on it is judged with an exact (Clopper-Pearson) binomial interval over
        all its trials, pooled across seeds, so 0 of 48 heads is never "exactly 0"."""
        for name, x in (("successes", successes), ("trials", trials)):
            if isinstance(x, bool) or not isinstance(x, int | float) or x != int(x) or x < 0:
                raise ValueError(f"{metric!r}: {name} must be a non-negative whole number, got {x!r}")
        successes, trials = int(successes), int(trials)
        if trials == 0 or successes > trials:
            raise ValueError(f"{metric!r}: need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
        value = self.record(metric, successes / trials, seed=seed, unit=unit)
        self.trials.setdefault(metric, {})[seed] = (successes, trials)
        return value

    def require(self, check: str, passed: bool, detail: str = "") -> bool:
        """A precondition for the experiment to mean anything (the model trained, the
        probe beat its control, the stacks produced the same tokens). If any fails,
        the hypothesis' verdict is *invalid*: shown with the failed check, never counted
        as confirmed, refuted or inconclusive. Returns `passed`."""
        if not isinstance(check, str) or not check.strip():
            raise ValueError(f"validity check needs a non-empty name, got {check!r}")
        self.validity.append((check, bool(passed), str(detail)))
        return bool(passed)

    @property
    def failed_checks(self) -> list[tuple[str, bool, str]]:
        return [v for v in self.validity if not v[1]]

    def record_seeds(self, metric: str, values: Mapping[int, float], *, unit: str = "") -> None:
        """Record one value per seed from a {seed: value} mapping."""
        for seed, value in values.items():
            self.record(metric, value, seed=seed, unit=unit)

    def note(self, text: str) -> None:
        """A sentence for the page: an observation the numbers alone don't tell."""
        self.notes.append(str(text))

    def cite_benchmark(self, group: str) -> None:
        """Link this hypothesis' page to a pytest-benchmark group on the benchmarks page."""
        if not any(a.kind == "cite" and a.name == group for a in self.artifacts):
            self.artifacts.append(Artifact(group, "cite", b""))

    def table(self, name: str, rows: Sequence[Mapping[str, object]], caption: str = "") -> None:
        """A small table shown on the hypothesis page (list of dicts, same keys)."""
        rows = [dict(r) for r in rows]
        self.artifacts.append(Artifact(name, "table", json.dumps(rows, default=str).encode(), caption))

    def plot(self, name: str, fig, caption: str = "") -> None:
        """Attach a matplotlib figure (saved as PNG, then closed)."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        self.artifacts.append(Artifact(name, "png", buf.getvalue(), caption))

    def plot_lines(
        self,
        name: str,
        lines: Mapping[str, tuple[Iterable[float], Iterable[float]]],
        *,
        xlabel: str,
        ylabel: str,
        title: str = "",
        logx: bool = False,
        logy: bool = False,
        hlines: Mapping[str, float] | None = None,
        caption: str = "",
    ) -> None:
        """Overlaid line plot: {label: (xs, ys)}, with optional labelled horizontal references."""
        from lab.report.plots import line_figure

        fig = line_figure(lines, xlabel=xlabel, ylabel=ylabel, title=title, logx=logx, logy=logy, hlines=hlines)
        self.plot(name, fig, caption)
