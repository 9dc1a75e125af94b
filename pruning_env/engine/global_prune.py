"""Torch-Pruning's global magnitude pruning, built by our engine: the reference plan a practitioner would make.

Torch-Pruning's ``MagnitudePruner(importance=MagnitudeImportance(p=1), global_pruning=True, iterative_steps=S)``
(v1.6; see ``torch_pruning/pruner/importance.py`` and ``algorithms/base_pruner.py``) does, per step:

1. score every filter of every prunable conv by its **group** magnitude: the mean over the coupled tensors of
   ``|.|^p`` summed over the filter's weights in each: the conv's output filter, its BatchNorm's ``gamma`` and
   every consumer's input-channel weights (:func:`group_magnitude`), on the network as pruned so far;
2. divide each layer's scores by their mean (``normalizer="mean"``) and rank all layers' filters together;
3. prune, among the layers not yet at the largest rate, the lowest-ranked filters until the filters left are
   ``(1 - max_rate * step / S)`` of the filters there were (ties at the threshold pruned too).

:func:`iterative_global_plan` runs that schedule on a :class:`~pruning_env.engine.plan.PruningPlan` (the
weights are never touched: a pruned network's tensors are the unpruned one's kept rows and columns) and stops
at the first step within a MACs budget. Unlike Torch-Pruning, it then gives back the last step's filters, in
reverse order of their rank, while the budget holds: the plan sits just below the budget instead of up to one
step (``1 / S`` of the filters) below it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pruning_env.engine.graph import PrunableLayer
from pruning_env.engine.macs import MacsModel
from pruning_env.engine.plan import PruningPlan

__all__ = ["GLOBAL_STEPS", "group_magnitude", "iterative_global_plan"]

GLOBAL_STEPS = 200
"""Torch-Pruning's ``iterative_steps`` of the global reference plan and of the Torch-Pruning baseline."""


def group_magnitude(model: nn.Module, layers: Sequence[PrunableLayer], plan: PruningPlan | None = None, *,
                    p: int = 1) -> dict[str, torch.Tensor]:
    """Torch-Pruning's ``MagnitudeImportance(p, group_reduction="mean")`` of the filters ``plan`` keeps.

    Args:
        model: the UNPRUNED network (read only).
        layers: its prunable convs (:func:`~pruning_env.engine.graph.prunable_layers`).
        plan: the filters kept so far (default: all); each tensor is restricted to the kept rows and columns.
        p: the norm's power.

    Returns:
        ``{layer: (kept,) float32 tensor}``, in the order of the plan's kept indices: the mean over the group's
        members (the filter's weights, its BatchNorm's ``|gamma|^p``, each consumer's input-channel weights;
        a Linear consumer after a flatten contributes its ``block`` columns per filter).
    """
    mods = dict(model.named_modules())
    prunable = {layer.name for layer in layers}
    producer = {consumer: layer.name for layer in layers for consumer, _ in layer.consumers}

    def kept(name: str) -> torch.Tensor | slice:
        return slice(None) if plan is None or name not in prunable else plan.indices(name)

    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for layer in layers:
            k = kept(layer.name)
            w = mods[layer.name].weight.detach()[k]
            if layer.name in producer:
                w = w[:, kept(producer[layer.name])]
            members = [w.abs().pow(p).flatten(1).sum(1)]
            bn = mods[layer.bn] if layer.bn else None
            if isinstance(bn, nn.BatchNorm2d) and bn.affine:
                members.append(bn.weight.detach()[k].abs().pow(p))
            for consumer, block in layer.consumers:
                cw = mods[consumer].weight.detach()[kept(consumer)]
                if isinstance(mods[consumer], nn.Linear):
                    cw = cw.reshape(cw.shape[0], -1, block).transpose(0, 1)  # (C, O, block)
                else:
                    cw = cw.transpose(0, 1)  # (C_in, O, kh, kw)
                members.append(cw.abs().pow(p).flatten(1).sum(1)[k])
            out[layer.name] = torch.stack([m.float() for m in members]).mean(0)
    return out


def _without(plan: PruningPlan, pruned: dict[str, set[int]]) -> PruningPlan:
    return PruningPlan({n: [i for i in plan.keep[n] if i not in pruned.get(n, ())] for n in plan.layers},
                       plan.widths)


