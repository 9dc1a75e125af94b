"""The env's observation features: one declared list of named columns, and how each is computed.

Every observation is assembled BY NAME from this list (:func:`assemble`): the column order is the
declaration order (:data:`FEATURES`, then one ``removed_mass_<k>`` per grid rate k), the env's
documented observation table is generated from it (:func:`observation_table`), and a feature is found
by name with ``observation_features(K).index(name)``. Adding a feature is declaring it here and
computing it under that name; :func:`assemble` refuses a computed set that differs from the declared one.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pruning_env.criteria import minmax
from pruning_env.engine.flops import count
from pruning_env.engine.graph import PrunableLayer

__all__ = [
    "DSFP_FEATURES",
    "DYNAMIC_FEATURES",
    "FEATURES",
    "GLOBAL_FEATURES",
    "OBSERVATION_FEATURES",
    "REMOVED_MASS",
    "STATIC_FEATURES",
    "Feature",
    "LayerDsfp",
    "assemble",
    "combine_dsfp",
    "dsfp_features",
    "dsfp_matrix",
    "dsfp_names",
    "dynamic_columns",
    "kept_table",
    "layer_dsfp",
    "observation_features",
    "observation_table",
    "removed_mass",
    "removed_masses",
    "rst_table",
    "static_features",
]

LOG_FUSED_MAX = 2.5  # log of the largest possible DSFP fused score: |g-t|+|t-k|+0.5|g-k| <= 2.5


@dataclass(frozen=True)
class Feature:
    """One observation column (every value in [0, 1]).

    Attributes:
        name: its name (unique; the column is found by it).
        group: ``static`` (the unpruned network's, computed once), ``dynamic`` (the episode's state) or
            ``dsfp`` (from the current network's DSFP components, measured with the plan).
        meaning: what it is, with its normalisation.
    """

    name: str
    group: str
    meaning: str


FEATURES: tuple[Feature, ...] = (
    Feature("depth", "static", "layer index / (L - 1)"),
    Feature("in_channels", "static", "original input channels / widest layer of the network"),
    Feature("out_channels", "static", "original filters / widest layer of the network"),
    Feature("kernel_area", "static", "k_h * k_w / 25 (clipped)"),
    Feature("stride", "static", "stride / 2 (clipped)"),
    Feature("fmap_size", "static", "output height / input height"),
    Feature("macs_share", "static", "the layer's share of the unpruned network's MACs"),
    Feature("params_share", "static", "the layer's share of the unpruned network's parameters"),
    Feature("keep_ratio", "dynamic", "current / original filters of this layer"),
    Feature("input_keep_ratio", "dynamic", "the same for the prunable layer feeding it (1 if none)"),
    Feature("macs_ratio", "dynamic", "current / unpruned MACs of the whole network"),
    Feature("acc_ratio", "dynamic", "last measured accuracy / unpruned (clipped to 1)"),
    Feature("progress", "dynamic", "step / T"),
    Feature("macs_target", "dynamic", "the exact budget's target MACs ratio (0 without one)"),
    Feature("macs_to_cut", "dynamic", "max(0, macs_ratio - macs_target): what the budget still asks (0 without one)"),
    *(Feature(f"fused_{s}", "dsfp", f"{s} of log(DSFP fused score) / 2.5 over the current filters")
      for s in ("mean", "std", "min", "max")),
    *(Feature(f"{c}_{s}", "dsfp", f"{s} of the min-max normalised DSFP {c} component")
      for c in ("grad", "taylor", "kl") for s in ("mean", "std")),
    *(Feature(f"{c}_share", "dsfp", f"the layer's share of the network's raw {c} component mass")
      for c in ("grad", "taylor", "kl")),
)
REMOVED_MASS = Feature("removed_mass_<k>", "dsfp", "share of the layer's sensitivity (mean of the normalised "
                       "components) that pruning to grid rate k would remove now")


def _names(group: str) -> tuple[str, ...]:
    return tuple(f.name for f in FEATURES if f.group == group)


STATIC_FEATURES = _names("static")
DYNAMIC_FEATURES = _names("dynamic")
DSFP_FEATURES = _names("dsfp")  # + one removed_mass_<k> per grid rate
OBSERVATION_FEATURES = tuple(f.name for f in FEATURES)  # + one removed_mass_<k> per grid rate
#: The columns ``state()`` appends to the concatenated observations (values of the whole network).
GLOBAL_FEATURES = ("macs_ratio", "params_ratio", "acc_ratio", "progress")


def removed_mass(k: int) -> str:
    """The name of the ``removed_mass`` column of grid rate ``k`` (an index into ``config.rates``)."""
    return f"removed_mass_{k}"


def observation_features(num_rates: int) -> tuple[str, ...]:
    """The names of an observation's columns, in order, for a grid of ``num_rates`` rates (K)."""
    return OBSERVATION_FEATURES + tuple(removed_mass(k) for k in range(num_rates))


def assemble(columns: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """``(L, len(names))`` float32 in [0, 1]: the ``(L,)`` ``columns`` stacked in the order of ``names``; with
    ``(N, L)`` columns among them (N plans at once), ``(N, L, len(names))``, the ``(L,)`` ones repeated per plan.

    ``ValueError`` when the computed columns are not exactly the declared ones (a feature computed but not
    declared, or declared but not computed)."""
    declared = set(names)
    missing = [n for n in names if n not in columns]
    undeclared = [n for n in columns if n not in declared]
    if missing or undeclared:
        raise ValueError(f"observation features: declared but not computed {missing}, computed but not declared "
                         f"{undeclared} (declare each in pruning_env.envs.features.FEATURES and compute it by name)")
    if not names:
        raise ValueError("observation features: no feature names to assemble")
    cols = [np.asarray(columns[n]) for n in names]
    shapes = [c.shape for c in cols]
    shape = max(shapes, key=len)
    for n, sh in zip(names, shapes):
        if sh != shape and sh != shape[-1:]:
            raise ValueError(f"observation feature {n!r} has shape {sh}, {names[0]!r} has {shapes[0]} (columns are "
                             f"(L,) or (N, L), all of one L and N)")
    mat = np.empty((*shape, len(names)), dtype=np.float32)
    for j, col in enumerate(cols):  # each column cast to float32 as it is written
        mat[..., j] = col
    return np.clip(mat, 0.0, 1.0, out=mat)


def dynamic_columns(keep_ratio: np.ndarray, input_layer: Sequence[int], macs_ratio: Any, acc_ratio: Any,
                    progress: float, macs_target: float | None) -> dict[str, np.ndarray]:
    """THE computation of :data:`DYNAMIC_FEATURES`, for one plan or many at once.

    Args:
        keep_ratio: ``(L,)`` or ``(N, L)`` float64, kept / original filters per layer.
        input_layer: ``(L,)`` index of the prunable layer feeding each layer (-1: none).
        macs_ratio, acc_ratio: the network's, a number or ``(N,)``.
        progress: step / T.
        macs_target: the exact budget's MACs ratio (None or 0: none).
    """
    def spread(v: Any) -> np.ndarray:  # one value per plan -> one per plan and layer
        out = np.empty(keep_ratio.shape)
        out[...] = np.asarray(v, dtype=np.float64)[..., None]
        return out

    src = np.asarray(input_layer)
    target = float(macs_target or 0.0)
    macs_ratio = np.asarray(macs_ratio, dtype=np.float64)
    return {"keep_ratio": keep_ratio,  # the array given, as its column (both envs pass a new one)
            "input_keep_ratio": np.where(src >= 0, keep_ratio[..., np.maximum(src, 0)], 1.0),
            "macs_ratio": spread(macs_ratio), "acc_ratio": spread(np.minimum(1.0, acc_ratio)),
            "progress": spread(progress), "macs_target": spread(target),
            "macs_to_cut": spread(np.maximum(0.0, macs_ratio - target) if target else 0.0)}


def observation_table() -> str:
    """The observation layout as an RST table (index, name, meaning), generated from :data:`FEATURES`."""
    rows = [(str(i), f.name, f.meaning) for i, f in enumerate(FEATURES)]
    rows.append((f"{len(FEATURES)}+k", REMOVED_MASS.name, REMOVED_MASS.meaning))
    return rst_table(("idx", "feature", "meaning (all in [0, 1])"), rows)


def rst_table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]], indent: int = 4) -> str:
    """An RST simple table of ``head`` and ``rows`` (the last column may run long), indented for a docstring."""
    widths = [max(len(r[c]) for r in (head, *rows)) for c in range(len(head) - 1)] + [60]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, *("  ".join(f"{cell:<{w}}" for cell, w in zip(r, widths)).rstrip() for r in (head,)), rule,
             *("  ".join(f"{cell:<{w}}" for cell, w in zip(r, widths)).rstrip() for r in rows), rule]
    return textwrap.indent("\n".join(lines), " " * indent)


