"""Interval estimates for comparisons over seeds, as rliable (Agarwal et al., 2021) and marl-eval report them.

A benchmark result here is a few runs (seeds) per task (a MACs target, a network): ``strata`` is one list of run
values per task. Two estimates, each with a percentile stratified-bootstrap interval (runs are resampled with
replacement WITHIN each task, never across tasks, ``reps`` times, from a fixed seed):

* :func:`mean_interval`: the mean over tasks of each task's mean run value. Applied to SEED-PAIRED differences
  (:func:`paired_differences`: method minus baseline on the same seed, so both saw the same data order and
  fine-tuning draws) it is the usual "difference to the baseline, 95 % CI".
* :func:`probability_of_improvement`: ``P(X > Y)`` of a random run of method X against a random run of method Y of
  the same task (ties count one half; the Mann-Whitney U statistic over ``n * m`` pairs), averaged over tasks.
  0.5 means neither is better; its interval resamples X's and Y's runs independently within each task.

With 3 runs, a task's bootstrap mean takes at most 10 distinct values, so the percentile interval is narrow and
under-covers; rliable's advice is the same (report intervals, and more runs where affordable). One run per task
gives no interval (``low`` / ``high`` None).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Interval", "mean_interval", "paired_differences", "probability_of_improvement"]

REPS = 10_000
"""Bootstrap resamples per estimate (rliable's default is 50,000 for final figures; 10,000 keeps the
percentiles stable to about 0.01 points on these data)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate and its ``confidence`` bootstrap interval (None when a task has a single run)."""

    point: float
    low: float | None
    high: float | None
    runs: int
    """Runs in all tasks together."""
    confidence: float = 0.95

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)

    def above_zero(self) -> bool:
        """Whether the whole interval lies above 0 (a difference shown to be positive)."""
        return self.low is not None and self.low > 0

    def cell(self, digits: int = 2, sign: str = "+") -> str:
        """``"+0.42 [-0.10, +0.95]"`` for a table (the point alone without an interval)."""
        text = f"{self.point:{sign}.{digits}f}"
        if self.low is None or self.high is None:
            return text
        return f"{text} [{self.low:{sign}.{digits}f}, {self.high:{sign}.{digits}f}]"


def _strata(strata: Sequence[Sequence[float]], what: str) -> list[np.ndarray]:
    out = [np.asarray(s, dtype=np.float64) for s in strata]
    if not out or any(s.ndim != 1 or s.size == 0 for s in out):
        raise ValueError(f"{what}: every task needs at least one run (got sizes {[int(s.size) for s in out]})")
    if any(not np.isfinite(s).all() for s in out):
        raise ValueError(f"{what}: runs must be finite numbers")
    return out


def _resample_counts(rng: np.random.Generator, n: int, reps: int) -> np.ndarray:
    """``(reps, n)`` how often each of ``n`` runs is drawn in each bootstrap resample of size ``n``."""
    idx = rng.integers(0, n, size=(reps, n))
    counts = np.zeros((reps, n))
    np.add.at(counts, (np.arange(reps)[:, None], idx), 1.0)
    return counts


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def _check(confidence: float, reps: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if reps < 100:
        raise ValueError(f"reps must be >= 100 for a percentile interval, got {reps}")


def mean_interval(strata: Sequence[Sequence[float]], *, confidence: float = 0.95, reps: int = REPS,
                  seed: int = 0) -> Interval:
    """The mean over tasks of each task's mean run value, with a stratified-bootstrap interval.

    Args:
        strata: per task, its run values (e.g. seed-paired differences in points); tasks may have different run
            counts and count equally.
    """
    _check(confidence, reps)
    xs = _strata(strata, "mean_interval")
    point = float(np.mean([x.mean() for x in xs]))
    runs = sum(x.size for x in xs)
    if all(x.size == 1 for x in xs):
        return Interval(point, None, None, runs, confidence)
    rng = np.random.default_rng(seed)
    samples = np.mean([_resample_counts(rng, x.size, reps) @ x / x.size for x in xs], axis=0)
    return Interval(point, *_percentiles(samples, confidence), runs, confidence)


def probability_of_improvement(x_strata: Sequence[Sequence[float]], y_strata: Sequence[Sequence[float]], *,
                               confidence: float = 0.95, reps: int = REPS, seed: int = 0) -> Interval:
    """``P(X > Y)``: the chance that a run of method X scores above a run of method Y on the same task (ties
    count 1/2), averaged over tasks, with a stratified-bootstrap interval (X's and Y's runs resampled
    independently within each task)."""
    _check(confidence, reps)
    xs = _strata(x_strata, "probability_of_improvement (X)")
    ys = _strata(y_strata, "probability_of_improvement (Y)")
    if len(xs) != len(ys):
        raise ValueError(f"probability_of_improvement: X has {len(xs)} tasks, Y {len(ys)}; pass the same tasks")
    # per task: score[i, j] = 1 if x_i > y_j, 1/2 if equal, else 0
    scores = [(np.sign(x[:, None] - y[None, :]) + 1.0) / 2.0 for x, y in zip(xs, ys)]
    point = float(np.mean([s.mean() for s in scores]))
    runs = sum(x.size + y.size for x, y in zip(xs, ys))
    if all(x.size == 1 and y.size == 1 for x, y in zip(xs, ys)):
        return Interval(point, None, None, runs, confidence)
    rng = np.random.default_rng(seed)
    per_task = []
    for s, x, y in zip(scores, xs, ys):
        cx, cy = _resample_counts(rng, x.size, reps), _resample_counts(rng, y.size, reps)
        per_task.append(np.einsum("ri,ij,rj->r", cx, s, cy) / (x.size * y.size))
    samples = np.mean(per_task, axis=0)
    return Interval(point, *_percentiles(samples, confidence), runs, confidence)


def paired_differences(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[list[int], np.ndarray]:
    """The seeds both ``a`` and ``b`` (seed -> value) have, sorted, and ``a[seed] - b[seed]`` for each."""
    seeds = sorted(set(a) & set(b))
    return seeds, np.array([a[s] - b[s] for s in seeds], dtype=np.float64)
