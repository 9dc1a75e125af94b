"""Exact MACs budgets: the one rule that turns any joint proposal of per-layer rates into keep counts that meet
a MACs target.

Why
---
With a soft budget (a penalty above the target) plans of different methods land at different MACs and
cannot be compared; simultaneous agents, each choosing its own rate, cannot know what the others remove.
AMC's "action wall" clips one agent's action so that the budget stays reachable; this is our rule for
``L`` agents acting at once.

The rule (our design)
---------------------
The agents propose per-layer rates ``p`` (each at least the layer's current rate ``c``: pruning is monotone).
One scalar ``s`` in ``[-1, 1]`` moves every proposal in the agents' own proportions:

* ``s >= 0`` (prune more): ``rate_i(s) = p_i + s * (r_max - p_i)``: each layer gives up the same share of
  the room it has left up to the largest rate ``r_max``;
* ``s <= 0`` (prune less): ``rate_i(s) = c_i + (1 + s) * (p_i - c_i)``: each layer's *increment* over its
  current rate shrinks by the same share.

Keep counts follow from rates by the engine's rate rule (:func:`~pruning_env.engine.plan.keep_count_for_rate`)
and never exceed the current ones, so MACs fall monotonically with ``s``. At ``s = 0`` the proposal is
taken as is. Then, with exact MACs from :class:`~pruning_env.engine.macs.MacsModel`:

* the **final** step of an episode takes the smallest ``s`` whose network is at or below the target,
  then gives back, one filter at a time and layer by layer in turn, the filters of the layers that the
  last increment of ``s`` moved, while the budget still holds: every final plan meets the budget and
  sits just below it (the gap is about one filter);
* an **earlier** step keeps the proposal unless it would go below the target; then it takes the largest
  ``s <= 0`` still at or above it, so no early step wastes budget that the last step cannot give back.

A layer whose proposal equals its current rate in the ``s <= 0`` branch keeps its filters, and the
relative allocation the agents chose (which layers prune more than which) survives both branches.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from pruning_env.engine.macs import MacsModel
from pruning_env.engine.plan import RateRule

__all__ = ["budget_keep_counts", "check_reachable", "reachable_macs"]

_BISECTION_STEPS = 48  # s is resolved to 2 / 2**48: far below one filter of any layer
_BELOW_ONE = float(np.nextafter(1.0, 0.0))
_WAYS_LOG2 = 6  # the search evaluates 2**6 - 1 points at once: six bisection halvings per round


def _keep_at(s: np.ndarray, widths: np.ndarray, current: np.ndarray, proposed: np.ndarray, current_rate: np.ndarray,
             room: np.ndarray, increment: np.ndarray, rule: RateRule) -> np.ndarray:
    """``(N, L)`` keep counts at the ``(N,)`` values ``s`` of the rule's scalar (see the module docstring);
    ``room = r_max - proposed`` and ``increment = proposed - current_rate``."""
    s = np.asarray(s, dtype=np.float64).reshape(-1, 1)
    rates = np.where(s >= 0.0, proposed + s * room, current_rate + (1.0 + s) * increment)
    np.minimum(np.maximum(rates, 0.0, out=rates), _BELOW_ONE, out=rates)  # np.clip's values, without its overhead
    return np.minimum(rule.keep_counts_unchecked(widths, rates), current)


def _bisect(first_true, lo: float, hi: float, hints: np.ndarray | None = None) -> tuple[float, float]:
    """The ``(lo, hi)`` that :data:`_BISECTION_STEPS` halvings of ``[lo, hi]`` reach for a monotone predicate (False
    at ``lo``, True at ``hi``): the adjacent points of the dyadic grid ``lo + k * (hi - lo) / 2**48`` between which
    it flips. That pair is unique, so any search over the grid finds the plain bisection's, bit for bit (every grid
    point is exact in float64). ``first_true(points)`` gives the index of the first point where the predicate holds
    (``len``: none); it is asked ``2**_WAYS_LOG2 - 1`` points at a time.

    ``hints``: values of ``s`` where the predicate may flip (the layers' breakpoints, :func:`_breakpoints`). The
    grid points at and just below them are searched first, so the search ends in about ``log_64(len(hints)) + 1``
    rounds instead of 8; a wrong or missing hint only costs rounds, never the result."""
    n = 2 ** _BISECTION_STEPS
    h = (hi - lo) / n
    k_lo, k_hi = 0, n  # the predicate is False at grid index k_lo, True at k_hi
    ways = 2 ** _WAYS_LOG2
    cand = np.empty(0, dtype=np.int64)
    if hints is not None and len(hints):
        k = np.ceil((np.asarray(hints, dtype=np.float64) - lo) / h)
        k = k[np.isfinite(k)]
        k = _sorted_unique(np.clip(k, 1, n - 1).astype(np.int64))
        cand = np.empty(2 * len(k), dtype=np.int64)  # k - 1 and k of every hint: sorted, as k is strictly increasing
        cand[0::2], cand[1::2] = k - 1, k
        cand = cand[np.concatenate([[True], cand[1:] != cand[:-1]]) & (cand > k_lo) & (cand < k_hi)]
    while k_hi - k_lo > 1:
        if len(cand):  # the hinted grid points, evenly spaced among those left
            ks = cand if len(cand) < ways else cand[(np.arange(1, ways) * len(cand)) // ways]
        else:  # an even split of what is left (integer grid indices)
            ks = _sorted_unique(k_lo + (k_hi - k_lo) * np.arange(1, ways, dtype=np.int64) // ways)
            ks = ks[(ks > k_lo) & (ks < k_hi)]
        j = first_true(lo + ks * h)
        k_lo, k_hi = (int(ks[j - 1]) if j > 0 else k_lo), (int(ks[j]) if j < len(ks) else k_hi)
        cand = cand[(cand > k_lo) & (cand < k_hi)]
    return lo + k_lo * h, lo + k_hi * h


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """``np.unique`` of an int array by sorting (a few times faster than its hash path on small arrays)."""
    x = np.sort(x)
    return x[np.concatenate([[True], x[1:] != x[:-1]])] if len(x) else x


def _breakpoints(widths: np.ndarray, a: np.ndarray, b: np.ndarray, offset: float) -> np.ndarray:
    """The ``s`` at which a layer's rate ``a + (s + offset) * b`` crosses ``(m - 1e-9) / width`` for an integer
    ``m`` in ``[1, width]``: where its kept count can change (the rate rule's floor), for layers with ``b > 0``."""
    moving = b > 0
    if not moving.any():
        return np.empty(0)
    rates, valid = _rate_grid(np.ascontiguousarray(widths, dtype=np.int64).tobytes())  # (layers, m), m <= width
    s = (rates[moving] - a[moving][:, None]) / b[moving][:, None] - offset
    return s[valid[moving]]


@functools.lru_cache(maxsize=64)
def _rate_grid(widths: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``((m - 1e-9) / width, m <= width)`` for ``m`` in ``1..max width``, per layer of the int64 ``widths``
    (their bytes: the cache key); read-only."""
    w = np.frombuffer(widths, dtype=np.int64)
    m = np.arange(1, int(w.max()) + 1)
    rates, valid = (m[None, :] - 1e-9) / w[:, None], m[None, :] <= w[:, None]
    rates.flags.writeable = valid.flags.writeable = False
    return rates, valid


def _fill(macs, under: np.ndarray, over: np.ndarray, target_macs: float) -> np.ndarray:
    """Give back, one filter at a time and layer by layer in turn, the filters of the layers that change at the
    threshold (``over - under``) while the network stays within the budget: the last jump of ``s`` may move
    several layers at once (equal rates of widths 16, 32, 64... cross an integer together)."""
    keep, room = under.copy(), over - under
    grew = True
    while grew:
        grew = False
        for i in np.flatnonzero(room > 0):
            keep[i] += 1
            if macs(keep) <= target_macs:
                room[i] -= 1
                grew = True
            else:
                keep[i] -= 1
                room[i] = 0
    return keep


def reachable_macs(macs_model: MacsModel, rule: RateRule, max_rate: float) -> int:
    """The fewest MACs any plan reaches with every layer at ``max_rate`` (what a target must allow)."""
    keep = [rule.keep_count(int(w), max_rate) for w in macs_model.widths]
    return macs_model.predict_array(keep)[0]


def check_reachable(macs_model: MacsModel, rule: RateRule, max_rate: float, macs_target: float) -> None:
    """Refuse a MACs target that no plan reaches: the one reachability rule of the env and the scripts.

    Args:
        macs_model: the unpruned network's MACs predictor (the network the run prunes: its class count and input
            shape change the MACs that no pruning removes).
        rule: the rate rule (rate -> kept filters).
        max_rate: the largest rate an agent may choose (``max(rates)``).
        macs_target: the budget as a MACs ratio (pruned / unpruned).

    Raises:
        ValueError: naming ``--macs-target``, the ratio the network keeps at ``max_rate`` and what to change.
    """
    floor = reachable_macs(macs_model, rule, max_rate)
    if floor > macs_target * macs_model.base_macs:
        raise ValueError(f"--macs-target {macs_target:g} cannot be met: with every layer at the largest rate "
                         f"{max_rate:g} the network keeps {floor / macs_model.base_macs:.4f} of its MACs; "
                         "raise --macs-target, add larger --rates, or pass --no-exact-budget")


def budget_keep_counts(
    macs_model: MacsModel,
    rule: RateRule,
    current: Sequence[int],
    proposed_rates: Sequence[float],
    target_macs: float,
    *,
    final: bool,
    max_rate: float,
) -> np.ndarray:
    """Keep counts that carry out ``proposed_rates`` under a MACs budget (the module's rule).

    Args:
        macs_model: the unpruned network's MACs predictor (its ``widths`` give the layers, in order).
        rule: the rate rule (rate -> kept filters).
        current: ``(L,)`` filters each layer keeps now (pruning never grows a layer back).
        proposed_rates: ``(L,)`` pruning rates the agents chose (shares of the ORIGINAL filters).
        target_macs: the budget in MACs per image (``macs_target * base MACs``).
        final: the episode's last step (meet the budget) or an earlier one (do not undershoot it).
        max_rate: the largest rate an agent may choose (where ``s = 1`` leads every layer).

    Returns:
        ``(L,)`` int64 keep counts, each in ``[1, current]``. On a final step their MACs are at or below
        ``target_macs`` whenever ``reachable_macs`` allows it (else every layer at ``max_rate``).
    """
    widths = np.asarray(macs_model.widths, dtype=np.int64)
    cur = np.asarray(current, dtype=np.int64)
    if cur.shape != widths.shape or np.asarray(proposed_rates).shape != widths.shape:
        raise ValueError(f"current and proposed_rates must have one entry per layer ({len(widths)}), got "
                         f"{cur.shape} and {np.asarray(proposed_rates).shape}")
    if not np.isfinite(np.asarray(proposed_rates, dtype=np.float64)).all():
        raise ValueError(f"proposed_rates must be finite pruning rates, got {np.asarray(proposed_rates).tolist()}")
    current_rate = 1.0 - cur / widths
    proposed = np.maximum(np.asarray(proposed_rates, dtype=np.float64), current_rate)
    r_max = np.maximum(float(max_rate), proposed)

    room, increment = r_max - proposed, proposed - current_rate

    def keeps(s: np.ndarray) -> np.ndarray:
        return _keep_at(s, widths, cur, proposed, current_rate, room, increment, rule)

    def keep(s: float) -> np.ndarray:
        return keeps(np.array([s]))[0]

    def macs(k: np.ndarray) -> int:
        return macs_model.predict_array(k)[0]

    def first(points: np.ndarray, holds) -> int:  # index of the first point whose network satisfies ``holds``
        ok = holds(macs_model.predict_batch(keeps(points))[0])
        return int(np.argmax(ok)) if ok.any() else len(points)

    ends = keeps(np.array([-1.0, 0.0, 1.0]))  # the least pruning, the proposal as is, the most
    least, as_proposed, most = ends
    m_least, m_proposed, m_most = macs_model.predict_batch(ends)[0]
    if final:
        if m_least <= target_macs:
            return least
        if m_most > target_macs:  # unreachable: prune as far as allowed
            return most
        # invariant: macs(lo) > target >= macs(hi)
        hints = np.concatenate([_breakpoints(widths, proposed, room, 0.0),
                                _breakpoints(widths, current_rate, increment, 1.0)])
        lo, hi = _bisect(lambda p: first(p, lambda m: m <= target_macs), -1.0, 1.0, hints)
        return _fill(macs, keep(hi), keep(lo), target_macs)
    if m_proposed >= target_macs or m_least < target_macs:
        return as_proposed if m_proposed >= target_macs else least
    # invariant: macs(lo) >= target > macs(hi)
    hints = _breakpoints(widths, current_rate, increment, 1.0)
    lo, _ = _bisect(lambda p: first(p, lambda m: m < target_macs), -1.0, 0.0, hints)
    return keep(lo)
