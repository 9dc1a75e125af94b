"""What acts channel-wise in a ``torch.fx`` graph, and the one "probe forward" helper.

Two parts of the package follow a conv's output channels through a traced graph and must
agree on which operations keep each channel separate:

* :mod:`pruning_env.engine.graph` (which convs can be pruned physically: the channels may
  flow only through channel-wise operations into the next conv or Linear), and
* the KL interpreter of :mod:`pruning_env.criteria` (how far the change of zeroing one
  channel can be carried as a single channel before it has to run the dense network).

Both read the table below through :func:`channelwise_kind`. An operation is
**channel-wise** when channel ``c`` of its output depends only on channel ``c`` of its
input, the same way for every channel (no per-channel parameters, so it can be applied
to any subset of the channels, in any order). Two kinds:

``ELEMENTWISE``
    every element on its own (activations, identity, dropout, arithmetic with a Python
    number): channel-wise on a tensor of any shape, also after a flatten.
``SPATIAL``
    mixes positions *within* a channel (pooling, resizing, spatial padding): channel-wise
    only while the tensor is still ``(N, C, H, W)``.

Every entry requires that the flowing tensor is the operation's only tensor argument (the
first positional one; all others are constants) and that it returns one tensor (no
``return_indices=True``). Extra requirements are noted per entry. Deliberately NOT in the
table, because one consumer treats them specially:

* BatchNorm (per-channel parameters): the graph policy allows only the BatchNorm applied
  directly to the conv (the one surgery shrinks with it); the KL interpreter indexes the
  parameters of any eval-mode BatchNorm on the way.
* Arithmetic with a second *tensor* of the same shape (``x + skip``, ``x * mask``): the KL
  interpreter carries it channel-wise (the other operand is a clean value, combined per
  channel), but the graph policy must not: the other tensor's channels would have to
  shrink too (a residual addition couples the two producers).
* Reshapes (flatten, view, spatial mean): only the graph policy follows them (into a
  Linear); the KL interpreter runs the dense network from there.
* Stochastic calls (``F.dropout(x, p)`` with ``training=True``, see :func:`is_stochastic`)
  are in the table, but only the graph policy can use them (a random mask of the same shape
  still keeps channels apart); the KL interpreter needs deterministic values, so it
  evaluates them densely, and its check against the loop sends such a layer back to the
  loop with a warning.

This module is the lowest layer: it imports only torch.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = [
    "ARITHMETIC",
    "CHANNELWISE_FUNCTIONS",
    "CHANNELWISE_METHODS",
    "CHANNELWISE_MODULES",
    "ELEMENTWISE",
    "OUT_OF_PLACE",
    "SPATIAL",
    "channelwise_kind",
    "has_node",
    "is_stochastic",
    "model_place",
    "module_kind",
    "preserved_modes",
    "probe_forward",
]

ELEMENTWISE: Final = "elementwise"
"""Acts on every element on its own: channel-wise on a tensor of any shape."""

SPATIAL: Final = "spatial"
"""Mixes positions within a channel: channel-wise only on ``(N, C, H, W)``."""

# Module types (subclasses count only if they keep the listed class's forward()). Called as
# ``module(x)`` with nothing else. Dropout modules: any mode (the KL runs the model in eval
# mode, where they are the identity).
CHANNELWISE_MODULES: Final[Mapping[type[nn.Module], str]] = {
    **dict.fromkeys((
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
        nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity, nn.Dropout, nn.AlphaDropout,
    ), ELEMENTWISE),
    **dict.fromkeys((
        nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,  # requires return_indices=False
        nn.LPPool2d,
        nn.Upsample,  # and its subclasses UpsamplingNearest2d / UpsamplingBilinear2d
        nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d,
        nn.Dropout2d,  # zeroes whole channels at random: still channel c from channel c
    ), SPATIAL),
}  # fmt: skip

# Functions (``call_function`` targets), the flowing tensor as first argument.
CHANNELWISE_FUNCTIONS: Final[Mapping[Callable[..., Any], str]] = {
    **dict.fromkeys((
        F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.gelu, F.silu,
        F.mish, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.sigmoid, F.tanh, torch.sigmoid, torch.tanh,
        torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max,  # bounds must be numbers, not tensors
        operator.neg,
        F.dropout, F.alpha_dropout,  # the KL needs training=False (see is_stochastic)
    ), ELEMENTWISE),
    **dict.fromkeys((
        F.max_pool2d, F.adaptive_max_pool2d,  # requires return_indices=False
        F.avg_pool2d, F.adaptive_avg_pool2d, F.lp_pool2d, F.interpolate,
        F.pad,  # requires a pad of at most 4 numbers (only W and H; 6 would pad the channels)
        F.dropout2d,  # the KL needs training=False (see is_stochastic)
    ), SPATIAL),
}  # fmt: skip

# Tensor methods (``call_method`` targets), called on the flowing tensor; in-place forms too.
CHANNELWISE_METHODS: Final[Mapping[str, str]] = dict.fromkeys(
    (
        "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "neg", "neg_", "contiguous",
        "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "clip", "clip_",
    ),
    ELEMENTWISE,
)  # fmt: skip

# Binary arithmetic -> its out-of-place form. ELEMENTWISE when the other operand is a Python
# number (either side). With a tensor operand: the KL interpreter only (see the docstring).
ARITHMETIC: Final[Mapping[Callable[..., Any], Callable[..., Any]]] = {
    operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
    operator.truediv: operator.truediv, operator.iadd: operator.add, operator.isub: operator.sub,
    operator.imul: operator.mul, operator.itruediv: operator.truediv,
    torch.add: torch.add, torch.sub: torch.sub, torch.mul: torch.mul, torch.div: torch.div,
}  # fmt: skip

OUT_OF_PLACE: Final[Mapping[Callable[..., Any], Callable[..., Any]]] = {
    **ARITHMETIC, F.relu_: F.relu, torch.relu_: torch.relu,
}
"""In-place functions -> their out-of-place forms (an interpreter that caches values must not
overwrite them); other functions map to themselves."""

# Where a flag sits among the positional arguments, for the entries that have one.
_RETURN_INDICES_AT: Final = {F.max_pool2d: 6, F.adaptive_max_pool2d: 2}
_TRAINING_AT: Final = {F.dropout: (2, True), F.dropout2d: (2, True), F.alpha_dropout: (2, False)}  # (index, default)


def has_node(values: Any) -> bool:
    """Whether a (nested) argument structure contains an fx ``Node``."""
    found = False

    def visit(n: fx.Node) -> fx.Node:
        nonlocal found
        found = True
        return n

    fx.node.map_arg(values, visit)
    return found


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def module_kind(module: nn.Module | None) -> str | None:
    """:data:`ELEMENTWISE` / :data:`SPATIAL` for a module type in the table, else ``None``.

    A subclass counts only if it keeps the listed class's ``forward`` (a custom forward
    might mix channels)."""
    if module is None:
        return None
    for cls in type(module).__mro__:
        kind = CHANNELWISE_MODULES.get(cls)
        if kind is not None:
            if type(module).forward is not cls.forward or getattr(module, "return_indices", False):
                return None
            return kind
    return None


def channelwise_kind(node: fx.Node, src: fx.Node, modules: Mapping[str, nn.Module]) -> str | None:
    """How ``node`` acts on the tensor produced by ``src``, by the table of this module.

    Args:
        node: a user of ``src`` in a traced graph.
        src: the node whose channels are followed.
        modules: ``dict(graph_module.named_modules())``.

    Returns:
        :data:`ELEMENTWISE` or :data:`SPATIAL` when ``node`` applies a table entry to
        ``src`` alone and the entry's requirements hold, else ``None``. Stochastic calls
        are included (see :func:`is_stochastic`).
    """
    if node.op == "call_module":
        if node.args != (src,) or node.kwargs:
            return None
        return module_kind(modules.get(str(node.target)))
    if not node.args or node.args[0] is not src or has_node((node.args[1:], node.kwargs)):
        # Binary arithmetic with the number on the left (2 * x) is the only other form.
        if node.op == "call_function" and node.target in ARITHMETIC and len(node.args) == 2 \
                and node.args[1] is src and isinstance(node.args[0], (int, float)) and not node.kwargs:
            return ELEMENTWISE
        return None
    if node.op == "call_method":
        return CHANNELWISE_METHODS.get(str(node.target))
    if node.op != "call_function":
        return None
    fn = node.target
    if fn in ARITHMETIC:
        ok = len(node.args) == 2 and isinstance(node.args[1], (int, float)) and not node.kwargs
        return ELEMENTWISE if ok else None
    kind = CHANNELWISE_FUNCTIONS.get(fn)  # type: ignore[call-overload]
    if kind is None:
        return None
    if fn in _RETURN_INDICES_AT and _arg(node, _RETURN_INDICES_AT[fn], "return_indices", False):
        return None
    if fn is F.pad:
        pad = _arg(node, 1, "pad", None)
        if not isinstance(pad, (tuple, list)) or len(pad) > 4:
            return None
    return kind


def is_stochastic(node: fx.Node) -> bool:
    """Whether a dropout *function* call in the table draws a random mask (``training=True``,
    the default of ``F.dropout`` and ``F.dropout2d``). Dropout modules are not covered:
    their mode is the module's ``training`` flag."""
    if node.op != "call_function" or node.target not in _TRAINING_AT:
        return False
    index, default = _TRAINING_AT[node.target]  # type: ignore[index]
    return bool(_arg(node, index, "training", default))


