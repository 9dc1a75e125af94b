"""Torch-Pruning's global L1-magnitude pruning of a pruning env's convs: the practitioner's baseline of
``benchmarks/marl.py``, compared as it is (one network, no selection)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from pruning_env.engine.flops import count
from pruning_env.envs.env import FilterPruningEnv

__all__ = ["torch_pruning_model"]


def torch_pruning_model(base: nn.Module, env: FilterPruningEnv, target_ratio: float,
                        steps: int) -> tuple[nn.Module, dict[str, Any]]:
    """Global L1-magnitude pruning of the env's prunable convs with Torch-Pruning, step by step until the MACs
    ratio is <= ``target_ratio``. Every other conv and every Linear is ignored (as the env does); no layer loses
    more than the env's largest rate."""
    import torch_pruning as tp

    model = copy.deepcopy(base).cpu().eval()
    names = set(env.layer_names)
    ignored = [m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in names]

    def out_widths(net: nn.Module) -> dict[str, int]:
        return {n: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features for n, m in net.named_modules()
                if isinstance(m, (nn.Conv2d, nn.Linear))}

    widths_before = out_widths(model)
    max_rate = float(max(env.config.rates))
    pruner = tp.pruner.MagnitudePruner(
        model, example_inputs=torch.zeros(1, *env.input_shape), importance=tp.importance.MagnitudeImportance(p=1),
        global_pruning=True, pruning_ratio=max_rate, max_pruning_ratio=max_rate, iterative_steps=steps,
        ignored_layers=ignored)
    base_macs = count(base, env.input_shape).macs
    ratio, done = 1.0, 0
    while done < steps:
        done += 1
        pruner.step()
        ratio = count(model, env.input_shape).macs / base_macs
        if ratio <= target_ratio:
            break
    touched = [n for n, w in out_widths(model).items() if n not in names and w != widths_before[n]]
    info = {"target_macs_ratio": target_ratio, "reached": ratio <= target_ratio + 1e-12, "steps": done,
            "global_channel_ratio": max_rate * done / steps, "other_layers_pruned": touched,
            "keep": {n: m.out_channels for n, m in model.named_modules() if n in names}}
    return model, info

