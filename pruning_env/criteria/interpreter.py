"""The criteria's ``torch.fx`` interpreter: run a traced model node by node, and carry a
change of some channels through channel-wise operations one channel at a time.

Which operations are channel-wise is decided by the shared table of
:mod:`pruning_env.core.fx` (the same one the prunable-layer policy of
:mod:`pruning_env.engine.graph` uses), extended here by what only a KL interpreter may do:
eval-mode BatchNorm anywhere (its per-channel parameters are indexed), and arithmetic with
a *clean* tensor of the same shape (a skip connection: combined channel by channel).
Stochastic calls in the table (``F.dropout`` with ``training=True``) are evaluated
densely: their values are random.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from pruning_env.core.fx import ARITHMETIC, OUT_OF_PLACE, channelwise_kind, is_stochastic
from pruning_env.criteria.checks import first_line

__all__ = ["Graph", "Unbatchable", "Untraceable", "placeholder_default"]


class Untraceable(Exception):
    """torch.fx cannot trace the model (dynamic control flow, unsupported ops...)."""


class Unbatchable(Exception):
    """The graph suffix cannot be evaluated for many filters in one batch."""


def placeholder_default(node: fx.Node) -> Any:
    """The default value of a second ``forward()`` argument (the first is the images)."""
    if node.args:
        return node.args[0]
    raise Untraceable(f"the model's forward needs a second input {node.target!r}")


def _out_of_place_method(name: str) -> str:
    """``relu_`` -> ``relu``: cached values must never be overwritten."""
    if name.endswith("_") and not name.startswith("_") and callable(getattr(Tensor, name[:-1], None)):
        return name[:-1]
    return name


class Graph:
    """A torch.fx trace of a model plus the bookkeeping the KL modes need.

    Attributes:
        gm: the traced ``GraphModule`` (sharing the model's submodules).
        nodes: its nodes in topological order; ``pos[node]`` is the index.
        modules: ``dict(gm.named_modules())``.
        input, output: the first placeholder (the images) and the output node.
        batch_dep: nodes whose value depends on the images (have a batch axis).
        conv_nodes: ``{conv name: [call nodes]}`` (more than one: a shared conv).
        last_use: ``{node: position of its last user}``.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.modules = dict(gm.named_modules())
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if not placeholders:
            raise Untraceable("the traced graph has no input")
        self.input = placeholders[0]
        self.output = next(n for n in self.nodes if n.op == "output")
        self.batch_dep: set[fx.Node] = set()
        for n in self.nodes:
            if n is self.input or any(a in self.batch_dep for a in n.all_input_nodes):
                self.batch_dep.add(n)
        self.conv_nodes: dict[str, list[fx.Node]] = {}
        for n in self.nodes:
            if n.op == "call_module" and isinstance(self.modules[n.target], nn.Conv2d):
                self.conv_nodes.setdefault(str(n.target), []).append(n)
        self.last_use = {n: max((self.pos[u] for u in n.users), default=self.pos[n]) for n in self.nodes}
        self._folded: dict[tuple[fx.Node, fx.Node | None], tuple[Tensor, Tensor | None]] = {}

    @classmethod
    def trace(cls, model: nn.Module) -> Graph:
        """Trace ``model``; raises :class:`Untraceable` with the reason if torch.fx cannot."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm = fx.symbolic_trace(model)
        except Exception as exc:  # any tracing failure means: the caller uses its fallback
            raise Untraceable(f"{type(exc).__name__}: {first_line(exc)}") from None
        return cls(gm)

    def bn_scale(self, bn: nn.BatchNorm2d) -> Tensor:
        """``gamma / sqrt(var + eps)`` of an eval-mode BatchNorm: ``(C,)``."""
        scale = torch.rsqrt(bn.running_var + bn.eps)
        return scale if bn.weight is None else scale * bn.weight

    def folded(self, conv_node: fx.Node, bn_node: fx.Node | None) -> tuple[Tensor, Tensor | None]:
        """Weight and bias of a conv with the eval-mode BatchNorm after it folded in (cached)."""
        key = (conv_node, bn_node)
        if key not in self._folded:
            conv = self.modules[conv_node.target]
            if bn_node is None:
                self._folded[key] = (conv.weight, conv.bias)
            else:
                bn = self.modules[bn_node.target]
                scale = self.bn_scale(bn)
                bias = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
                bias = bias * scale + (0 if bn.bias is None else bn.bias)
                self._folded[key] = (conv.weight * scale.view(-1, 1, 1, 1), bias)
        return self._folded[key]

    def run_node(self, node: fx.Node, value: Callable[[fx.Node], Any]) -> Any:
        """Evaluate one node, reading its inputs through ``value``; in-place ops run out of place."""
        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            fn = OUT_OF_PLACE.get(node.target, node.target)  # type: ignore[call-overload]
            if kwargs.get("inplace") is True:
                kwargs = {**kwargs, "inplace": False}
            return fn(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, _out_of_place_method(str(node.target)))(*rest, **kwargs)
        if node.op == "get_attr":
            obj: Any = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj
        raise Unbatchable(f"cannot evaluate node {node.op} {node.target}")

    def run_clean(self, images: Tensor) -> tuple[dict[fx.Node, Any], Any]:
        """Run the whole graph on ``images``; returns every node's value and the output."""
        env: dict[fx.Node, Any] = {}
        for node in self.nodes:
            if node.op == "placeholder":
                env[node] = images if node is self.input else placeholder_default(node)
            elif node.op == "output":
                return env, fx.node.map_arg(node.args[0], env.__getitem__)
            else:
                env[node] = self.run_node(node, env.__getitem__)
        raise Untraceable("the traced graph has no output")

    def channelwise(self, node: fx.Node, src: fx.Node) -> bool:
        """Whether :meth:`compact_step` may carry ``src``'s channels through ``node``
        (decided from the graph alone; :meth:`compact_step` may still decline at run time,
        e.g. for a tensor operand of another shape)."""
        if node.op == "call_module":
            mod = self.modules[str(node.target)]
            if isinstance(mod, _BatchNorm):
                return node.args == (src,) and not node.kwargs and not mod.training \
                    and mod.running_mean is not None and mod.running_var is not None
        elif node.op == "call_function" and node.target in ARITHMETIC:
            # a Python number or a clean tensor on the other side (KL only: see the module docstring)
            return len(node.args) == 2 and not node.kwargs and (node.args[0] is src) != (node.args[1] is src)
        return channelwise_kind(node, src, self.modules) is not None and not is_stochastic(node)

    def compact_step(
        self, node: fx.Node, src: fx.Node, v: Tensor, idx: Tensor, value: Callable[[fx.Node], Any]
    ) -> Tensor | None:
        """Apply ``node`` to a channel-subset tensor, if ``node`` acts channel-wise.

        Args:
            node: a user of ``src``.
            src: the node whose channels ``v`` holds.
            v: ``(N, m, H, W)``: the values of channels ``idx`` of ``src`` (in copy ``j``,
                channel ``idx[j]`` is changed).
            idx: ``(m,)`` int64 channel indices.
            value: reads every other (clean) input of ``node``.

        Returns:
            The ``(N, m, H', W')`` result for the same channels, or ``None`` if ``node``
            mixes channels (or examples) or is random.
        """
        if not self.channelwise(node, src):
            return None
        if node.op == "call_module":
            mod = self.modules[str(node.target)]
            if isinstance(mod, _BatchNorm):
                w = None if mod.weight is None else mod.weight[idx]
                b = None if mod.bias is None else mod.bias[idx]
                return F.batch_norm(v, mod.running_mean[idx], mod.running_var[idx], w, b, False, 0.0, mod.eps)
            return mod(v)
        if node.op == "call_function" and node.target in ARITHMETIC:
            fn = ARITHMETIC[node.target]  # type: ignore[index]
            other = fx.node.map_arg(node.args[1] if node.args[0] is src else node.args[0], value)
            if isinstance(other, Tensor):
                if other.shape != value(src).shape:
                    return None  # broadcasting: channel c of the result may not be channel c of other
                other = other[:, idx]
            elif not isinstance(other, (int, float)):
                return None
            return fn(v, other) if node.args[0] is src else fn(other, v)
        rest = fx.node.map_arg(node.args[1:], value)
        kwargs = dict(fx.node.map_arg(node.kwargs, value))
        if any(isinstance(a, Tensor) for a in (*rest, *kwargs.values())):
            return None
        if kwargs.get("inplace") is True:
            kwargs["inplace"] = False
        if node.op == "call_method":
            return getattr(v, _out_of_place_method(str(node.target)))(*rest, **kwargs)
        fn = OUT_OF_PLACE.get(node.target, node.target)  # type: ignore[call-overload]
        return fn(v, *rest, **kwargs)
