"""Find the prunable conv layers of any traceable model.

A conv's output filters can be removed *physically* when every place its
channels flow to can be shrunk consistently. This module traces the model with
``torch.fx`` and applies one conservative rule.

Policy
------
A ``nn.Conv2d`` (``groups == 1``, called exactly once) is **prunable** when its
output, optionally through a ``nn.BatchNorm2d`` applied directly to it (and to
nothing else), flows only through *channel-wise* operations into *consumers*:

* channel-wise operations, as listed in the one table of :mod:`pruning_env.core.fx`
  (shared with the KL interpreter of :mod:`pruning_env.criteria`): activations
  (``ReLU``, ``ReLU6``, ``LeakyReLU``, ``ELU``, ``GELU``, ``SiLU``, ``Sigmoid``,
  ``Tanh``, hard variants, ``clamp``, ...), ``Dropout``, ``Identity``, arithmetic
  with a Python number (``x * 0.5``), and, while the tensor is still
  ``(N, C, H, W)``, pooling (max, average, adaptive, ``LPPool2d``), ``Upsample`` /
  ``F.interpolate``, spatial padding (``ZeroPad2d``, ``ConstantPad2d``, ``F.pad``
  of H and W, ...) and ``Dropout2d``; their functional and method forms;
* a flatten (``torch.flatten(x, 1)``, ``x.flatten(1)``, ``nn.Flatten()``,
  ``x.view(x.size(0), -1)``, ``x.reshape(x.size(0), -1)``) or a spatial mean
  (``x.mean((2, 3))``), after which only element-wise operations may follow;
* consumers: a ``nn.Conv2d`` with ``groups == 1`` (block size 1: one input
  channel per filter) or, after a flatten, a ``nn.Linear`` (block size
  ``H * W``: each channel owns ``H*W`` consecutive input features).

If the channels reach anything else (a residual ``add`` of two tensors,
``torch.cat``, the model's output, a reshape of unknown kind, a BatchNorm that is
not directly after the conv, a grouped or depthwise conv, a module called more
than once, a parameter used outside its module or shared with another module, a
layer holding tensors other than weight/bias/BN statistics...) the conv is **not**
prunable.

Consequence for ResNets: only the block-internal convs (``conv1`` of each basic
block, whose channels end in the block's ``conv2``) are prunable. The channels
of the stem conv and of each block's ``conv2`` are coupled through the residual
additions of a whole stage; they stay at full width. This is the usual choice
for CIFAR ResNets (e.g. Li et al. 2017 prune only the first conv of each block)
and keeps each agent's action independent of the others.

Layers are returned in forward (execution) order.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from pruning_env.core.fx import ELEMENTWISE, SPATIAL, channelwise_kind, has_node, probe_forward

__all__ = ["GraphError", "PrunableLayer", "consumer_map", "prunable_layers"]


class GraphError(ValueError):
    """The model cannot be analysed (for instance it is not traceable by ``torch.fx``)."""


@dataclass
class PrunableLayer:
    """A conv whose output filters can be removed, with the static facts the env needs.

    Attributes:
        name: the conv's ``named_modules()`` name, e.g. ``"features.0"``.
        bn: name of the ``BatchNorm2d`` applied directly to it, or ``None``.
        consumers: ``(module name, block size)`` of every module whose input
            channels are this conv's filters. Block size = consecutive input
            features per filter: 1 for a conv, ``H * W`` for a Linear after a flatten.
        in_channels: input channels of the conv (at analysis time).
        out_channels: output channels (filters) of the conv.
        kernel_size: ``(k_h, k_w)``.
        stride: ``(s_h, s_w)``.
        out_hw: ``(H, W)`` of the conv's output for the analysed input shape.
    """

    name: str
    bn: str | None
    consumers: list[tuple[str, int]] = field(default_factory=list)
    in_channels: int = 0
    out_channels: int = 0
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    out_hw: tuple[int, int] = (1, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "bn": self.bn, "consumers": [list(c) for c in self.consumers],
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size), "stride": list(self.stride), "out_hw": list(self.out_hw),
        }


_STANDARD_TENSORS = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})


def _is_batch_size(arg: Any, src: fx.Node) -> bool:
    """``arg`` is ``src.size(0)`` / ``x.shape[0]`` of the flowing tensor (or of any tensor: N is N)."""
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "call_method" and arg.target == "size" and tuple(arg.args[1:]) == (0,):
        return True
    if arg.op == "call_function" and arg.target is operator.getitem and arg.args[1] == 0:
        shape = arg.args[0]
        return isinstance(shape, fx.Node) and shape.op == "call_function" and shape.target is getattr \
            and shape.args[1] == "shape"
    return False


def _flatten_kind(node: fx.Node, src: fx.Node, mod: nn.Module | None) -> str | None:
    """``"flatten"`` if ``node`` flattens ``(N, C, H, W)`` to ``(N, C*H*W)``, ``"mean"`` for a
    spatial mean to ``(N, C)``, ``"mean_keep"`` for a spatial mean to ``(N, C, 1, 1)``, else None."""
    if mod is not None:
        if isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1:
            return "flatten"
        return None
    args, kwargs = node.args, node.kwargs
    if not args or args[0] is not src:
        return None
    is_flatten = (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten")
    if is_flatten:
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        return "flatten" if (start == 1 and end in (-1, 3)) else None
    if node.op == "call_method" and node.target in ("view", "reshape") and not kwargs:
        rest = args[1:]
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            rest = tuple(rest[0])
        if len(rest) == 2 and _is_batch_size(rest[0], src) and rest[1] == -1:
            return "flatten"
        return None
    is_mean = (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target is torch.mean)
    if is_mean:
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        if isinstance(dims, (tuple, list)) and {d % 4 for d in dims if isinstance(d, int)} == {2, 3} \
                and len(dims) == 2 and not has_node(kwargs):
            return "mean_keep" if keep else "mean"
    return None


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types: every failure means "not traceable"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GraphError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {first}). "
            "Prunable layers are found by symbolic tracing: forward() must not branch on tensor values "
            "(move such logic into a submodule, or wrap it with torch.fx.wrap)."
        ) from None


class _ShapeRecorder(fx.Interpreter):
    """Runs the traced graph once and stores each tensor result's shape in ``node.meta``."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["pruning_env_shape"] = tuple(int(s) for s in result.shape)
        return result