# ----------------------------------------------------------------------------- probe forward


def model_place(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first floating-point parameter (else buffer);
    CPU / float32 for a model without either."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every module's own train/eval flag on exit, whatever happens inside (a
    mixed state, e.g. one BatchNorm in train mode, survives too)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def probe_forward(
    model: nn.Module, inputs: Sequence[int] | Tensor, run: Callable[[Tensor], Any] | None = None
) -> Any:
    """Run one probe forward: the model in eval mode, under ``torch.no_grad()``, on its own
    device and dtype; every module's train/eval flag is restored afterwards, even on error.

    Args:
        model: the network (its weights and buffers are not touched; eval-mode BatchNorm
            does not update its running statistics).
        inputs: a full input shape including the batch axis, e.g. ``(1, 3, 32, 32)``, for a
            zero tensor; or a tensor, moved to the model's device and dtype.
        run: what to call with the input (default: ``model`` itself), e.g. an
            ``fx.Interpreter(...).run`` of a trace of ``model``.

    Returns:
        Whatever ``run`` returns. Exceptions propagate unchanged (callers word them).
    """
    device, dtype = model_place(model)
    if isinstance(inputs, Tensor):
        x = inputs.to(device, dtype)
    else:
        x = torch.zeros(tuple(int(s) for s in inputs), device=device, dtype=dtype)
    with preserved_modes(model), torch.no_grad():
        model.eval()
        return (model if run is None else run)(x)
