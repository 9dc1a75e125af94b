"""The gradient pass shared by ``grad``, ``taylor`` and ``taylor_fo``.

One cross-entropy (mean over the batch) forward/backward with BatchNorm layers using
batch statistics (as in DSFP's code, which calls ``model.train()``) but with dropout OFF
(every other module in eval mode; DSFP's code leaves dropout on), so scores are
deterministic. Running statistics are restored afterwards (run it inside
:func:`~pruning_env.criteria.checks.preserved` with ``restore_buffers=True``), and
gradients are taken with ``torch.autograd.grad`` so no ``.grad`` attribute is touched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from pruning_env.criteria.checks import check_logits, forward, set_modes
from pruning_env.criteria.interpreter import Graph, Untraceable

__all__ = ["gate_modules", "gradient_pass"]


def gradient_pass(
    model: nn.Module, images: Tensor, labels: Tensor, convs: Mapping[str, nn.Conv2d], *, with_gates: bool
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """One CE forward/backward (BN batch statistics, dropout off).

    Args:
        images: ``(N, C, H, W)`` on the model's device and dtype.
        labels: ``(N,)`` int64.
        convs: the layers to score.
        with_gates: also compute ``taylor_fo`` (adds a gate per layer).

    Returns:
        ``grad`` (mean ``|dL/dW|`` per filter), ``taylor`` (mean ``|W dL/dW|``) and, if
        ``with_gates``, ``taylor_fo`` (``mean_n (sum_hw a dl_n/da)^2``; else empty), each
        ``{layer: (C_out,)}`` on the model's device.
    """
    set_modes(model, batchnorm_train=True)
    weights = [conv.weight for conv in convs.values()]
    for w in weights:
        w.requires_grad_(True)
    gates_at = gate_modules(model, convs) if with_gates else {}
    gates: dict[str, list[Tensor]] = {name: [] for name in gates_at}
    handles = []

    def make_hook(name: str) -> Callable[..., Tensor]:
        def hook(_module: nn.Module, _inp: Any, out: Tensor) -> Tensor:
            # A per-example, per-channel gate of ones: d loss / d gate = sum_{h,w} a * d loss / d a.
            gate = torch.ones(out.shape[:2] + (1,) * (out.dim() - 2), device=out.device, dtype=out.dtype)
            gate.requires_grad_(True)
            gates[name].append(gate)
            return out * gate

        return hook

    try:
        for name, module in gates_at.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        with torch.enable_grad():
            logits = check_logits(forward(model, images), images.shape[0], labels)
            loss = F.cross_entropy(logits, labels)
            gate_list = [g for name in gates for g in gates[name]]
            grads = torch.autograd.grad(loss, weights + gate_list, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    grad: dict[str, Tensor] = {}
    taylor: dict[str, Tensor] = {}
    for (name, conv), g in zip(convs.items(), grads[: len(weights)]):
        w = conv.weight.detach()
        g = torch.zeros_like(w) if g is None else g.detach()
        grad[name] = g.abs().flatten(1).mean(1)
        taylor[name] = (w * g).abs().flatten(1).mean(1)
    taylor_fo: dict[str, Tensor] = {}
    it = iter(grads[len(weights) :])
    n = images.shape[0]
    for name in gates:
        total = None
        for _ in gates[name]:
            g = next(it)
            if g is not None:
                total = g.detach() if total is None else total + g.detach()
        if total is None:
            taylor_fo[name] = torch.zeros(convs[name].out_channels, dtype=torch.float64)
        else:
            # The loss is the batch mean: n * d loss / d gate is example n's own gradient.
            taylor_fo[name] = (n * total.flatten(1).double()).pow(2).mean(0)
    return grad, taylor, taylor_fo


def gate_modules(model: nn.Module, convs: Mapping[str, nn.Conv2d]) -> dict[str, nn.Module]:
    """Where taylor_fo's gate sits: the BatchNorm that directly consumes the conv
    (Molchanov et al. 2019 gate after BN), else the conv itself. Found from the fx graph;
    if the model cannot be traced, the module registered right after the conv if it is a
    BatchNorm of matching width (the convention of DSFP's code)."""
    modules = dict(model.named_modules())
    out: dict[str, nn.Module] = dict(convs)
    try:
        graph = Graph.trace(model)
    except Untraceable:
        names = list(modules)
        for name, conv in convs.items():
            i = names.index(name)
            nxt = modules[names[i + 1]] if i + 1 < len(names) else None
            if isinstance(nxt, _BatchNorm) and nxt.num_features == conv.out_channels:
                out[name] = nxt
        return out
    for name in convs:
        nodes = graph.conv_nodes.get(name, [])
        if len(nodes) == 1 and len(nodes[0].users) == 1:
            user = next(iter(nodes[0].users))
            if user.op == "call_module" and isinstance(graph.modules[user.target], _BatchNorm) \
                    and user.args[0] is nodes[0]:
                out[name] = graph.modules[user.target]
    return out
