"""``kl="exact"`` and ``kl="exact_loop"``: the KL of zeroing each filter, exactly.

``"exact_loop"`` (:func:`kl_loop`)
    The definition, literally: one forward of the whole batch per filter, with a forward
    hook zeroing the channel. The reference and the benchmark baseline.
``"exact"`` (:func:`kl_batched`)
    The same numbers, much faster. The model is traced once with ``torch.fx``; the clean
    forward is run once and every intermediate value cached. For each layer, a chunk of
    ``m`` filters is evaluated in ONE batched run of the graph *suffix* that starts at the
    conv: while the perturbation stays inside channel-wise operations (the table of
    :mod:`pruning_env.core.fx`, plus eval-mode BatchNorm and adding a clean tensor; see
    :mod:`~pruning_env.criteria.interpreter`) only the affected channel of each copy is
    carried, as an ``(N, m, H, W)`` tensor; the next convolution is then evaluated as its
    cached clean output plus a grouped convolution of the single-channel change; from there
    on, every (copy, image) pair whose change is not identically zero is a row of one
    batch, and clean values from before the conv (skip connections) are gathered into that
    batch. Pairs whose change is exactly zero contribute exactly zero. That batch runs in
    channels-last layout with eval-mode BatchNorms folded into the convs before them, so
    values agree with the loop to rounding (about 1e-6 relative), not bit for bit. Each
    filter still costs the part of the network after its layer: for VGG-16 the loop does
    about 5.3x the multiply-accumulates. The first filter of every layer is checked against
    the loop (``kl_verify``); models that cannot be traced, or layers whose check fails,
    fall back to the loop with a warning.

Both run with the model in eval mode under ``torch.no_grad()`` (the caller's job, see
:func:`pruning_env.criteria.kl.kl_scores`) and return ``{layer: (C_out,) float64}`` nats.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from pruning_env.criteria.checks import check_logits, first_line, forward, model_errors
from pruning_env.criteria.interpreter import Graph, Unbatchable, Untraceable

__all__ = ["kl_batched", "kl_loop", "kl_rows"]

CHUNK_BYTES = 256 * 2**20  # memory of one batched activation in "exact" mode (auto chunk size)


def kl_rows(clean: Tensor, masked: Tensor) -> Tensor:
    """``KL(softmax(clean) || softmax(masked))`` per row, float64. Shapes broadcast, last dim = classes."""
    logp = F.log_softmax(clean.double(), dim=-1)
    logq = F.log_softmax(masked.double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _zero_channel_hook(mask: dict[str, int]) -> Callable[[nn.Module, Any, Tensor], Tensor]:
    """A forward hook that zeroes output channel ``mask["channel"]`` (read at call time)."""

    def hook(_module: nn.Module, _inp: Any, value: Tensor) -> Tensor:
        value = value.clone()
        value[:, mask["channel"]] = 0
        return value

    return hook


def kl_loop(
    model: nn.Module,
    images: Tensor,
    convs: Mapping[str, nn.Conv2d],
    channels: Sequence[int] | None = None,
    clean: Tensor | None = None,
) -> dict[str, Tensor]:
    """The reference: one forward per filter with the conv's output channel zeroed.

    Args:
        model: in eval mode (the caller's job).
        images: ``(N, C, H, W)`` on the model's device and dtype.
        convs: the layers to score.
        channels: only these filters (the others stay 0); default all.
        clean: the unmasked ``(N, K)`` logits, if already known.

    Returns:
        ``{layer: (C_out,) float64}`` CPU tensors (nats, averaged over the batch).
    """
    if clean is None:
        clean = check_logits(forward(model, images), images.shape[0], None)
    out: dict[str, Tensor] = {}
    for name, conv in convs.items():
        kl = torch.zeros(conv.out_channels, dtype=torch.float64)
        mask = {"channel": 0}
        handle = conv.register_forward_hook(_zero_channel_hook(mask))
        try:
            for c in range(conv.out_channels) if channels is None else channels:
                mask["channel"] = c
                kl[c] = kl_rows(clean, model(images)).mean().cpu()
        finally:
            handle.remove()
        out[name] = kl
    return out


def _take_rows(t: Tensor, rows: Tensor) -> Tensor:
    """``t[rows]`` along the batch axis, keeping a channels-last layout."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t[rows]  # advanced indexing keeps channels_last; index_select does not
    return t.index_select(0, rows)


def _gather(value: Any, rows: Tensor, n: int) -> Any:
    """Select batch rows of a clean, batch-dependent value (tensors nested in tuples/lists)."""
    if isinstance(value, Tensor):
        if value.dim() == 0 or value.shape[0] != n:
            raise Unbatchable(f"a batch-dependent value of shape {tuple(value.shape)} has no leading batch axis")
        return _take_rows(value, rows)
    if isinstance(value, (tuple, list)):
        return type(value)(_gather(v, rows, n) for v in value)
    return value


def _chunk_size(graph: Graph, env: dict[fx.Node, Any], start: fx.Node, n: int, channels: int) -> int:
    """Filters per batched run so that one batched activation stays near :data:`CHUNK_BYTES`."""
    biggest = 1
    for node in graph.nodes[graph.pos[start] :]:
        v = env.get(node)
        if isinstance(v, Tensor) and node in graph.batch_dep and v.dim() > 0:
            biggest = max(biggest, v[0].numel() * v.element_size())
    return max(1, min(channels, CHUNK_BYTES // (n * biggest)))


def kl_batched(
    model: nn.Module, images: Tensor, convs: Mapping[str, nn.Conv2d], *, chunk: int | None, verify: bool
) -> dict[str, Tensor]:
    """``"exact"`` mode: many filters per forward of the graph suffix (module docstring).

    Args:
        model: in eval mode, no ``inplace`` activations (the caller's job).
        images: ``(N, C, H, W)`` on the model's device and dtype.
        convs: the layers to score.
        chunk: filters per batched run (``None``: about :data:`CHUNK_BYTES` per activation).
        verify: check filter 0 of every layer against :func:`kl_loop`.

    Returns:
        ``{layer: (C_out,) float64}`` CPU tensors, as :func:`kl_loop`.
    """
    try:
        graph = Graph.trace(model)
        with model_errors(images):
            try:  # channels-last activations: faster convolutions and pooling on CPU and GPU
                env, clean = graph.run_clean(images.contiguous(memory_format=torch.channels_last))
            except (RuntimeError, TypeError, IndexError):  # e.g. .view() in forward() needs the default layout
                env, clean = graph.run_clean(images)
    except Untraceable as exc:
        warnings.warn(
            f"kl='exact': torch.fx cannot trace {type(model).__name__} ({exc}); using the slow one-forward-per-filter "
            "loop (kl='exact_loop') instead",
            stacklevel=7,  # the caller of score() / compute_components() (via kl_scores and probe_forward)
        )
        return kl_loop(model, images, convs)
    n = images.shape[0]
    clean = check_logits(clean, n, None)
    order = sorted(convs, key=lambda name: min((graph.pos[x] for x in graph.conv_nodes.get(name, [])), default=0))
    out: dict[str, Tensor] = {}
    for name in order:
        conv = convs[name]
        nodes = graph.conv_nodes.get(name, [])
        if not nodes:  # never called by forward: removing its filters changes nothing
            out[name] = torch.zeros(conv.out_channels, dtype=torch.float64)
            continue
        start = nodes[0]
        # Values that no later node reads are dropped as we go (the graph is in topological order).
        for node in [x for x in env if graph.last_use[x] < graph.pos[start] and graph.pos[x] < graph.pos[start]]:
            del env[node]
        reason = "it is called more than once in forward()" if len(nodes) > 1 else None
        if reason is None:
            try:
                m = chunk or _chunk_size(graph, env, start, n, conv.out_channels)
                kl = torch.zeros(conv.out_channels, dtype=torch.float64)
                for first in range(0, conv.out_channels, m):
                    idx = torch.arange(first, min(first + m, conv.out_channels), device=images.device)
                    kl[first : first + len(idx)] = _kl_suffix(graph, env, start, idx, clean)
                if verify:
                    ref = kl_loop(model, images, {name: conv}, channels=[0], clean=clean)[name][0]
                    if not math.isclose(float(kl[0]), float(ref), rel_tol=1e-3, abs_tol=1e-7):
                        reason = f"a check against the loop failed (filter 0: {float(kl[0]):.6g} vs {float(ref):.6g})"
            except (Unbatchable, RuntimeError, TypeError, ValueError, IndexError) as exc:
                reason = f"{type(exc).__name__}: {first_line(exc)}"
        if reason is not None:
            warnings.warn(
                f"kl='exact': layer {name!r} cannot be batched ({reason}); "
                "using the one-forward-per-filter loop for it",
                stacklevel=7,  # the caller of score() / compute_components() (via kl_scores and probe_forward)
            )
            kl = kl_loop(model, images, {name: conv}, clean=clean)[name]
        out[name] = kl
    return {name: out[name] for name in convs}


def _kl_suffix(graph: Graph, env: dict[fx.Node, Any], start: fx.Node, idx: Tensor, clean: Tensor) -> Tensor:
    """KL of zeroing each channel in ``idx`` of ``start``'s output: ``(len(idx),)`` float64."""
    n, m = clean.shape[0], len(idx)
    x_start = env[start]
    compact: dict[fx.Node, Tensor] = {start: x_start.new_zeros((n, m, *x_start.shape[2:]))}
    dense_nodes: list[fx.Node] = []
    tainted = {start}
    # Phase 1: carry the change channel-wise as long as possible (cheap: one channel per copy).
    for node in graph.nodes[graph.pos[start] + 1 :]:
        touched = [a for a in node.all_input_nodes if a in tainted]
        if not touched:
            continue
        tainted.add(node)
        if node.op != "output" and len(touched) == 1 and touched[0] in compact:
            v = graph.compact_step(node, touched[0], compact[touched[0]], idx, env.__getitem__)
            if v is not None:
                compact[node] = v
                continue
        dense_nodes.append(node)
    if graph.output not in tainted:
        return torch.zeros(m, dtype=torch.float64)
    # Which (copy, example) pairs change at all: the others give exactly the clean logits.
    dense_set = set(dense_nodes)
    active = torch.zeros(n, m, dtype=torch.bool, device=clean.device)
    for node, v in compact.items():
        if any(u in dense_set for u in node.users):
            active |= (v - env[node][:, idx]).flatten(2).abs().amax(2) > 0
    copy_of, example_of = active.t().nonzero(as_tuple=True)  # pairs sorted by copy
    if copy_of.numel() == 0:
        return torch.zeros(m, dtype=torch.float64)
    channel_of = idx[copy_of]
    # Phase 2: the rest of the graph on one batch of P = len(pairs) rows.
    dense: dict[fx.Node, Any] = {}
    done: set[fx.Node] = set()  # BatchNorms already folded into the conv before them
    last = {nd: max((graph.pos[u] for u in nd.users if u in dense_set), default=-1) for nd in (*compact, *dense_nodes)}

    def value(a: fx.Node) -> Any:
        if a in dense:
            return dense[a]
        if a in compact:  # materialise: clean rows with the changed channel written in
            rows = _take_rows(env[a], example_of)  # a new tensor
            rows[torch.arange(len(example_of), device=rows.device), channel_of] = compact[a][example_of, copy_of]
            dense[a] = rows
            return rows
        v = env[a]
        return _gather(v, example_of, n) if a in graph.batch_dep else v

    logits = None
    for node in dense_nodes:
        if node in done:
            continue
        if node.op == "output":
            logits = fx.node.map_arg(node.args[0], value)
            break
        src = node.args[0] if node.args else None
        conv = graph.modules.get(node.target) if node.op == "call_module" else None
        if (
            type(conv) is nn.Conv2d
            and conv.padding_mode == "zeros"
            and isinstance(src, fx.Node)
            and node.args == (src,)
            and not node.kwargs
        ):
            bn = _folded_bn(graph, node)
            target = node if bn is None else bn
            if src in compact and conv.groups == 1:
                change = _conv_of_change(conv, compact[src] - env[src][:, idx], idx, copy_of, example_of)
                if bn is not None:  # BN(clean + change) = BN(clean) + scale * change
                    change.mul_(graph.bn_scale(graph.modules[bn.target]).view(1, -1, 1, 1))
                out = _take_rows(env[target], example_of).clone()
                dense[target] = out.add_(change)
            else:
                weight, bias = graph.folded(node, bn)
                dense[target] = F.conv2d(
                    value(src), weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups
                )
            if bn is not None:
                done.add(bn)
                node = bn
        elif _is_relu(graph, node) and isinstance(src, fx.Node) and src in dense and _owns_output(graph, src):
            dense[node] = torch.relu_(dense.pop(src))  # a single-use fresh intermediate: rectify in place
        else:
            dense[node] = graph.run_node(node, value)
        pos = graph.pos[node]
        for a in [a for a in dense if last.get(a, -1) <= pos and a is not node]:
            del dense[a]
    if not isinstance(logits, Tensor) or logits.shape != (len(copy_of), clean.shape[1]):
        raise Unbatchable("the batched suffix did not produce one row of logits per (filter, image) pair")
    kl_pairs = kl_rows(clean.index_select(0, example_of), logits)
    kl = torch.zeros(m, dtype=torch.float64, device=kl_pairs.device).index_add_(0, copy_of, kl_pairs)
    return (kl / n).cpu()


def _conv_of_change(conv: nn.Conv2d, change: Tensor, idx: Tensor, copy_of: Tensor, example_of: Tensor) -> Tensor:
    """The change of the conv's output (no bias) when, in copy ``j``, only input channel
    ``idx[j]`` changes by ``change[:, j]``: a grouped convolution, one group per copy.

    Args:
        change: ``(N, m, H, W)``.

    Returns:
        ``(P, C_out, H', W')`` rows for the pairs ``(copy_of, example_of)``.
    """
    n, m = change.shape[:2]
    weight = conv.weight[:, idx].transpose(0, 1).reshape(m * conv.out_channels, 1, *conv.kernel_size)
    delta = F.conv2d(change.contiguous(), weight, None, conv.stride, conv.padding, conv.dilation, m)
    delta = delta.view(n * m, conv.out_channels, *delta.shape[2:])  # row e * m + j: example e, copy j
    return delta.index_select(0, example_of * m + copy_of)


def _is_relu(graph: Graph, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(graph.modules[node.target]) is nn.ReLU and len(node.args) == 1 and not node.kwargs
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu) and len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs


def _owns_output(graph: Graph, node: fx.Node) -> bool:
    """Whether ``node``'s value is a fresh tensor that only one consumer reads (so that
    consumer may overwrite it): outputs of convs, BatchNorms, linear layers, additions."""
    if len(node.users) != 1:
        return False
    if node.op == "call_module":
        return type(graph.modules[node.target]) in (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
    return node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)


def _folded_bn(graph: Graph, conv_node: fx.Node) -> fx.Node | None:
    """The eval-mode BatchNorm that is the only consumer of ``conv_node``, if any."""
    if len(conv_node.users) != 1:
        return None
    user = next(iter(conv_node.users))
    if user.op != "call_module" or user.args != (conv_node,) or user.kwargs:
        return None
    bn = graph.modules[user.target]
    if type(bn) is not nn.BatchNorm2d or bn.training or bn.running_mean is None or bn.running_var is None:
        return None
    return user