def static_features(model: nn.Module, layers: Sequence[PrunableLayer], input_shape: tuple[int, int, int],
                    base_macs: int, base_params: int) -> dict[str, np.ndarray]:
    """The unpruned network's facts per layer: ``{name: (L,) float32 in [0, 1]}`` for :data:`STATIC_FEATURES`."""
    report = count(model, input_shape)
    widest = max(max(layer.in_channels, layer.out_channels) for layer in layers)
    n = len(layers)
    rows = [{
        "depth": i / max(n - 1, 1),
        "in_channels": layer.in_channels / widest,
        "out_channels": layer.out_channels / widest,
        "kernel_area": min(1.0, layer.kernel_size[0] * layer.kernel_size[1] / 25),
        "stride": min(1.0, layer.stride[0] / 2),
        "fmap_size": layer.out_hw[0] / input_shape[1],
        "macs_share": report.per_layer_macs[layer.name] / base_macs,
        "params_share": report.per_layer_params[layer.name] / base_params,
    } for i, layer in enumerate(layers)]
    return _columns(rows)


@dataclass(frozen=True)
class LayerDsfp:
    """One layer's DSFP statistics of its current filters: what :func:`combine_dsfp` needs from it.

    Attributes:
        row: ``fused_{mean,std,min,max}`` and ``<component>_{mean,std}`` of :data:`DSFP_FEATURES`.
        sums: the raw ``(grad, taylor, kl)`` sums over the layer's filters (for the ``_share`` features).
        cum: ``(C + 1,)`` float64, the cumulative normalised sensitivity of the filters in pruning order.
        total: the layer's normalised sensitivity (the sum of the filters').
    """

    row: dict[str, float]
    sums: tuple[float, float, float]
    cum: np.ndarray
    total: float