def iterative_global_plan(model: nn.Module, layers: Sequence[PrunableLayer], macs_model: MacsModel,
                          target_macs: float, *, max_rate: float, steps: int = GLOBAL_STEPS, min_keep: int = 1,
                          round_to: int = 1, p: int = 1, give_back: bool = True) -> PruningPlan:
    """Torch-Pruning's iterative global magnitude pruning (the module docstring) down to ``target_macs``.

    Args:
        model: the unpruned network (read only); layers: its prunable convs.
        macs_model: its MACs predictor; target_macs: the budget in MACs per image.
        max_rate: no layer loses more than this share of its filters (Torch-Pruning's ``max_pruning_ratio``;
            the schedule runs from 0 to it, its ``pruning_ratio``).
        steps: Torch-Pruning's ``iterative_steps``.
        min_keep: filters every layer keeps at least (its best ones).
        round_to: each step leaves every layer a multiple of this many filters (Torch-Pruning's ``round_to``:
            the filters left are rounded down); with ``round_to > 1`` nothing is given back.
        give_back: give the last step's filters back while the budget holds (False: Torch-Pruning's plan).

    Returns:
        The plan of the first step within the budget, with that step's filters given back while the budget
        holds.

    Raises:
        ValueError: bad settings, or no step of the schedule reaches the budget (naming the MACs ratio reached).
    """
    if steps < 1 or not 0.0 < max_rate < 1.0 or min_keep < 1 or round_to < 1:
        raise ValueError(f"steps, min_keep and round_to must be >= 1 and max_rate in (0, 1), got {steps}, "
                         f"{min_keep}, {round_to} and {max_rate}")
    names = [layer.name for layer in layers]
    plan = PruningPlan.full(layers)
    floor = {layer.name: layer.out_channels * (1.0 - max_rate) for layer in layers}
    initial = sum(layer.out_channels for layer in layers)

    def macs(pl: PruningPlan) -> int:
        return macs_model.predict_array([pl.keep_count(n) for n in names])[0]

    if macs(plan) <= target_macs:
        return plan
    for step in range(1, steps + 1):
        scores = group_magnitude(model, layers, plan, p=p)
        live = [n for n in names if plan.keep_count(n) >= floor[n] and plan.keep_count(n) > 1]
        normed = {n: scores[n] / scores[n].mean() if float(scores[n].mean()) > 0 else torch.zeros_like(scores[n])
                  for n in live}
        if not live:
            break
        concat = torch.cat([normed[n] for n in live])
        n_pruned = len(concat) - int(initial * (1.0 - max_rate * step / steps))
        if n_pruned <= 0:
            continue
        thres = torch.topk(concat, k=min(n_pruned, len(concat)), largest=False).values[-1]
        ranked: list[tuple[float, str, int]] = []  # (normalised score, layer, filter) of this step's pruned
        for n in live:
            current = plan.keep_count(n)
            left = current - int((normed[n] <= thres).sum())
            left -= left % round_to  # Torch-Pruning's _round_to: the filters left rounded down to a multiple
            left = max(left, min(current, -(-min_keep // round_to) * round_to))  # never under min_keep
            n_below = current - left
            below = torch.argsort(normed[n], stable=True)[:n_below]  # the filters at or under the threshold
            ranked += [(float(normed[n][j]), n, plan.keep[n][int(j)]) for j in below]
        if not ranked:
            continue
        ranked.sort(key=lambda r: r[0])
        pruned_plan = _without(plan, _as_sets(ranked))
        if macs(pruned_plan) <= target_macs and (not give_back or round_to > 1):
            return pruned_plan
        if macs(pruned_plan) <= target_macs:  # give back the step's best filters while the budget holds
            lo, hi = 0, len(ranked)  # macs(first lo pruned) > target >= macs(first hi pruned)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if macs(_without(plan, _as_sets(ranked[:mid]))) <= target_macs:
                    hi = mid
                else:
                    lo = mid
            return _without(plan, _as_sets(ranked[:hi]))
        plan = pruned_plan
    raise ValueError(f"Torch-Pruning's schedule ({steps} steps up to rate {max_rate:g}) keeps "
                     f"{macs(plan) / macs_model.base_macs:.4f} of the MACs, above the budget "
                     f"{target_macs / macs_model.base_macs:.4f}: raise the budget or the largest rate")


def _as_sets(ranked: list[tuple[float, str, int]]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for _, n, i in ranked:
        out.setdefault(n, set()).add(i)
    return out
