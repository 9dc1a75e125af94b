"""Pruning plans, the one rate rule, and plan builders.

The engine keeps low-level operations apart from policies:

* :class:`PruningPlan` is a plain value: for each prunable layer, its original
  width and the sorted indices of the filters it *keeps*. Plans can be saved
  (JSON / dict), loaded, compared, hashed (:meth:`PruningPlan.key`) and applied.
* Plan builders turn importance scores (``{conv name: (C_out,) tensor}``, LOW
  values are pruned first) into plans: :func:`plan_uniform`, :func:`plan_per_layer`,
  :func:`plan_global`, and the primitive :func:`plan_top_k` (keep counts given).
* :func:`apply` performs the surgery: it returns a NEW, physically smaller model
  and never touches the original.
* :class:`MacsModel` predicts the MACs and parameters of any plan in
  microseconds, without building a model (for an RL environment's hot path).

Which layers are prunable is decided by :mod:`pruning_env.engine.graph` (block-internal
convs of ResNets only; see its docstring).

Rates and counts
----------------
A pruning *rate* ``r`` in ``[0, 1)`` removes ``floor(r * C_out)`` filters of a
layer with ``C_out`` filters, so a layer never loses more than ``r`` of its
filters; it keeps ``k = C_out - floor(r * C_out)``. With ``round_to = m > 1`` the
kept count is then rounded to the nearest multiple of ``m`` (at least ``m``, at
most ``C_out``); finally ``k = max(k, min(min_keep, C_out))``: ``min_keep`` wins.
Among equal scores the filter with the lower index is pruned first.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from pruning_env.core.config import check_settings, option
from pruning_env.engine.graph import PrunableLayer, prunable_layers

__all__ = [
    "PlanError",
    "PruningPlan",
    "RateRule",
    "keep_count_for_rate",
    "narrow_plan",
    "plan_global",
    "plan_per_layer",
    "plan_top_k",
    "plan_uniform",
    "top_k_indices",
]

PLAN_FORMAT = "pruning_env.plan/1"


class PlanError(ValueError):
    """A plan does not fit a model, or plan-builder arguments are invalid."""


# ----------------------------------------------------------------------------- plans


class PruningPlan:
    """Which filters each prunable layer keeps.

    Args:
        keep: ``{layer name: kept filter indices}`` (any int sequence or 1-D tensor;
            stored sorted, as a tuple). Layers not listed keep all their filters.
        widths: ``{layer name: number of filters of the unpruned layer}`` for every
            layer in ``keep`` (the plan's reference widths, for :meth:`keep_ratio`
            and validation).

    The plan is immutable; construct it freely, then :meth:`validate` it against a
    model (``apply`` does so). Equality and hashing compare widths and kept indices.
    """

    __slots__ = ("_index_cache", "_keep", "_key", "_widths")

    def __init__(self, keep: Mapping[str, Sequence[int] | torch.Tensor], widths: Mapping[str, int]) -> None:
        kept: dict[str, tuple[int, ...]] = {}
        for name, idx in keep.items():
            if isinstance(idx, torch.Tensor):
                if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool or idx.dim() > 1:
                    raise PlanError(f"layer {name!r}: kept indices must be a 1-D integer tensor, got {idx.dtype} "
                                    f"of shape {tuple(idx.shape)}")
                kept[str(name)] = tuple(sorted(idx.tolist()))  # integers by its dtype
                continue
            values = list(idx)
            if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
                raise PlanError(f"layer {name!r}: kept indices must be integers, got {values[:5]}...")
            kept[str(name)] = tuple(sorted(int(v) for v in values))
        missing = [n for n in kept if n not in widths]
        if missing:
            raise PlanError(f"widths missing for layers {missing}")
        self._keep = MappingProxyType(kept)
        self._widths = MappingProxyType({n: int(widths[n]) for n in kept})
        self._key: str | None = None
        self._index_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def _trusted(cls, keep: Mapping[str, tuple[int, ...]], widths: Mapping[str, int]) -> PruningPlan:
        """A plan from kept indices that are already sorted tuples of Python ints and ``widths`` that already
        cover them (the engine's own transitions): :meth:`__init__` without its checks and copies."""
        plan = cls.__new__(cls)
        plan._keep = MappingProxyType(dict(keep))
        plan._widths = widths if isinstance(widths, MappingProxyType) else MappingProxyType(dict(widths))
        plan._key = None
        plan._index_cache = {}
        return plan

    # -- views
    @property
    def keep(self) -> Mapping[str, tuple[int, ...]]:
        """``{layer: sorted kept indices}`` (read-only)."""
        return self._keep

    @property
    def widths(self) -> Mapping[str, int]:
        """``{layer: width of the unpruned layer}`` (read-only)."""
        return self._widths

    @property
    def layers(self) -> list[str]:
        """Layer names in the plan, in insertion order."""
        return list(self._keep)

    def indices(self, layer: str) -> torch.Tensor:
        """Kept filter indices of ``layer`` as a new ``(k,)`` int64 tensor."""
        cached = self._index_cache.get(layer)
        if cached is None:
            cached = self._index_cache[layer] = torch.tensor(self._keep[layer], dtype=torch.long)
        return cached.clone()

    def keep_count(self, layer: str) -> int:
        return len(self._keep[layer])

    def keep_counts(self) -> dict[str, int]:
        """``{layer: number of kept filters}``."""
        return {n: len(k) for n, k in self._keep.items()}

    def keep_ratio(self, layer: str) -> float:
        """Kept fraction of ``layer``'s filters, in (0, 1]."""
        return len(self._keep[layer]) / self._widths[layer]

    def keep_ratios(self) -> dict[str, float]:
        """``{layer: kept fraction of its filters}``."""
        return {n: self.keep_ratio(n) for n in self._keep}

    def pruned(self, layer: str) -> tuple[int, ...]:
        """Indices of the filters ``layer`` removes."""
        kept = set(self._keep[layer])
        return tuple(i for i in range(self._widths[layer]) if i not in kept)

    @property
    def kept_filters(self) -> int:
        return sum(len(k) for k in self._keep.values())

    @property
    def total_filters(self) -> int:
        return sum(self._widths.values())

    # -- constructors
    @classmethod
    def full(cls, layers: Sequence[PrunableLayer]) -> PruningPlan:
        """The identity plan: every layer keeps all its filters."""
        return cls._trusted({lay.name: tuple(range(lay.out_channels)) for lay in layers},
                            {lay.name: int(lay.out_channels) for lay in layers})

    @classmethod
    def from_masks(cls, masks: Mapping[str, torch.Tensor | Sequence[bool]]) -> PruningPlan:
        """From boolean keep masks ``{layer: (C_out,) bool}`` (True = keep)."""
        keep, widths = {}, {}
        for name, mask in masks.items():
            m = torch.as_tensor(mask, dtype=torch.bool).flatten()
            keep[name] = torch.nonzero(m).flatten()
            widths[name] = int(m.numel())
        return cls(keep, widths)

    # -- serialisation
    def to_dict(self) -> dict[str, Any]:
        """``{"format": ..., "keep": {name: [int, ...]}, "widths": {name: int}}`` (JSON-safe)."""
        return {"format": PLAN_FORMAT, "keep": {n: list(k) for n, k in self._keep.items()},
                "widths": dict(self._widths)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PruningPlan:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(d, Mapping) or "keep" not in d or "widths" not in d:
            raise PlanError("not a pruning plan: expected a dict with 'keep' and 'widths' (see PruningPlan.to_dict)")
        fmt = d.get("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise PlanError(f"unsupported plan format {fmt!r}; this version reads {PLAN_FORMAT!r}")
        keep, widths = d["keep"], d["widths"]
        if not isinstance(keep, Mapping) or not isinstance(widths, Mapping):
            raise PlanError("malformed plan: 'keep' and 'widths' must map layer names to indices / widths")
        try:
            return cls(keep, widths)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, PlanError):
                raise
            raise PlanError(f"malformed plan: {exc}") from None

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from None

    # -- identity
    def key(self) -> str:
        """A stable hex digest of the plan (same across processes), for caches.

        Layers that keep every filter are ignored, so a plan and its identity-padded
        version (``PruningPlan.full`` entries added) share a key.
        """
        if self._key is None:
            h = hashlib.blake2b(digest_size=16)
            for name in sorted(self._keep):
                kept, width = self._keep[name], self._widths[name]
                if len(kept) == width and kept == tuple(range(width)):
                    continue
                h.update(f"{name}\x00{width}\x00".encode())
                h.update(np.asarray(kept, dtype=np.int64).tobytes())
                h.update(b"\x01")
            self._key = h.hexdigest()
        return self._key

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PruningPlan):
            return NotImplemented
        return dict(self._keep) == dict(other._keep) and dict(self._widths) == dict(other._widths)

    def __hash__(self) -> int:
        return hash(self.key())

    def __reduce__(self) -> tuple[Any, ...]:  # picklable despite the read-only mapping views
        return (PruningPlan, (dict(self._keep), dict(self._widths)))

    def __copy__(self) -> PruningPlan:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, Any]) -> PruningPlan:
        return self

    def __repr__(self) -> str:
        ratios = ", ".join(f"{n}: {len(k)}/{self._widths[n]}" for n, k in self._keep.items())
        return f"PruningPlan({ratios})"

    # -- validation
    def validate(self, model_or_layers: nn.Module | Sequence[PrunableLayer],
                 input_shape: tuple[int, int, int] = (3, 32, 32)) -> None:
        """Raise :class:`PlanError` unless the plan fits.

        Args:
            model_or_layers: a model (its prunable layers are found with
                :func:`~pruning_env.engine.graph.prunable_layers`) or those layers.
            input_shape: ``(C, H, W)`` when a model is given.

        Checks: every layer is prunable, its width equals the plan's width, indices
        are in ``[0, width)``, without duplicates, and at least one is kept.
        """
        layers = (prunable_layers(model_or_layers, input_shape) if isinstance(model_or_layers, nn.Module)
                  else model_or_layers)
        by_name = {lay.name: lay for lay in layers}
        for name, kept in self._keep.items():
            layer = by_name.get(name)
            if layer is None:
                known = ", ".join(list(by_name)[:8]) + (", ..." if len(by_name) > 8 else "")
                raise PlanError(f"layer {name!r} is not a prunable layer of this model (prunable: {known or 'none'})")
            width = self._widths[name]
            if width != layer.out_channels:
                raise PlanError(f"layer {name!r}: the plan was made for {width} filters but the model has "
                                f"{layer.out_channels} (a plan applies to the unpruned model it was made for)")
            if not kept:
                raise PlanError(f"layer {name!r}: the plan keeps no filter (keep at least one)")
            if kept[0] < 0 or kept[-1] >= width:
                bad = kept[0] if kept[0] < 0 else kept[-1]
                raise PlanError(f"layer {name!r}: filter index {bad} out of range [0, {width})")
            if len(set(kept)) != len(kept):
                dup = sorted({i for i in kept if kept.count(i) > 1})
                raise PlanError(f"layer {name!r}: duplicate filter indices {dup[:8]}")