def layer_dsfp(grad: torch.Tensor, taylor: torch.Tensor, kl: torch.Tensor, fused: torch.Tensor,
               order: torch.Tensor, normalised: tuple[torch.Tensor, ...] | None = None) -> LayerDsfp:
    """The statistics of one layer's ``(C,)`` components, their fusion and the pruning ``order`` (low first);
    ``normalised``: the components' ``minmax`` in float64 when the caller has them (the same values)."""
    if normalised is None:
        normalised = (minmax(grad.double()), minmax(taylor.double()), minmax(kl.double()))
    comps = dict(zip(("grad", "taylor", "kl"), normalised))
    log_f = torch.log(fused.double()) / LOG_FUSED_MAX
    sens = (comps["grad"] + comps["taylor"] + comps["kl"]) / 3.0
    ranked = sens[torch.argsort(order, stable=True)]
    cum = np.concatenate([[0.0], torch.cumsum(ranked, 0).numpy()])
    row = {"fused_mean": float(log_f.mean()), "fused_std": _std(log_f), "fused_min": float(log_f.min()),
           "fused_max": float(log_f.max())}
    for c, values in comps.items():
        row[f"{c}_mean"], row[f"{c}_std"] = float(values.mean()), _std(values)
    return LayerDsfp(row, (float(grad.sum()), float(taylor.sum()), float(kl.sum())), cum, float(sens.sum()))


def removed_masses(layer: LayerDsfp, kept: np.ndarray) -> np.ndarray:
    """``(K,)``: the share of the layer's sensitivity that pruning to each grid rate would remove now (``kept``:
    the ``(K,)`` filters the layer keeps at each rate); by filter count when the layer has no sensitivity."""
    current = len(layer.cum) - 1
    n_prune = np.maximum(0, current - np.asarray(kept, dtype=np.int64))
    return layer.cum[n_prune] / layer.total if layer.total > 0 else n_prune / max(current, 1)


