"""The linearised KL estimates: ``kl="fisher"``, ``"fisher_delta"`` and ``"linear"``.

All three give each (example, filter) a scalar ``s = 0`` that scales the filter's removal,
``value + s * delta``, and read gradients of the output with respect to ``s``:

``"fisher"``
    Second-order (Fisher) expansion in the channel's activation (Theis et al. 2018, "Faster
    gaze prediction with dense networks and Fisher pruning"):
    ``0.5 * mean_n (sum_{h,w} a * dl_n/da)^2`` with ``a`` the conv output channel, ``l_n``
    the cross-entropy of example ``n`` with its label (empirical Fisher), i.e. a
    small-perturbation model of ``a -> 0`` (``delta = -a``).
``"fisher_delta"``
    Like ``"fisher"``, but the perturbation is the EXACT change of the channel at the end
    of its channel-wise chain (e.g. after BatchNorm, ReLU and max-pooling:
    ``relu(bn(0)) - relu(bn(a))``), with the gradient taken there. This removes the error
    of linearising through the ReLU / pooling of the channel itself. The chain follows the
    criteria's fx interpreter (:meth:`~pruning_env.criteria.interpreter.Graph.channelwise`).
``"linear"``
    ``K`` backward passes (one per class) give the Jacobian of the logits with respect to
    the same exact channel change; the KL is then evaluated exactly at the linearised
    logits ``z + J delta`` (no second-order expansion of the softmax). Cost: ``K``
    backward passes of the batch, independent of the number of filters.

Models that torch.fx cannot trace are linearised at the conv output (``delta = -a``),
with a warning.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from pruning_env.criteria.checks import check_logits, forward, model_errors
from pruning_env.criteria.interpreter import Graph, Untraceable, placeholder_default
from pruning_env.criteria.kl_exact import kl_rows

__all__ = ["kl_linearised"]


def kl_linearised(
    model: nn.Module, images: Tensor, labels: Tensor | None, convs: Mapping[str, nn.Conv2d], *, mode: str
) -> dict[str, Tensor]:
    """``fisher`` / ``fisher_delta`` / ``linear``: gradients of the output with respect to a
    scalar ``s`` per (example, filter) that scales the filter's removal ``value + s * delta``.

    Args:
        model: in eval mode, no ``inplace`` activations (the caller's job).
        images: ``(N, C, H, W)`` on the model's device and dtype.
        labels: ``(N,)`` int64; needed by ``fisher`` and ``fisher_delta``.
        convs: the layers to score.
        mode: one of the three modes.

    Returns:
        ``{layer: (C_out,) float64}`` CPU tensors (nats; 0 for convs the forward never calls).
    """
    at_chain = mode in ("fisher_delta", "linear")
    scales: dict[str, Tensor] = {}
    with torch.enable_grad():
        if at_chain:
            try:
                with model_errors(images):
                    logits = _forward_with_removal_scales(model, images, convs, scales)
            except Untraceable as exc:
                warnings.warn(
                    f"kl={mode!r}: torch.fx cannot trace {type(model).__name__} ({exc}); linearising at the conv "
                    "output instead (delta = -a)",
                    stacklevel=5,  # the caller of score() / compute_components() (via kl_scores)
                )
                at_chain = False
        if not at_chain:
            logits = _forward_with_conv_scales(model, images, convs, scales)
        logits = check_logits(logits, images.shape[0], labels)
        names = list(scales)
        leaves = [scales[n] for n in names]
        if mode in ("fisher", "fisher_delta"):
            assert labels is not None
            loss = F.cross_entropy(logits, labels, reduction="sum")  # sum: per-example gradients
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            out = {}
            for name, g in zip(names, grads):
                g = torch.zeros_like(scales[name]) if g is None else g
                out[name] = 0.5 * g.detach().flatten(1).double().pow(2).mean(0)
        else:
            k = logits.shape[1]
            jac = [torch.zeros(*s.shape[:2], k, dtype=torch.float64, device=s.device) for s in leaves]
            for c in range(k):
                grads = torch.autograd.grad(logits[:, c].sum(), leaves, retain_graph=c < k - 1, allow_unused=True)
                for j, g in zip(jac, grads):
                    if g is not None:
                        j[:, :, c] = g.detach().flatten(1).double()
            z = logits.detach().double()
            out = {name: kl_rows(z[:, None, :], z[:, None, :] + j).mean(0) for name, j in zip(names, jac)}
    zeros = {name: torch.zeros(conv.out_channels, dtype=torch.float64) for name, conv in convs.items()}
    return {name: out[name].cpu() if name in out else zeros[name] for name in convs}


def _forward_with_conv_scales(
    model: nn.Module, images: Tensor, convs: Mapping[str, nn.Conv2d], scales: dict[str, Tensor]
) -> Any:
    """Forward with every conv output ``a`` replaced by ``a * (1 - s)``, ``s = 0`` a leaf."""
    handles = []

    def make_hook(name: str) -> Callable[..., Tensor]:
        def hook(_module: nn.Module, _inp: Any, out: Tensor) -> Tensor:
            s = out.new_zeros(out.shape[:2] + (1,) * (out.dim() - 2)).requires_grad_(True)
            scales[name] = s  # a conv called several times: the last call is linearised
            return out * (1 - s)

        return hook

    try:
        for name, conv in convs.items():
            handles.append(conv.register_forward_hook(make_hook(name)))
        return forward(model, images)
    finally:
        for h in handles:
            h.remove()


def _forward_with_removal_scales(
    model: nn.Module, images: Tensor, convs: Mapping[str, nn.Conv2d], scales: dict[str, Tensor]
) -> Any:
    """Interpret the fx graph; at the end of each conv's channel-wise chain (BN, ReLU,
    pooling, adding a clean tensor...), replace the value ``x`` by ``x + s * delta`` where
    ``delta`` is the exact change of removing each channel (all channels at once: the chain
    acts channel-wise) and ``s = 0`` is a leaf of shape ``(N, C, 1, ...)``."""
    graph = Graph.trace(model)
    chains: dict[fx.Node, list[tuple[str, list[fx.Node]]]] = {}
    for name in convs:
        nodes = graph.conv_nodes.get(name, [])
        if len(nodes) != 1:
            continue  # unused (score 0) or shared conv (left at 0: warned below)
        chain = [nodes[0]]
        while len(chain[-1].users) == 1:
            user = next(iter(chain[-1].users))
            if user.op == "output" or not graph.channelwise(user, chain[-1]):
                break
            chain.append(user)
        chains.setdefault(chain[-1], []).append((name, chain))
    shared = [name for name in convs if len(graph.conv_nodes.get(name, [])) > 1]
    if shared:
        raise Untraceable(f"conv(s) {', '.join(shared)} are called more than once")
    env: dict[fx.Node, Any] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = images if node is graph.input else placeholder_default(node)
            continue
        if node.op == "output":
            return fx.node.map_arg(node.args[0], env.__getitem__)
        env[node] = graph.run_node(node, env.__getitem__)
        for name, chain in chains.get(node, []):
            x = env[node]
            with torch.no_grad():
                detached = {a: (v.detach() if isinstance(v, Tensor) else v) for a, v in env.items()}
                full = torch.arange(env[chain[0]].shape[1], device=x.device)
                v = torch.zeros_like(detached[chain[0]])
                cut = 0  # the chain may end early if a step turns out not to be channel-wise
                for i, (prev, step) in enumerate(itertools.pairwise(chain)):
                    nxt = graph.compact_step(step, prev, v, full, detached.__getitem__)
                    if nxt is None:
                        break
                    v, cut = nxt, i + 1
                delta = v - detached[chain[cut]]
            at = chain[cut]
            s = x.new_zeros(delta.shape[:2] + (1,) * (delta.dim() - 2)).requires_grad_(True)
            scales[name] = s
            env[at] = env[at] + s * delta
            for step in chain[cut + 1 :]:  # recompute the rest of the chain from the scaled value
                env[step] = graph.run_node(step, env.__getitem__)
    raise Untraceable("the traced graph has no output")
