"""The env's observation features: their names (the documented table) and how they are computed."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pruning_env.criteria import minmax
from pruning_env.engine.flops import count
from pruning_env.engine.graph import PrunableLayer

__all__ = [
    "DSFP_FEATURES",
    "DYNAMIC_FEATURES",
    "GLOBAL_FEATURES",
    "OBSERVATION_FEATURES",
    "STATIC_FEATURES",
    "dsfp_features",
    "static_features",
]

LOG_FUSED_MAX = 2.5  # log of the largest possible DSFP fused score: |g-t|+|t-k|+0.5|g-k| <= 2.5

STATIC_FEATURES = (
    "depth",  # layer index / (L - 1)
    "in_channels",  # original input channels / widest layer of the network
    "out_channels",  # original filters / widest layer of the network
    "kernel_area",  # k_h * k_w / 25, clipped to 1
    "stride",  # stride / 2, clipped to 1
    "fmap_size",  # output height / input height
    "macs_share",  # the layer's share of the unpruned network's MACs
    "params_share",  # the layer's share of the unpruned network's parameters
)
DYNAMIC_FEATURES = (
    "keep_ratio",  # current filters / original filters of this layer
    "input_keep_ratio",  # same for the prunable layer feeding it (1 if none)
    "macs_ratio",  # MACs of the current network / unpruned
    "acc_ratio",  # last measured validation accuracy / unpruned, clipped to [0, 1]
    "progress",  # steps taken / episode length
    "macs_target",  # the exact MACs budget (target MACs ratio; 0 without one)
    "macs_to_cut",  # MACs ratio still above that budget: max(0, macs_ratio - macs_target) (0 without one)
)
DSFP_FEATURES = (
    "fused_mean", "fused_std", "fused_min", "fused_max",  # log(DSFP fused score) / 2.5 over current filters
    "grad_mean", "grad_std", "taylor_mean", "taylor_std", "kl_mean", "kl_std",  # min-max normalised components
    "grad_share", "taylor_share", "kl_share",  # the layer's share of the network's raw component mass
)
OBSERVATION_FEATURES = STATIC_FEATURES + DYNAMIC_FEATURES + DSFP_FEATURES  # + one "removed_mass" per grid rate
GLOBAL_FEATURES = ("macs_ratio", "params_ratio", "acc_ratio", "progress")


def static_features(model: nn.Module, layers: Sequence[PrunableLayer], input_shape: tuple[int, int, int],
                    base_macs: int, base_params: int) -> np.ndarray:
    """``(L, len(STATIC_FEATURES))`` float32 in [0, 1]: the unpruned network's facts per layer."""
    report = count(model, input_shape)
    widest = max(max(layer.in_channels, layer.out_channels) for layer in layers)
    n = len(layers)
    rows = []
    for i, layer in enumerate(layers):
        kh, kw = layer.kernel_size
        rows.append([
            i / max(n - 1, 1), layer.in_channels / widest, layer.out_channels / widest, min(1.0, kh * kw / 25),
            min(1.0, layer.stride[0] / 2), layer.out_hw[0] / input_shape[1],
            report.per_layer_macs[layer.name] / base_macs, report.per_layer_params[layer.name] / base_params,
        ])
    return np.clip(np.asarray(rows, dtype=np.float32), 0.0, 1.0)


def dsfp_features(
    names: Sequence[str],
    grad: Mapping[str, torch.Tensor],
    taylor: Mapping[str, torch.Tensor],
    kl: Mapping[str, torch.Tensor],
    fused: Mapping[str, torch.Tensor],
    order: Mapping[str, torch.Tensor],
    rates: Sequence[float],
    keep_count: Callable[[int, float], int],
) -> np.ndarray:
    """``(L, len(DSFP_FEATURES) + K)`` float32 in [0, 1]: the DSFP features of the CURRENT filters.

    Args:
        names: the prunable layers, in agent order.
        grad, taylor, kl: per layer, the ``(C_current,)`` DSFP components of the current filters.
        fused: their fusion (:func:`pruning_env.criteria.fuse`).
        order: the transition's pruning order of the current filters (low = pruned first).
        rates: the action grid (K rates).
        keep_count: ``keep_count(agent index, rate)`` -> filters kept at that rate (the env's rule).

    The last K columns are ``removed_mass[k]``: the share of the layer's sensitivity (mean of
    the min-max normalised components) that pruning to grid rate k would remove now.
    """
    rows = []
    mass = {c: sum(float(d[n].sum()) for n in names) or 1.0 for c, d in (("g", grad), ("t", taylor), ("k", kl))}
    for i, n in enumerate(names):
        comps = [minmax(d[n].double()) for d in (grad, taylor, kl)]
        log_f = torch.log(fused[n].double()) / LOG_FUSED_MAX
        sens = (comps[0] + comps[1] + comps[2]) / 3.0
        total = float(sens.sum())
        ranked = sens[torch.argsort(order[n], stable=True)]
        cum = torch.cat([torch.zeros(1, dtype=ranked.dtype), torch.cumsum(ranked, 0)])
        current = len(ranked)
        removed = []
        for rate in rates:
            n_prune = max(0, current - keep_count(i, float(rate)))
            removed.append(float(cum[n_prune]) / total if total > 0 else n_prune / max(current, 1))
        rows.append([
            float(log_f.mean()), _std(log_f), float(log_f.min()), float(log_f.max()),
            *[v for c in comps for v in (float(c.mean()), _std(c))],
            float(grad[n].sum()) / mass["g"], float(taylor[n].sum()) / mass["t"], float(kl[n].sum()) / mass["k"],
            *removed,
        ])
    return np.clip(np.asarray(rows, dtype=np.float32), 0.0, 1.0)


def _std(x: torch.Tensor) -> float:
    return float(x.std(unbiased=False)) if x.numel() > 1 else 0.0