# ----------------------------------------------------------------------------- builders


def _as_scores(scores: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if not scores:
        raise PlanError("no scores given")
    out = {}
    for name, s in scores.items():
        t = torch.as_tensor(s).detach().to("cpu", torch.float64).flatten()
        if t.numel() == 0:
            raise PlanError(f"layer {name!r}: empty score vector")
        if not torch.isfinite(t).all():
            raise PlanError(f"layer {name!r}: scores contain NaN or inf")
        out[str(name)] = t
    return out


def _check_rate(rate: float, what: str = "rate") -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)) or not 0.0 <= float(rate) < 1.0:
        raise PlanError(f"{what} must be a number in [0, 1) (the fraction of filters to remove), got {rate!r}")
    return float(rate)


def _check_ints(min_keep: int, round_to: int) -> None:
    if isinstance(min_keep, bool) or not isinstance(min_keep, (int, np.integer)) or min_keep < 1:
        raise PlanError(f"min_keep must be an integer >= 1, got {min_keep!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
        raise PlanError(f"round_to must be an integer >= 1, got {round_to!r}")


def _adjust_count(k: Any, width: Any, min_keep: int, round_to: int) -> Any:
    """Round ``k`` to a multiple of ``round_to`` (>= one multiple, <= width), then enforce ``min_keep`` (numbers, or
    numpy arrays of many layers at once)."""
    if round_to > 1:
        k = round_to * np.maximum(1, np.floor(k / round_to + 0.5))
    k = np.minimum(k, width)
    return np.maximum(k, np.minimum(min_keep, width))


def _kept(width: Any, rate: Any, min_keep: int, round_to: int) -> Any:
    """THE arithmetic of the rate rule, for one layer (numbers) or many at once (numpy arrays): ``floor(rate *
    width)`` filters removed, then :func:`_adjust_count`."""
    return _adjust_count(width - np.floor(rate * width + 1e-9), width, min_keep, round_to)


def keep_count_for_rate(width: int, rate: float, *, min_keep: int = 1, round_to: int = 1) -> int:
    """Filters kept of a ``width``-filter layer at pruning ``rate`` (see the module docstring).

    THE rate rule of the package: the plan builders, the env's actions and observation
    features, the prune CLI and the scripts all call this function (through
    :class:`RateRule` or directly); ``tests/test_rate_rule.py`` pins them to it.
    """
    rate = _check_rate(rate)
    _check_ints(min_keep, round_to)
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
        raise PlanError(f"width must be an integer >= 1 (filters of the unpruned layer), got {width!r}")
    return int(_kept(int(width), rate, min_keep, round_to))


def keep_counts_for_rates(widths: Any, rates: Any, *, min_keep: int = 1, round_to: int = 1) -> np.ndarray:
    """:func:`keep_count_for_rate` of many layers at once: ``(L,)`` int64 kept filters of ``(L,)`` ``widths`` at
    ``(L,)`` ``rates`` (the same arithmetic, vectorised; the exact budget's bisection calls it)."""
    _check_ints(min_keep, round_to)
    w, r = np.asarray(widths), np.asarray(rates, dtype=np.float64)
    if w.shape != r.shape or w.ndim != 1 or not np.issubdtype(w.dtype, np.integer) or (w < 1).any():
        raise PlanError(f"widths must be integers >= 1 with one rate each, got {widths!r} and {rates!r}")
    if not (np.isfinite(r).all() and (r >= 0).all() and (r < 1).all()):
        raise PlanError(f"rates must be numbers in [0, 1) (the fraction of filters to remove), got {rates!r}")
    return _kept(w.astype(np.int64), r, min_keep, round_to).astype(np.int64)


@dataclass(frozen=True)
class RateRule:
    """The settings of the rate rule (:func:`keep_count_for_rate`) that a caller may change."""

    min_keep: int = option(1, "filters every layer keeps at least", min=1)
    round_to: int = option(1, "round every layer's kept filter count to a multiple of this", min=1)

    def __post_init__(self) -> None:
        check_settings(self)

    def keep_count(self, width: int, rate: float) -> int:
        """Filters a ``width``-filter layer keeps at pruning ``rate`` in [0, 1)."""
        return keep_count_for_rate(width, rate, min_keep=self.min_keep, round_to=self.round_to)

    def keep_counts(self, widths: Any, rates: Any) -> np.ndarray:
        """:meth:`keep_count` of many layers at once (``(L,)`` arrays in, ``(L,)`` int64 out)."""
        return keep_counts_for_rates(widths, rates, min_keep=self.min_keep, round_to=self.round_to)

    def keep_counts_unchecked(self, widths: np.ndarray, rates: np.ndarray) -> np.ndarray:
        """:meth:`keep_counts` of int64 ``widths`` and float64 ``rates`` in [0, 1) that broadcast (e.g. ``(L,)``
        and ``(N, L)``), without the checks: for arrays the caller made valid (the exact budget's search)."""
        return _kept(widths, rates, self.min_keep, self.round_to).astype(np.int64)


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The filters a layer keeps: indices of the ``k`` highest of its ``(C,)`` ``scores`` (low = pruned first),
    ascending; among equal scores the lower index is pruned first. The one tie-break of every plan (the
    ``plan_*`` functions, the env's transition)."""
    return torch.from_numpy(top_k_positions(_scores_array(scores), k)).to(scores.device)


def _scores_array(scores: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy of ``(C,)`` scores (float32 for dtypes numpy lacks, e.g. bfloat16: an exact widening)."""
    t = scores.detach().cpu()
    return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()


def top_k_positions(scores: np.ndarray, k: int) -> np.ndarray:
    """:func:`top_k_indices` of a ``(C,)`` numpy array (the same rule: a stable ascending sort, the last ``k``),
    as an ascending int64 array."""
    order = np.argsort(scores, kind="stable")  # ascending: pruned first
    return np.sort(order[len(order) - k:]).astype(np.int64)


def plan_top_k(scores: Mapping[str, Any], keep_counts: Mapping[str, int]) -> PruningPlan:
    """Keep the ``keep_counts[layer]`` highest-scoring filters of each layer.

    Args:
        scores: ``{layer: (C_out,) scores}``, low = prune first.
        keep_counts: ``{layer: filters to keep}`` in ``[1, C_out]``; layers of
            ``scores`` not listed keep everything.
    """
    s = _as_scores(scores)
    unknown = [n for n in keep_counts if n not in s]
    if unknown:
        raise PlanError(f"keep counts given for layers without scores: {unknown}")
    keep, widths = {}, {}
    for name, sc in s.items():
        width = sc.numel()
        k = int(keep_counts.get(name, width))
        if not 1 <= k <= width:
            raise PlanError(f"layer {name!r}: keep count {k} outside [1, {width}]")
        keep[name] = top_k_indices(sc, k)
        widths[name] = width
    return PruningPlan(keep, widths)


def narrow_plan(plan: PruningPlan, scores: Mapping[str, Any], keep_counts: Sequence[int] | Mapping[str, int]
                ) -> PruningPlan:
    """Prune ``plan`` further: each layer keeps its ``keep_counts`` highest-scoring CURRENT filters (a count at or
    above what the layer keeps now leaves it as it is). The transition of the env, one step of iterative pruning.

    Args:
        plan: the plan now.
        scores: ``{layer: (k,) scores}`` of each layer's ``k`` kept filters (in ``plan.indices(layer)`` order),
            low = prune first; layers whose count does not shrink need none.
        keep_counts: filters each layer keeps after the step, ``{layer: n}`` or ``(L,)`` in ``plan.layers`` order.
    """
    counts = keep_counts if isinstance(keep_counts, Mapping) else dict(zip(plan.layers, keep_counts))
    keep = {}
    for name, kept in plan.keep.items():
        n_keep = int(counts.get(name, len(kept)))
        if n_keep < 1:
            raise PlanError(f"layer {name!r}: keep count {n_keep} < 1")
        if n_keep >= len(kept):
            keep[name] = kept
            continue
        sc = scores[name]
        sc = _scores_array(torch.as_tensor(sc))  # a list as torch reads it (float32), an array in its own dtype
        if sc.shape != (len(kept),):
            raise PlanError(f"layer {name!r}: {sc.shape} scores for its {len(kept)} kept filters")
        # positions into the sorted kept indices, ascending: the kept indices stay sorted
        keep[name] = tuple(np.asarray(kept, dtype=np.int64)[top_k_positions(sc, n_keep)].tolist())
    return PruningPlan._trusted(keep, plan.widths)


def plan_uniform(scores: Mapping[str, Any], rate: float, *, min_keep: int = 1, round_to: int = 1) -> PruningPlan:
    """Prune the same fraction ``rate`` in [0, 1) of every layer (lowest scores first)."""
    return plan_per_layer(scores, {n: rate for n in scores}, min_keep=min_keep, round_to=round_to)


def plan_per_layer(scores: Mapping[str, Any], rates: Mapping[str, float], *, min_keep: int = 1,
                   round_to: int = 1) -> PruningPlan:
    """Prune ``rates[layer]`` in [0, 1) of each layer; layers missing from ``rates`` keep everything."""
    _check_ints(min_keep, round_to)
    s = _as_scores(scores)
    unknown = [n for n in rates if n not in s]
    if unknown:
        raise PlanError(f"rates given for layers without scores: {unknown}")
    counts = {}
    for name, rate in rates.items():
        r = _check_rate(rate, f"rate of layer {name!r}")
        counts[name] = keep_count_for_rate(s[name].numel(), r, min_keep=min_keep, round_to=round_to)
    return plan_top_k(s, counts)


def plan_global(scores: Mapping[str, Any], rate: float, *, min_keep: int = 1, round_to: int = 1) -> PruningPlan:
    """Prune ``floor(rate * total filters)`` filters ranked across all layers.

    Scores of different layers live on different scales (e.g. L1 norms grow with
    fan-in), so each layer's scores are first divided by their mean absolute value
    (a layer of all-zero scores stays zero). The lowest normalised scores are
    then pruned globally, never touching a layer's ``min_keep`` best filters.
    ``round_to`` is applied afterwards per layer, so the total is then approximate.
    """
    r = _check_rate(rate)
    _check_ints(min_keep, round_to)
    s = _as_scores(scores)
    names = list(s)
    widths = [s[n].numel() for n in names]
    normed, candidate, owner = [], [], []
    for i, name in enumerate(names):
        sc = s[name]
        scale = sc.abs().mean()
        sc = sc / scale if scale > 0 else torch.zeros_like(sc)
        protected = torch.zeros(sc.numel(), dtype=torch.bool)
        protected[top_k_indices(sc, min(min_keep, sc.numel()))] = True
        normed.append(sc)
        candidate.append(~protected)
        owner.append(torch.full((sc.numel(),), i, dtype=torch.long))
    all_scores, all_cand, all_owner = torch.cat(normed), torch.cat(candidate), torch.cat(owner)
    n_prune = min(math.floor(r * all_scores.numel() + 1e-9), int(all_cand.sum()))
    order = torch.sort(all_scores[all_cand], stable=True).indices[:n_prune]
    pruned_per_layer = torch.bincount(all_owner[all_cand][order], minlength=len(names)).tolist()
    counts = {n: int(_adjust_count(w - p, w, min_keep, round_to)) for n, w, p in zip(names, widths, pruned_per_layer)}
    return plan_top_k(s, counts)