def _shape_of(node: fx.Node) -> tuple[int, ...] | None:
    return node.meta.get("pruning_env_shape")


def prunable_layers(model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32)) -> list[PrunableLayer]:
    """The convs of ``model`` whose filters can be removed physically (see the module docstring).

    Args:
        model: any ``nn.Module`` that ``torch.fx.symbolic_trace`` can trace (not modified;
            its train/eval mode is restored).
        input_shape: ``(C, H, W)`` of one input image (used for output sizes and the
            spatial block size of a Linear after a flatten).

    Returns:
        One :class:`PrunableLayer` per prunable conv, in forward order.

    Raises:
        GraphError: the model cannot be traced or does not accept ``input_shape``.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or min(shape) < 1:
        raise GraphError(f"input_shape must be (C, H, W), got {input_shape!r}")
    gm = _trace(model)
    modules = dict(model.named_modules())
    try:
        probe_forward(model, (1, *shape), run=_ShapeRecorder(gm).run)
    except Exception as exc:  # any failure means the shape does not fit
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GraphError(f"the model does not accept an input of shape {(1, *shape)}: {first}") from None

    calls: dict[str, int] = {}
    attr_users: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            attr_users.add(str(node.target).rsplit(".", 1)[0])
    param_owners: dict[int, set[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            param_owners.setdefault(id(p), set()).add(mname)

    def exclusive(name: str) -> bool:
        """Called once, only the standard tensors, its parameters used by nothing else: safe to shrink."""
        mod = modules[name]
        if calls.get(name, 0) != 1 or name in attr_users:
            return False
        own = set(mod._parameters) | set(mod._buffers)
        if not own <= _STANDARD_TENSORS:  # e.g. a conv subclass with an extra mask: unknown layout
            return False
        return all(len(param_owners[id(p)]) == 1 for p in mod.parameters(recurse=False))

    layers: list[PrunableLayer] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.Conv2d):
            continue
        conv: nn.Conv2d = modules[node.target]
        if conv.groups != 1 or not exclusive(node.target):
            continue
        out_shape = _shape_of(node)
        if out_shape is None or len(out_shape) != 4:
            continue
        start, bn_name = node, None
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], nn.BatchNorm2d):
            bn_name = users[0].target
            if not exclusive(bn_name):
                continue
            start = users[0]
        consumers = _consumers(start, modules, exclusive, conv.out_channels)
        if not consumers:
            continue
        layers.append(PrunableLayer(
            name=node.target, bn=bn_name, consumers=consumers,
            in_channels=conv.in_channels, out_channels=conv.out_channels,
            kernel_size=tuple(conv.kernel_size), stride=tuple(conv.stride),  # type: ignore[arg-type]
            out_hw=(out_shape[2], out_shape[3]),
        ))
    return layers


def _consumers(start: fx.Node, modules: dict[str, nn.Module], exclusive: Callable[[str], bool],
               channels: int) -> list[tuple[str, int]]:
    """Walk from ``start`` through channel-wise ops; the consumers, or [] if the channels escape."""
    consumers: list[tuple[str, int]] = []
    # (node producing the flowing tensor, block size if already flattened else None)
    stack: list[tuple[fx.Node, int | None]] = [(start, None)]
    seen: set[fx.Node] = set()
    while stack:
        src, block = stack.pop()
        if src in seen:
            continue
        seen.add(src)
        flat = block is not None
        for user in src.users:
            mod = modules.get(user.target) if user.op == "call_module" else None
            if isinstance(mod, nn.Conv2d):
                if flat or mod.groups != 1 or mod.in_channels != channels or not exclusive(user.target) \
                        or user.args[0] is not src or len(user.args) != 1 or user.kwargs:
                    return []
                consumers.append((user.target, 1))
                continue
            if isinstance(mod, nn.Linear):
                if not flat or mod.in_features != channels * block or not exclusive(user.target) \
                        or user.args[0] is not src:
                    return []
                consumers.append((user.target, block))
                continue
            # The shared table (pruning_env.core.fx): spatial entries only before a flatten.
            kind = channelwise_kind(user, src, modules)
            if kind == ELEMENTWISE or (kind == SPATIAL and not flat):
                stack.append((user, block))
                continue
            if kind is not None:
                return []
            if user.op == "call_module":
                if not flat and isinstance(mod, nn.Flatten):
                    kind = _flatten_kind(user, src, mod)
                    shape = _shape_of(src)
                    if kind is None or shape is None or len(shape) != 4:
                        return []
                    stack.append((user, shape[2] * shape[3]))
                    continue
                return []
            if (user.op == "call_method" and user.target in ("size", "dim")) or (
                    user.op == "call_function" and user.target is getattr and user.args[1] in ("shape", "ndim")
            ):
                continue  # reads the shape only (e.g. for x.view(x.size(0), -1)); carries no channels
            if user.op in ("call_function", "call_method") and not flat:
                kind = _flatten_kind(user, src, None)
                if kind is not None:
                    shape = _shape_of(src)
                    if shape is None or len(shape) != 4:
                        return []
                    blocks = {"mean_keep": None, "mean": 1, "flatten": shape[2] * shape[3]}
                    stack.append((user, blocks[kind]))
                    continue
            return []  # output, a residual add, cat, an unknown op...
    return consumers


def consumer_map(layers: list[PrunableLayer]) -> dict[str, tuple[str, int]]:
    """``{consumer module name: (producing prunable layer, block size)}`` for ``layers``."""
    out: dict[str, tuple[str, int]] = {}
    for layer in layers:
        for consumer, block in layer.consumers:
            out[consumer] = (layer.name, block)
    return out