def combine_dsfp(layers: Sequence[LayerDsfp], kept: np.ndarray,
                 removed: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The DSFP features of every layer (:func:`dsfp_features`) from the layers' statistics and ``kept``, the
    ``(L, K)`` filters each layer keeps at each grid rate (the env's rate rule); ``removed``: the layers'
    :func:`removed_masses`, when known."""
    names = list(layers[0].row)
    other = next((layer for layer in layers if layer.row.keys() != layers[0].row.keys()), None)
    if other is not None:
        raise ValueError(f"combine_dsfp: the layers' statistics have different features ({sorted(other.row)} and "
                         f"{sorted(names)}); make each with layer_dsfp")
    rows = np.array([[layer.row[n] for n in names] for layer in layers], dtype=np.float64)  # (L, row features)
    sums = np.array([layer.sums for layer in layers], dtype=np.float64)  # (L, 3)
    if removed is None:
        removed = [removed_masses(layer, kept[i]) for i, layer in enumerate(layers)]
    masses = np.array(removed, dtype=np.float64).reshape(len(layers), -1)  # (L, K)
    mat = dsfp_matrix(rows, sums, masses)
    return {name: mat[:, i] for i, name in enumerate(dsfp_names(names, masses.shape[1]))}


def dsfp_names(row_names: Sequence[str], num_rates: int) -> list[str]:
    """The columns of :func:`dsfp_matrix`: a layer's ``row`` features, the three ``_share`` features, then one
    ``removed_mass_<k>`` per grid rate."""
    return [*row_names, *(f"{c}_share" for c in ("grad", "taylor", "kl")),
            *(removed_mass(k) for k in range(num_rates))]


def dsfp_matrix(rows: np.ndarray, sums: np.ndarray, masses: np.ndarray) -> np.ndarray:
    """THE combination of the layers' DSFP statistics into features, for one plan (``(L, .)`` arrays) or many at
    once (``(N, L, .)``): ``(..., L, R + 3 + K)`` float32 in [0, 1] (columns: :func:`dsfp_names`).

    Args:
        rows: ``(..., L, R)`` float64, each layer's :attr:`LayerDsfp.row` values.
        sums: ``(..., L, 3)`` float64, each layer's raw component sums (a ``_share`` is the layer's sum over the
            network's, summed in layer order; 1 where the network's is 0).
        masses: ``(..., L, K)`` float64, each layer's :func:`removed_masses`.
    """
    mass = np.add.accumulate(sums, axis=-2)[..., -1, :] + 0.0  # a plain fold in layer order (not pairwise): the
    mass[mass == 0] = 1.0  # same float64 sum for every shape (+ 0.0: a -0.0 total counts as 0)
    mat = np.concatenate([rows, sums / mass[..., None, :], masses], axis=-1).astype(np.float32)
    return np.clip(mat, 0.0, 1.0, out=mat)


def dsfp_features(
    names: Sequence[str],
    grad: Mapping[str, torch.Tensor],
    taylor: Mapping[str, torch.Tensor],
    kl: Mapping[str, torch.Tensor],
    fused: Mapping[str, torch.Tensor],
    order: Mapping[str, torch.Tensor],
    rates: Sequence[float],
    keep_count: Callable[[int, float], int],
) -> dict[str, np.ndarray]:
    """The DSFP features of the CURRENT filters: ``{name: (L,) float32 in [0, 1]}`` for :data:`DSFP_FEATURES`
    and ``removed_mass_<k>`` of every grid rate k.

    Args:
        names: the prunable layers, in agent order.
        grad, taylor, kl: per layer, the ``(C_current,)`` DSFP components of the current filters.
        fused: their fusion (:func:`pruning_env.criteria.fuse`).
        order: the transition's pruning order of the current filters (low = pruned first).
        rates: the action grid (K rates).
        keep_count: ``keep_count(agent index, rate)`` -> filters kept at that rate (the env's rule).

    ``removed_mass_<k>``: the share of the layer's sensitivity (mean of the min-max normalised
    components) that pruning to grid rate k would remove now.
    """
    return combine_dsfp([layer_dsfp(grad[n], taylor[n], kl[n], fused[n], order[n]) for n in names],
                        kept_table(len(names), rates, keep_count))


def kept_table(layers: int, rates: Sequence[float], keep_count: Callable[[int, float], int]) -> np.ndarray:
    """``(L, K)`` int: ``keep_count(layer, rate)`` of every layer at every grid rate."""
    return np.array([[keep_count(i, float(r)) for r in rates] for i in range(layers)], dtype=np.int64).reshape(
        layers, len(rates))


def _columns(rows: list[dict[str, float]]) -> dict[str, np.ndarray]:
    """Per-layer ``{feature: value}`` rows -> ``{feature: (L,) float32 column in [0, 1]}``."""
    return {name: np.clip(np.asarray([row[name] for row in rows], dtype=np.float32), 0.0, 1.0) for name in rows[0]}


def _std(x: torch.Tensor) -> float:
    return float(x.std(unbiased=False)) if x.numel() > 1 else 0.0
