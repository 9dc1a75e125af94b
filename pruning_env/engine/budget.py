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

__all__ = ["budget_keep_counts", "budget_keep_counts_batch", "check_reachable", "reachable_macs"]

_BISECTION_STEPS = 48  # s is resolved to 2 / 2**48: far below one filter of any layer
_BELOW_ONE = float(np.nextafter(1.0, 0.0))
_WAYS_LOG2 = 6  # the search evaluates 2**6 - 1 points at once: six bisection halvings per round


def _keep_at(s: np.ndarray, widths: np.ndarray, current: np.ndarray, proposed: np.ndarray, current_rate: np.ndarray,
             room: np.ndarray, increment: np.ndarray, rule: RateRule) -> np.ndarray:
    """Keep counts at values ``s`` of the rule's scalar (see the module docstring): ``(N, L)`` for ``(N,)`` values
    and ``(L,)`` per-layer arrays, or any shapes that broadcast, e.g. ``(R, P, 1)`` values against ``(R, 1, L)``
    arrays of R proposals (the batched rule); ``room = r_max - proposed`` and ``increment = proposed -
    current_rate``. Elementwise float64 arithmetic: a point's counts do not depend on the shape it came in."""
    s = np.asarray(s, dtype=np.float64)
    if s.ndim <= 1:
        s = s.reshape(-1, 1)
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


def _fill(macs_batch, under: np.ndarray, over: np.ndarray, target_macs: float) -> np.ndarray:
    """Give back, one filter at a time and layer by layer in turn, the filters of the layers that change at the
    threshold (``over - under``) while the network stays within the budget: the last jump of ``s`` may move
    several layers at once (equal rates of widths 16, 32, 64... cross an integer together).

    ``under``, ``over``: ``(R, L)`` keep counts of R proposals, filled in lockstep (each row exactly as if alone:
    a row's layers are tried in order, pass after pass, until a pass gives nothing back); ``macs_batch(keep)``:
    the ``(R',)`` MACs of ``(R', L)`` keep counts."""
    keep, room = under.copy(), over - under
    while (room > 0).any():
        for i in np.flatnonzero((room > 0).any(axis=0)):
            rows = np.flatnonzero(room[:, i] > 0)
            keep[rows, i] += 1
            ok = macs_batch(keep[rows]) <= target_macs
            room[rows[ok], i] -= 1
            keep[rows[~ok], i] -= 1
            room[rows[~ok], i] = 0
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
        return _fill(lambda k: macs_model.predict_batch(k)[0], keeps(np.array([hi])), keeps(np.array([lo])),
                     target_macs)[0]
    if m_proposed >= target_macs or m_least < target_macs:
        return as_proposed if m_proposed >= target_macs else least
    # invariant: macs(lo) >= target > macs(hi)
    hints = _breakpoints(widths, current_rate, increment, 1.0)
    lo, _ = _bisect(lambda p: first(p, lambda m: m < target_macs), -1.0, 0.0, hints)
    return keep(lo)


def budget_keep_counts_batch(
    macs_model: MacsModel,
    rule: RateRule,
    current: np.ndarray,
    proposed_rates: np.ndarray,
    target_macs: float,
    *,
    final: bool,
    max_rate: float,
) -> np.ndarray:
    """:func:`budget_keep_counts` of N proposals at once, row for row the same keep counts (the same rule, grid and
    arithmetic), for many episodes stepped together (:class:`~pruning_env.envs.surrogate_vector.SurrogateVectorEnv`).

    Args:
        current: ``(N, L)`` filters each layer of each proposal keeps now.
        proposed_rates: ``(N, L)`` proposed pruning rates.
        macs_model, rule, target_macs, final, max_rate: as :func:`budget_keep_counts`'s (one budget for all rows).

    Returns:
        ``(N, L)`` int64 keep counts.

    The search differs from :func:`budget_keep_counts`'s, not its result: the threshold pair on the dyadic grid
    is unique (see :func:`_bisect`), and here it is found by 48 plain halvings of every row at once (one point
    per row per round: the fewest MACs evaluations when the rounds' overhead is shared by many rows).
    """
    widths = np.asarray(macs_model.widths, dtype=np.int64)
    cur = np.asarray(current, dtype=np.int64)
    prop = np.asarray(proposed_rates, dtype=np.float64)
    if cur.ndim != 2 or cur.shape[1:] != widths.shape or prop.shape != cur.shape:
        raise ValueError(f"current and proposed_rates must be (N, {len(widths)}) arrays (one row per proposal, one "
                         f"entry per layer), got {cur.shape} and {prop.shape}")
    if not np.isfinite(prop).all():
        raise ValueError("proposed_rates must be finite pruning rates; rows "
                         f"{np.flatnonzero(~np.isfinite(prop).all(axis=1)).tolist()[:8]} are not")
    current_rate = 1.0 - cur / widths
    proposed = np.maximum(prop, current_rate)
    r_max = np.maximum(float(max_rate), proposed)
    room, increment = r_max - proposed, proposed - current_rate

    def keeps(rows: np.ndarray, s: np.ndarray) -> np.ndarray:  # (R, P) values of rows -> (R, P, L) counts
        return _keep_at(s[:, :, None], widths, cur[rows, None], proposed[rows, None], current_rate[rows, None],
                        room[rows, None], increment[rows, None], rule)

    def macs(k: np.ndarray) -> np.ndarray:  # (..., L) -> (...)
        return macs_model.predict_batch(k.reshape(-1, len(widths)))[0].reshape(k.shape[:-1])

    everyone = np.arange(len(cur))
    ends = keeps(everyone, np.broadcast_to(np.array([-1.0, 0.0, 1.0]), (len(cur), 3)))  # least, as is, most
    m = macs(ends)
    if final:
        out = np.where((m[:, 0] <= target_macs)[:, None], ends[:, 0], ends[:, 2])  # within at least / unreachable
        search = np.flatnonzero((m[:, 0] > target_macs) & (m[:, 2] <= target_macs))
        lo, hi = -1.0, 1.0  # invariant: macs(lo) > target >= macs(hi)
    else:
        out = np.where((m[:, 1] >= target_macs)[:, None], ends[:, 1], ends[:, 0])
        search = np.flatnonzero((m[:, 1] < target_macs) & (m[:, 0] >= target_macs))
        lo, hi = -1.0, 0.0  # invariant: macs(lo) >= target > macs(hi)
    if not len(search):
        return out
    n = 2 ** _BISECTION_STEPS
    h = (hi - lo) / n
    k_lo, k_hi = np.zeros(len(search), dtype=np.int64), np.full(len(search), n, dtype=np.int64)
    for _ in range(_BISECTION_STEPS):  # the grid points lo + k * h are exact in float64, as in _bisect
        mid = (k_lo + k_hi) // 2
        m_mid = macs(keeps(search, (lo + mid * h)[:, None]))[:, 0]
        holds = m_mid <= target_macs if final else m_mid < target_macs
        k_hi, k_lo = np.where(holds, mid, k_hi), np.where(holds, k_lo, mid)
    at_lo = keeps(search, (lo + k_lo * h)[:, None])[:, 0]
    if final:
        at_hi = keeps(search, (lo + k_hi * h)[:, None])[:, 0]
        out[search] = _fill(lambda k: macs_model.predict_batch(k)[0], at_hi, at_lo, target_macs)
    else:
        out[search] = at_lo
    return out
