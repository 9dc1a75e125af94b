"""Physical surgery: :func:`apply` returns a NEW, smaller model and never touches the original."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pruning_env.engine.graph import PrunableLayer, prunable_layers
from pruning_env.engine.plan import PlanError, PruningPlan

__all__ = ["apply"]


def _new_param(old: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    if isinstance(old, nn.Parameter):
        return nn.Parameter(data, requires_grad=old.requires_grad)
    return data


_PER_CHANNEL = frozenset({"weight", "bias", "running_mean", "running_var"})  # dim 0 = output channel
_ATOMIC = frozenset({type(None), bool, int, float, str, torch.dtype, torch.device})
_CONTAINERS = frozenset({tuple, list, set, dict, OrderedDict})


def _clone_tree(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """A structural copy of ``module``: tensors come from ``memo`` (prepared by the
    caller), submodules are cloned recursively, small attributes are deep-copied.
    Much cheaper than ``copy.deepcopy`` on a whole model, which we only use for
    modules that define their own copying (e.g. ``fx.GraphModule``)."""
    done = memo.get(id(module))
    if done is not None:
        return done
    cls = type(module)
    if getattr(cls, "__deepcopy__", None) is not None:
        new = copy.deepcopy(module, memo)
        return new
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = {}
    for key, value in module.__dict__.items():
        kind = type(value)
        if kind in _ATOMIC:
            state[key] = value
        elif key == "_parameters" or key == "_buffers":
            state[key] = {n: (None if t is None else memo[id(t)]) for n, t in value.items()}
        elif key == "_modules":
            state[key] = {n: (None if m is None else _clone_tree(m, memo)) for n, m in value.items()}
        elif kind in _CONTAINERS and all(type(v) in _ATOMIC for v in value):
            state[key] = value if kind is tuple else kind(value)  # incl. the many empty hook dicts
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__dict__.update(state)
    return new


def apply(model: nn.Module, plan: PruningPlan, input_shape: tuple[int, int, int] = (3, 32, 32), *,
          layers: Sequence[PrunableLayer] | None = None) -> nn.Module:
    """Physically remove the filters ``plan`` prunes; return a new, smaller model.

    Each pruned conv loses output channels (weight rows, bias), its BatchNorm the
    matching ``weight``, ``bias``, ``running_mean`` and ``running_var``, and each
    consumer the matching input channels (conv) or input features (Linear after a
    flatten: ``block`` consecutive features per channel).

    The original model is not modified and shares no tensor or mutable state with
    the result: kept slices are gathered with ``index_select`` into new tensors, the
    rest is cloned once, and the module tree is rebuilt without ``copy.deepcopy``.
    Attributes such as a built-in model's ``.arch`` are kept, so
    :func:`~pruning_env.core.models.channel_spec` and :mod:`~pruning_env.core.checkpoint` work.

    Args:
        model: the unpruned model the plan was made for (any device/dtype).
        plan: which filters to keep.
        input_shape: ``(C, H, W)`` of one input, used to find the prunable layers.
        layers: the model's :func:`~pruning_env.engine.graph.prunable_layers` if already
            known; pass them in hot loops to skip the ``torch.fx`` trace.

    Returns:
        The pruned model, in the original's train/eval mode, on its device.

    Raises:
        PlanError: the plan does not fit the model (see :meth:`PruningPlan.validate`).
    """
    if not isinstance(plan, PruningPlan):
        raise PlanError(f"plan must be a PruningPlan, got {type(plan).__name__}")
    if layers is None:
        layers = prunable_layers(model, input_shape)
    plan.validate(layers)

    # Which dimension of which module shrinks: out-channel indices and in-feature indices.
    out_index: dict[str, torch.Tensor] = {}
    in_index: dict[str, torch.Tensor] = {}
    new_out: dict[str, int] = {}
    new_in: dict[str, int] = {}
    for layer in layers:
        if layer.name not in plan.keep:
            continue
        kept = plan.keep[layer.name]
        if len(kept) == layer.out_channels:
            continue  # keeps everything (indices are validated: sorted, unique, in range)
        idx = plan.indices(layer.name)
        out_index[layer.name] = idx
        new_out[layer.name] = len(kept)
        if layer.bn is not None:
            out_index[layer.bn] = idx
            new_out[layer.bn] = len(kept)
        for consumer, block in layer.consumers:
            in_index[consumer] = idx if block == 1 else (idx[:, None] * block + torch.arange(block)).flatten()
            new_in[consumer] = len(kept) * block

    memo: dict[int, Any] = {}
    with torch.no_grad():
        for mname, module in model.named_modules(remove_duplicate=False):
            o_idx, i_idx = out_index.get(mname), in_index.get(mname)
            for pname, t in list(module._parameters.items()) + list(module._buffers.items()):
                if t is None or id(t) in memo:
                    continue
                data, copied = t.detach(), False
                if o_idx is not None and pname in _PER_CHANNEL:
                    data, copied = data.index_select(0, o_idx.to(data.device)), True
                if i_idx is not None and pname == "weight" and t.dim() >= 2:
                    data, copied = data.index_select(1, i_idx.to(data.device)), True
                if not copied:
                    data = data.clone()
                memo[id(t)] = _new_param(t, data)
        new_model = _clone_tree(model, memo)

    for name, n in new_out.items():
        mod = new_model.get_submodule(name)
        if isinstance(mod, nn.Conv2d):
            mod.out_channels = n
        elif isinstance(mod, nn.BatchNorm2d):
            mod.num_features = n
    for name, n in new_in.items():
        mod = new_model.get_submodule(name)
        if isinstance(mod, nn.Conv2d):
            mod.in_channels = n
        elif isinstance(mod, nn.Linear):
            mod.in_features = n
    return new_model


