"""Filter-importance criteria: the three DSFP sensitivities, their fusion, and baselines.

Every criterion maps a network (and, for the data-driven ones, one calibration batch)
to one score per output filter of every ``nn.Conv2d``. This module knows nothing of
reinforcement learning or of the pruning engine: it only reads the model, and leaves
it exactly as it found it (weights, ``.grad``, BatchNorm running statistics, modes,
``requires_grad`` flags, hooks, device and dtype).

Criteria
--------
=============  ===================================================================
name           score of output filter ``F`` of a conv layer (LOW = prune first)
=============  ===================================================================
``grad``       mean over F's weights of ``|dL/dW|`` (DSFP; cross-entropy ``L``)
``taylor``     mean over F's weights of ``|W * dL/dW|`` (DSFP)
``kl``         ``KL(softmax(z) || softmax(z_F))``, ``z_F`` = logits with F's conv
               output channel zeroed (before its BatchNorm); DSFP
``dsfp``       the DSFP fusion of the three above (see :func:`fuse`), signed by
               ``direction`` (see below)
``l1``         ``sum |W|`` over F's weights (Li et al. 2017)
``l2``         ``sqrt(sum W^2)`` over F's weights (Li et al. 2017)
``taylor_fo``  ``mean_n (sum_{h,w} a * dl_n/da)^2`` (Molchanov et al. 2019, "Importance
               Estimation for Neural Network Pruning"): ``a`` is F's channel at the
               OUTPUT of the BatchNorm that directly follows the conv (the paper's gate
               position; the conv output when there is none), ``l_n`` example n's loss.
               Per-example squares averaged over the batch; the paper's code squares
               the batch-summed gradient instead.
``fpgm``       sum of Euclidean distances from F's weights to those of every other
               filter of the layer (He et al. 2019, "Filter Pruning via Geometric Median",
               as their code approximates the distance to the geometric median): filters
               near the median are the most replaceable, so low = prune first
``random``     uniform in [0, 1), seeded (``seed=``, default 0)
=============  ===================================================================

Pruning direction
-----------------
:func:`score` always returns values such that **the filters with the lowest values
are pruned first** (:func:`prune_first` gives that order). For every criterion except
``dsfp`` the values are importance-like, so low means unimportant.

``dsfp`` is the exception the source paper leaves open: its public code prunes the
filters with the LOWEST fused score, its text and README say the HIGHEST ("inconsistent
importance, prune first"). ``score(..., "dsfp", direction=...)`` therefore requires an
explicit ``direction``:

* ``direction="low"``  returns the fused score ``s`` itself (the code's choice: low ``s``
  pruned first);
* ``direction="high"`` returns ``-s`` (the text's choice: high ``s`` pruned first).

Gradient pass (``grad``, ``taylor``, ``taylor_fo``)
---------------------------------------------------
One cross-entropy (mean over the batch) forward/backward with BatchNorm layers using
batch statistics (as in DSFP's code, which calls ``model.train()``) but with dropout
OFF (every other module in eval mode; DSFP's code leaves dropout on), so scores are
deterministic. Running statistics
are restored afterwards, and gradients are taken with ``torch.autograd.grad`` so no
``.grad`` attribute is touched.

KL modes (option ``kl=``)
-------------------------
The KL is computed with the model in eval mode on the first ``kl_batch_size`` (default
128, as DSFP's code) images, summed over classes and averaged over the batch, in float64
from the logits (DSFP's code takes ``log`` of a clamped softmax; we use ``log_softmax``).

``"exact_loop"``
    The definition, literally: one forward of the whole batch per filter, with a forward
    hook zeroing the channel. The reference and the benchmark baseline.
``"exact"`` (default)
    The same numbers, much faster. The model is traced once with ``torch.fx``; the clean
    forward is run once and every intermediate value cached. For each layer, a chunk of
    ``m`` filters is evaluated in ONE batched run of the graph *suffix* that starts at the
    conv: while the perturbation stays inside channel-wise operations (BatchNorm in eval
    mode, activations, pooling, adding a clean tensor) only the affected channel of each
    copy is carried, as an ``(N, m, H, W)`` tensor; the next convolution is then evaluated
    as its cached clean output plus a grouped convolution of the single-channel change;
    from there on, every (copy, image) pair whose change is not identically zero is a row
    of one batch, and clean values from before the conv (skip connections) are gathered
    into that batch. Pairs whose change is exactly zero contribute exactly zero. That
    batch runs in channels-last layout with eval-mode BatchNorms folded into the convs
    before them, so values agree with the loop to rounding (about 1e-6 relative), not
    bit for bit. Each filter still costs the part of the network after its layer: for
    VGG-16 the loop does about 5.3x the multiply-accumulates. The first filter of every
    layer is checked against the loop (``kl_verify``); models that cannot be traced, or
    layers whose check fails, fall back to the loop with a warning.
``"fisher"``
    One backward pass, second-order (Fisher) expansion in the channel's activation
    (Theis et al. 2018, "Faster gaze prediction with dense networks and Fisher pruning"):
    ``0.5 * mean_n (sum_{h,w} a * dl_n/da)^2`` with ``a`` the conv output channel,
    ``l_n`` the cross-entropy of example ``n`` with its label (empirical Fisher), i.e. a
    small-perturbation model of ``a -> 0``.
``"fisher_delta"``
    One backward pass, like ``"fisher"``, but the perturbation is the EXACT change of the
    channel at the end of its channel-wise chain (e.g. after BatchNorm, ReLU and
    max-pooling: ``relu(bn(0)) - relu(bn(a))``), with the gradient taken there. This
    removes the error of linearising through the ReLU / pooling of the channel itself.
``"linear"``
    ``K`` backward passes (one per class) give the Jacobian of the logits with respect to
    the same exact channel change; the KL is then evaluated exactly at the linearised
    logits ``z + J delta`` (no second-order expansion of the softmax). Cost: ``K``
    backward passes of the batch, independent of the number of filters.

:data:`KL_MODES` lists the modes; ``benchmarks/kl_speed.py`` measures their speed and
their rank agreement with ``"exact"``.
"""

from __future__ import annotations

import math
import operator
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "CRITERIA",
    "KL_MODES",
    "DIRECTIONS",
    "Components",
    "list_criteria",
    "score",
    "compute_components",
    "fuse",
    "prune_first",
]

CRITERIA: tuple[str, ...] = ("grad", "taylor", "kl", "dsfp", "l1", "l2", "taylor_fo", "fpgm", "random")
"""Names accepted by :func:`score`."""

KL_MODES: tuple[str, ...] = ("exact", "exact_loop", "fisher", "fisher_delta", "linear")
"""Values of the ``kl=`` option (see the module docstring)."""

DIRECTIONS: tuple[str, ...] = ("low", "high")
"""Values of the ``direction=`` option of ``dsfp``: which end of the fused score is pruned."""

_KL_OPTIONS = ("kl", "kl_batch_size", "kl_chunk_size", "kl_verify")
_OPTIONS: dict[str, tuple[str, ...]] = {
    "grad": (),
    "taylor": (),
    "kl": _KL_OPTIONS,
    "dsfp": ("direction", *_KL_OPTIONS),
    "l1": (),
    "l2": (),
    "taylor_fo": (),
    "fpgm": (),
    "random": ("seed",),
}
_DATA_FREE = ("l1", "l2", "fpgm", "random")
_CHUNK_BYTES = 256 * 2**20  # memory of one batched activation in "exact" mode (auto chunk size)


@dataclass
class Components:
    """The three DSFP sensitivities of every scored conv layer.

    Attributes:
        grad: layer name -> ``(out_channels,)`` float32 CPU tensor, mean ``|dL/dW|``.
        taylor: layer name -> ``(out_channels,)``, mean ``|W * dL/dW|``.
        kl: layer name -> ``(out_channels,)`` KL divergences in nats, or ``None`` when
            computed with ``kl=None``.
        kl_mode: the KL mode used (``None`` when ``kl`` is ``None``).
    """

    grad: dict[str, Tensor]
    taylor: dict[str, Tensor]
    kl: dict[str, Tensor] | None
    kl_mode: str | None = None


def list_criteria() -> list[str]:
    """Names accepted by :func:`score` (the same as :data:`CRITERIA`)."""
    return list(CRITERIA)


# ============================================================================ public API


def score(
    model: nn.Module,
    images: Tensor | None,
    labels: Tensor | None,
    criterion: str,
    *,
    layers: Sequence[str] | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    """Score every output filter of the model's conv layers; LOW values are pruned first.

    Args:
        model: any ``nn.Module`` with ``nn.Conv2d`` layers, on any device; left unchanged.
        images: ``(N, C, H, W)`` float calibration batch, normalised as in training.
            May be ``None`` for the data-free criteria ``l1``, ``l2``, ``fpgm``, ``random``.
        labels: ``(N,)`` int64 class indices in ``[0, num_classes)``; may be ``None`` for
            data-free criteria and for ``kl`` in modes ``exact``, ``exact_loop``, ``linear``.
        criterion: one of :data:`CRITERIA` (see the module docstring).
        layers: names (as in ``model.named_modules()``) of the conv layers to score;
            default: every ``nn.Conv2d``.
        **options: criterion-specific:
            ``random``: ``seed`` (int, default 0).
            ``kl``: ``kl`` (mode, default ``"exact"``, see :data:`KL_MODES`),
            ``kl_batch_size`` (default 128: the first that many images are used),
            ``kl_chunk_size`` (filters per batched run in ``exact`` mode; default: sized
            to about 256 MiB per activation), ``kl_verify`` (default True).
            ``dsfp``: ``direction`` (required, ``"low"`` or ``"high"``) and the ``kl`` options.

    Returns:
        ``{layer name: (out_channels,) float32 CPU tensor}`` in ``named_modules()`` order.

    Raises:
        ValueError: unknown criterion, bad inputs, unknown layer names, bad option values.
        TypeError: an option the criterion does not take.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; valid criteria: {', '.join(CRITERIA)}")
    unknown = sorted(set(options) - set(_OPTIONS[criterion]))
    if unknown:
        valid = ", ".join(_OPTIONS[criterion]) or "none"
        raise TypeError(
            f"criterion {criterion!r} got unexpected option(s) {', '.join(unknown)}; valid options: {valid}"
        )
    _check_model(model)
    convs = _select_layers(model, layers)

    if criterion in _DATA_FREE:
        if images is not None or labels is not None:
            _check_batch(images, labels, need_labels=False)
        if criterion == "random":
            return _random_scores(convs, options.get("seed", 0))
        fn = {"l1": _l1, "l2": _l2, "fpgm": _fpgm}[criterion]
        with torch.no_grad():
            return {name: _to_out(fn(conv.weight.detach())) for name, conv in convs.items()}

    kl_opts = _kl_options(options)
    if criterion in ("grad", "taylor"):
        comps = compute_components(model, images, labels, layers=list(convs), kl=None)
        return comps.grad if criterion == "grad" else comps.taylor
    if criterion == "taylor_fo":
        x, y = _check_batch(images, labels, need_labels=True)
        x, y = _to_model(model, x, y)
        with _preserved(model, restore_buffers=True):
            _, _, gate = _gradient_pass(model, x, y, convs, with_gates=True)
        return {name: _to_out(gate[name]) for name in convs}
    if criterion == "kl":
        need_labels = kl_opts["kl"] in ("fisher", "fisher_delta")
        x, y = _check_batch(images, labels, need_labels=need_labels)
        x, y = _to_model(model, x, y)
        kl = _kl_scores(model, x, y, convs, **kl_opts)
        return {name: _to_out(v) for name, v in kl.items()}
    # dsfp
    direction = options.get("direction")
    if direction not in DIRECTIONS:
        raise ValueError(
            "criterion 'dsfp' needs an explicit direction='low' (prune the lowest fused scores, as the paper's "
            f"code) or direction='high' (prune the highest, as the paper's text); got {direction!r}"
        )
    if kl_opts["kl"] is None:
        raise ValueError("criterion 'dsfp' needs a KL mode; kl=None is only for compute_components()")
    comps = compute_components(model, images, labels, layers=list(convs), **kl_opts)
    assert comps.kl is not None
    fused = fuse(comps.grad, comps.taylor, comps.kl)
    return fused if direction == "low" else {name: -v for name, v in fused.items()}


def compute_components(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    layers: Sequence[str] | None = None,
    kl: str | None = "exact",
    kl_batch_size: int = 128,
    kl_chunk_size: int | None = None,
    kl_verify: bool = True,
) -> Components:
    """The DSFP sensitivities ``grad``, ``taylor`` (one forward/backward) and ``kl``.

    Args:
        model: the network; left unchanged.
        images: ``(N, C, H, W)`` float calibration batch. Gradients use all ``N`` images,
            the KL the first ``kl_batch_size``.
        labels: ``(N,)`` int64 class indices.
        layers: conv layer names to score (default: every ``nn.Conv2d``).
        kl: a mode of :data:`KL_MODES`, or ``None`` to skip the KL (the cheap call, e.g.
            for per-step dynamic sensitivities: one forward/backward in total).
        kl_batch_size: calibration images used for the KL (DSFP's code: 128).
        kl_chunk_size: filters evaluated per batched run in ``"exact"`` mode (default:
            sized to about 256 MiB per activation).
        kl_verify: in ``"exact"`` mode, check one filter per layer against the loop.

    Returns:
        :class:`Components` with ``(out_channels,)`` float32 CPU tensors per layer.
    """
    _check_model(model)
    convs = _select_layers(model, layers)
    opts = _kl_options(
        {"kl": kl, "kl_batch_size": kl_batch_size, "kl_chunk_size": kl_chunk_size, "kl_verify": kl_verify}
    )
    x, y = _check_batch(images, labels, need_labels=True)
    x, y = _to_model(model, x, y)
    with _preserved(model, restore_buffers=True):
        grad, taylor, _ = _gradient_pass(model, x, y, convs, with_gates=False)
    kl_scores = None
    if opts["kl"] is not None:
        kl_scores = {name: _to_out(v) for name, v in _kl_scores(model, x, y, convs, **opts).items()}
    return Components(
        grad={n: _to_out(v) for n, v in grad.items()},
        taylor={n: _to_out(v) for n, v in taylor.items()},
        kl=kl_scores,
        kl_mode=opts["kl"],
    )


def fuse(grad: Mapping[str, Tensor], taylor: Mapping[str, Tensor], kl: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """DSFP fusion of the three sensitivities, per layer.

    Each of ``grad``, ``taylor``, ``kl`` is min-max normalised to ``[0, 1]`` within its
    layer (a constant layer becomes all zeros), giving ``g``, ``t``, ``k``; the fused
    score is ``exp(|g - t| + |t - k| + 0.5 |g - k|)``, in ``[1, e^2]``. It measures the
    criteria's *disagreement*, not importance (see the module docstring on direction).

    Args:
        grad, taylor, kl: ``{layer: (C,) tensor}`` with the same layers and lengths.

    Returns:
        ``{layer: (C,) float32 CPU tensor}`` in the order of ``grad``.
    """
    if not (set(grad) == set(taylor) == set(kl)):
        raise ValueError(
            f"fuse() needs the same layers in grad, taylor and kl; got {sorted(grad)}, {sorted(taylor)}, {sorted(kl)}"
        )
    out: dict[str, Tensor] = {}
    for name in grad:
        parts = [torch.as_tensor(d[name]).detach().to("cpu", torch.float64).flatten() for d in (grad, taylor, kl)]
        if len({p.numel() for p in parts}) != 1:
            raise ValueError(f"layer {name!r}: grad, taylor and kl have lengths {[p.numel() for p in parts]}")
        if not all(bool(torch.isfinite(p).all()) for p in parts):
            raise ValueError(f"layer {name!r}: the sensitivities contain NaN or inf")
        g, t, k = (minmax(p) for p in parts)
        out[name] = torch.exp((g - t).abs() + (t - k).abs() + 0.5 * (g - k).abs()).float()
    return out


def prune_first(scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Filter indices of every layer in pruning order: lowest score first, ties by index.

    Args:
        scores: ``{layer: (C,) tensor}`` as returned by :func:`score`.

    Returns:
        ``{layer: (C,) int64 CPU tensor}``, a permutation of ``0..C-1`` per layer.
    """
    out: dict[str, Tensor] = {}
    for name, s in scores.items():
        s = torch.as_tensor(s).detach().to("cpu").flatten()
        if torch.isnan(s).any():
            raise ValueError(f"layer {name!r}: scores contain NaN; cannot order its filters")
        out[name] = torch.sort(s, stable=True).indices.to(torch.int64)
    return out


# ============================================================================ validation


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _select_layers(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Conv2d]:
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if layers is None:
        if not convs:
            raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer to score")
        return convs
    if isinstance(layers, str):
        raise TypeError(f"layers must be a sequence of layer names, not a string ({layers!r}); use [{layers!r}]")
    wanted = list(layers)
    if not wanted:
        raise ValueError("layers is empty; pass None to score every conv layer")
    unknown = [n for n in wanted if n not in convs]
    if unknown:
        modules = dict(model.named_modules())
        details = [f"{n!r} ({type(modules[n]).__name__}, not nn.Conv2d)" if n in modules else repr(n) for n in unknown]
        shown = ", ".join(list(convs)[:8]) + (", ..." if len(convs) > 8 else "")
        raise ValueError(f"not conv layers of this model: {', '.join(details)}. Conv layers: {shown}")
    keep = set(wanted)
    return {name: m for name, m in convs.items() if name in keep}


def _check_batch(images: Any, labels: Any, *, need_labels: bool) -> tuple[Tensor, Tensor | None]:
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a (N, C, H, W) float tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float and normalised (e.g. via pruning_env.core.data.batches), got {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (N = 0)")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or inf")
    if labels is None:
        if need_labels:
            raise ValueError("this criterion needs labels: a (N,) int64 tensor of class indices")
        return images, None
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a (N,) int64 tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must have shape ({images.shape[0]},) to match images; got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be class indices >= 0; got minimum {int(labels.min())}")
    return images, labels.long()


def _check_logits(logits: Any, n: int, labels: Tensor | None) -> Tensor:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"the model must return (N, num_classes) logits; it returned {shape} for N = {n}")
    if labels is not None and int(labels.max()) >= logits.shape[1]:
        raise ValueError(
            f"labels must be < num_classes = {logits.shape[1]} (the model's output size); "
            f"got maximum {int(labels.max())}"
        )
    return logits


def _kl_options(options: Mapping[str, Any]) -> dict[str, Any]:
    mode = options.get("kl", "exact")
    if mode is not None and mode not in KL_MODES:
        raise ValueError(f"unknown KL mode {mode!r}; valid modes: {', '.join(KL_MODES)} (or None)")
    bs = options.get("kl_batch_size", 128)
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"kl_batch_size must be a positive integer, got {bs!r}")
    chunk = options.get("kl_chunk_size")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"kl_chunk_size must be a positive integer or None, got {chunk!r}")
    return {"kl": mode, "kl_batch_size": bs, "kl_chunk_size": chunk, "kl_verify": bool(options.get("kl_verify", True))}


def _model_place(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def _to_model(model: nn.Module, images: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
    device, dtype = _model_place(model)
    return images.to(device, dtype), None if labels is None else labels.to(device)


def _to_out(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float32).flatten()


def minmax(x: Tensor) -> Tensor:
    """Min-max normalise a layer's scores to [0, 1]; a constant layer gives zeros (no NaN)."""
    lo, hi = x.min(), x.max()
    span = hi - lo
    if not bool(span > 0):
        return torch.zeros_like(x)
    return (x - lo) / span


@contextmanager
def _model_errors(images: Tensor) -> Iterator[None]:
    """Turn shape/type errors raised while running the model into a short ValueError."""
    try:
        yield
    except (RuntimeError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"the model failed on images of shape {tuple(images.shape)}: {first}") from None


def _forward(model: Callable[[Tensor], Any], images: Tensor) -> Any:
    with _model_errors(images):
        return model(images)


# ============================================================================ model state


@contextmanager
def _preserved(model: nn.Module, *, restore_buffers: bool) -> Iterator[None]:
    """Restore train/eval modes, requires_grad flags, ``inplace`` flags and (optionally)
    every buffer's values on exit, whatever happens inside."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    inplace = [(m, m.inplace) for m in model.modules() if isinstance(getattr(m, "inplace", None), bool)]
    saved = [(b, b.detach().clone()) for b in model.buffers()] if restore_buffers else []
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, flag in inplace:
            m.inplace = flag
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def _set_modes(model: nn.Module, *, batchnorm_train: bool) -> None:
    """Every module in eval mode; BatchNorm layers in train mode if ``batchnorm_train``."""
    for m in model.modules():
        m.training = batchnorm_train and isinstance(m, _BatchNorm)


def _no_inplace(model: nn.Module) -> None:
    """Switch off ``inplace`` of activations so cached activations are never overwritten
    (restored by :func:`_preserved`)."""
    for m in model.modules():
        if getattr(m, "inplace", None) is True:
            m.inplace = False


# ============================================================================ gradient pass


def _gradient_pass(
    model: nn.Module, images: Tensor, labels: Tensor, convs: dict[str, nn.Conv2d], *, with_gates: bool
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """One CE forward/backward (BN batch statistics, dropout off).

    Returns ``grad``, ``taylor`` and (if ``with_gates``) ``taylor_fo`` scores, each
    ``{layer: (C,)}``. Must run inside :func:`_preserved` with ``restore_buffers=True``.
    """
    _set_modes(model, batchnorm_train=True)
    weights = [conv.weight for conv in convs.values()]
    for w in weights:
        w.requires_grad_(True)
    gate_modules = _gate_modules(model, convs) if with_gates else {}
    gates: dict[str, list[Tensor]] = {name: [] for name in gate_modules}
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(_module: nn.Module, _inp: Any, out: Tensor) -> Tensor:
            # A per-example, per-channel gate of ones: d loss / d gate = sum_{h,w} a * d loss / d a.
            gate = torch.ones(out.shape[:2] + (1,) * (out.dim() - 2), device=out.device, dtype=out.dtype)
            gate.requires_grad_(True)
            gates[name].append(gate)
            return out * gate

        return hook

    try:
        for name, module in gate_modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        with torch.enable_grad():
            logits = _check_logits(_forward(model, images), images.shape[0], labels)
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


def _gate_modules(model: nn.Module, convs: dict[str, nn.Conv2d]) -> dict[str, nn.Module]:
    """Where taylor_fo's gate sits: the BatchNorm that directly consumes the conv
    (Molchanov et al. 2019 gate after BN), else the conv itself. Found from the fx graph;
    if the model cannot be traced, the module registered right after the conv if it is a
    BatchNorm of matching width (the convention of DSFP's code)."""
    modules = dict(model.named_modules())
    out: dict[str, nn.Module] = {name: conv for name, conv in convs.items()}
    try:
        graph = _Graph.trace(model)
    except _Untraceable:
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
            if user.op == "call_module" and isinstance(graph.modules[user.target], _BatchNorm):
                if user.args[0] is nodes[0]:
                    out[name] = graph.modules[user.target]
    return out


# ============================================================================ weight criteria


def _l1(w: Tensor) -> Tensor:
    return w.abs().flatten(1).sum(1)


def _l2(w: Tensor) -> Tensor:
    return w.double().pow(2).flatten(1).sum(1).sqrt()


def _fpgm(w: Tensor) -> Tensor:
    flat = w.flatten(1).double()
    dist = torch.cdist(flat, flat, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    return dist.sum(1)


def _random_scores(convs: dict[str, nn.Conv2d], seed: Any) -> dict[str, Tensor]:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    out = {}
    for name, conv in convs.items():
        # Seeded per layer name, so a layer's values do not depend on which others are scored.
        gen = torch.Generator().manual_seed((zlib.crc32(name.encode()) + 1_000_003 * seed) % 2**63)
        out[name] = torch.rand(conv.out_channels, generator=gen)
    return out


# ============================================================================ KL: common


def _kl_rows(clean: Tensor, masked: Tensor) -> Tensor:
    """``KL(softmax(clean) || softmax(masked))`` per row, float64. Shapes broadcast, last dim = classes."""
    logp = F.log_softmax(clean.double(), dim=-1)
    logq = F.log_softmax(masked.double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _kl_scores(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | None,
    convs: dict[str, nn.Conv2d],
    *,
    kl: str,
    kl_batch_size: int,
    kl_chunk_size: int | None,
    kl_verify: bool,
) -> dict[str, Tensor]:
    images = images[:kl_batch_size]
    labels = None if labels is None else labels[:kl_batch_size]
    with _preserved(model, restore_buffers=False):
        _set_modes(model, batchnorm_train=False)
        _no_inplace(model)
        if kl == "exact_loop":
            with torch.no_grad():
                return _kl_loop(model, images, convs)
        if kl == "exact":
            with torch.no_grad():
                return _kl_batched(model, images, convs, chunk=kl_chunk_size, verify=kl_verify)
        return _kl_linearised(model, images, labels, convs, mode=kl)


def _kl_loop(
    model: nn.Module,
    images: Tensor,
    convs: dict[str, nn.Conv2d],
    channels: Sequence[int] | None = None,
    clean: Tensor | None = None,
) -> dict[str, Tensor]:
    """The reference: one forward per filter with the conv's output channel zeroed.

    Args:
        channels: only these filters (the others stay 0); default all.
        clean: the unmasked ``(N, K)`` logits, if already known.

    Returns ``{layer: (C,) float64}``."""
    if clean is None:
        clean = _check_logits(_forward(model, images), images.shape[0], None)
    out: dict[str, Tensor] = {}
    for name, conv in convs.items():
        kl = torch.zeros(conv.out_channels, dtype=torch.float64)
        mask = {"channel": 0}

        def hook(_module: nn.Module, _inp: Any, value: Tensor) -> Tensor:
            value = value.clone()
            value[:, mask["channel"]] = 0
            return value

        handle = conv.register_forward_hook(hook)
        try:
            for c in range(conv.out_channels) if channels is None else channels:
                mask["channel"] = c
                kl[c] = _kl_rows(clean, model(images)).mean().cpu()
        finally:
            handle.remove()
        out[name] = kl
    return out


# ============================================================================ KL: fx graph


class _Untraceable(Exception):
    """torch.fx cannot trace the model (dynamic control flow, unsupported ops...)."""


class _Unbatchable(Exception):
    """The graph suffix cannot be evaluated for many filters in one batch."""


_INPLACE_FUNCTIONS: dict[Any, Any] = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    torch.relu_: torch.relu,
    F.relu_: F.relu,
}

# Modules that act on each channel independently (in eval mode) and keep the channel axis.
_CHANNELWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
    nn.ZeroPad2d, nn.ConstantPad2d,
)  # fmt: skip
_CHANNELWISE_FUNCTIONS: frozenset = frozenset({
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.softplus, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout,
})  # fmt: skip
_CHANNELWISE_METHODS = frozenset({"relu", "sigmoid", "tanh"})
_BINARY = frozenset({operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul})


class _Graph:
    """A torch.fx trace of a model plus the bookkeeping the KL modes need."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.modules = dict(gm.named_modules())
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if not placeholders:
            raise _Untraceable("the traced graph has no input")
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

    @classmethod
    def trace(cls, model: nn.Module) -> "_Graph":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm = fx.symbolic_trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure means: use the loop
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise _Untraceable(f"{type(exc).__name__}: {first}") from None
        return cls(gm)

    def run_node(self, node: fx.Node, value: Callable[[fx.Node], Any]) -> Any:
        """Evaluate one node, reading its inputs through ``value``; in-place ops run out of place."""
        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            fn = _INPLACE_FUNCTIONS.get(node.target, node.target)
            if kwargs.get("inplace") is True:
                kwargs = {**kwargs, "inplace": False}
            return fn(*args, **kwargs)
        if node.op == "call_method":
            name = str(node.target)
            if name.endswith("_") and not name.startswith("_") and callable(getattr(Tensor, name[:-1], None)):
                name = name[:-1]
            obj, *rest = args
            return getattr(obj, name)(*rest, **kwargs)
        if node.op == "get_attr":
            obj: Any = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj
        raise _Unbatchable(f"cannot evaluate node {node.op} {node.target}")

    def run_clean(self, images: Tensor) -> tuple[dict[fx.Node, Any], Any]:
        """Run the whole graph on ``images``; returns every node's value and the output."""
        env: dict[fx.Node, Any] = {}
        for node in self.nodes:
            if node.op == "placeholder":
                env[node] = images if node is self.input else _placeholder_default(node)
            elif node.op == "output":
                return env, fx.node.map_arg(node.args[0], env.__getitem__)
            else:
                env[node] = self.run_node(node, env.__getitem__)
        raise _Untraceable("the traced graph has no output")

    def compact_step(
        self, node: fx.Node, src: fx.Node, v: Tensor, idx: Tensor, value: Callable[[fx.Node], Any]
    ) -> Tensor | None:
        """Apply ``node`` to a channel-subset tensor, if ``node`` acts channel-wise.

        ``v`` is ``(N, m, ...)``: the values of channels ``idx`` of ``src`` (in copy ``j``,
        channel ``idx[j]`` is changed); every other input of ``node`` is clean and read
        through ``value``. Returns the ``(N, m, ...)`` result for the same channels, or
        ``None`` if ``node`` mixes channels (or examples)."""
        if node.op == "call_module":
            if node.args != (src,) or node.kwargs:
                return None
            mod = self.modules[node.target]
            if isinstance(mod, _BatchNorm):
                if mod.training or mod.running_mean is None or mod.running_var is None:
                    return None
                w = None if mod.weight is None else mod.weight[idx]
                b = None if mod.bias is None else mod.bias[idx]
                return F.batch_norm(v, mod.running_mean[idx], mod.running_var[idx], w, b, False, 0.0, mod.eps)
            if type(mod) in _CHANNELWISE_MODULES and not getattr(mod, "return_indices", False):
                return mod(v)
            return None
        if node.op == "call_function":
            fn = node.target
            if fn in _CHANNELWISE_FUNCTIONS:
                if not node.args or node.args[0] is not src or src in node.args[1:] or src in node.kwargs.values():
                    return None
                rest = fx.node.map_arg(node.args[1:], value)
                kwargs = fx.node.map_arg(node.kwargs, value)
                if any(isinstance(a, Tensor) for a in (*rest, *kwargs.values())) or kwargs.get("return_indices"):
                    return None
                if kwargs.get("inplace") is True:
                    kwargs = {**kwargs, "inplace": False}
                if fn is F.dropout and (len(rest) > 1 and rest[1] or kwargs.get("training")):
                    return None
                return fn(v, *rest, **kwargs)
            if fn in _BINARY or fn in (operator.iadd, operator.isub, operator.imul):
                fn = _INPLACE_FUNCTIONS.get(fn, fn)
                if len(node.args) != 2 or node.kwargs or (node.args[0] is src) == (node.args[1] is src):
                    return None
                other_node = node.args[1] if node.args[0] is src else node.args[0]
                other = fx.node.map_arg(other_node, value)
                src_value = value(src)
                if isinstance(other, Tensor):
                    if other.shape != src_value.shape:
                        return None
                    other = other[:, idx]
                elif not isinstance(other, (int, float)):
                    return None
                return fn(v, other) if node.args[0] is src else fn(other, v)
            return None
        if node.op == "call_method" and node.target in _CHANNELWISE_METHODS:
            if node.args != (src,) or node.kwargs:
                return None
            return getattr(v, str(node.target))()
        return None


def _placeholder_default(node: fx.Node) -> Any:
    if node.args:
        return node.args[0]
    raise _Untraceable(f"the model's forward needs a second input {node.target!r}")


def _take_rows(t: Tensor, rows: Tensor) -> Tensor:
    """``t[rows]`` along the batch axis, keeping a channels-last layout."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t[rows]  # advanced indexing keeps channels_last; index_select does not
    return t.index_select(0, rows)


def _gather(value: Any, rows: Tensor, n: int) -> Any:
    """Select batch rows of a clean, batch-dependent value (tensors nested in tuples/lists)."""
    if isinstance(value, Tensor):
        if value.dim() == 0 or value.shape[0] != n:
            raise _Unbatchable(f"a batch-dependent value of shape {tuple(value.shape)} has no leading batch axis")
        return _take_rows(value, rows)
    if isinstance(value, (tuple, list)):
        return type(value)(_gather(v, rows, n) for v in value)
    return value


def _chunk_size(graph: _Graph, env: dict[fx.Node, Any], start: fx.Node, n: int, channels: int) -> int:
    """Filters per batched run so that one batched activation stays near :data:`_CHUNK_BYTES`."""
    biggest = 1
    for node in graph.nodes[graph.pos[start] :]:
        v = env.get(node)
        if isinstance(v, Tensor) and node in graph.batch_dep and v.dim() > 0:
            biggest = max(biggest, v[0].numel() * v.element_size())
    return max(1, min(channels, _CHUNK_BYTES // (n * biggest)))


def _kl_batched(
    model: nn.Module, images: Tensor, convs: dict[str, nn.Conv2d], *, chunk: int | None, verify: bool
) -> dict[str, Tensor]:
    """``"exact"`` mode: many filters per forward of the graph suffix (module docstring)."""
    try:
        graph = _Graph.trace(model)
        with _model_errors(images):
            try:  # channels-last activations: faster convolutions and pooling on CPU and GPU
                env, clean = graph.run_clean(images.contiguous(memory_format=torch.channels_last))
            except (RuntimeError, TypeError, IndexError):  # e.g. .view() in forward() needs the default layout
                env, clean = graph.run_clean(images)
    except _Untraceable as exc:
        warnings.warn(
            f"kl='exact': torch.fx cannot trace {type(model).__name__} ({exc}); using the slow one-forward-per-filter "
            "loop (kl='exact_loop') instead",
            stacklevel=4,
        )
        return _kl_loop(model, images, convs)
    n = images.shape[0]
    clean = _check_logits(clean, n, None)
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
                    ref = _kl_loop(model, images, {name: conv}, channels=[0], clean=clean)[name][0]
                    if not math.isclose(float(kl[0]), float(ref), rel_tol=1e-3, abs_tol=1e-7):
                        reason = f"a check against the loop failed (filter 0: {float(kl[0]):.6g} vs {float(ref):.6g})"
            except (_Unbatchable, RuntimeError, TypeError, ValueError, IndexError) as exc:
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if reason is not None:
            warnings.warn(
                f"kl='exact': layer {name!r} cannot be batched ({reason}); "
                "using the one-forward-per-filter loop for it",
                stacklevel=4,
            )
            kl = _kl_loop(model, images, {name: conv}, clean=clean)[name]
        out[name] = kl
    return {name: out[name] for name in convs}


def _kl_suffix(graph: _Graph, env: dict[fx.Node, Any], start: fx.Node, idx: Tensor, clean: Tensor) -> Tensor:
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
                dense[target] = F.conv2d(value(src), weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
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
        raise _Unbatchable("the batched suffix did not produce one row of logits per (filter, image) pair")
    kl_pairs = _kl_rows(clean.index_select(0, example_of), logits)
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


def _is_relu(graph: _Graph, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(graph.modules[node.target]) is nn.ReLU and len(node.args) == 1 and not node.kwargs
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu) and len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs


def _owns_output(graph: _Graph, node: fx.Node) -> bool:
    """Whether ``node``'s value is a fresh tensor that only one consumer reads (so that
    consumer may overwrite it): outputs of convs, BatchNorms, linear layers, additions."""
    if len(node.users) != 1:
        return False
    if node.op == "call_module":
        return type(graph.modules[node.target]) in (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
    return node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)


def _folded_bn(graph: _Graph, conv_node: fx.Node) -> fx.Node | None:
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


# ============================================================================ KL: linearised modes


def _kl_linearised(
    model: nn.Module, images: Tensor, labels: Tensor | None, convs: dict[str, nn.Conv2d], *, mode: str
) -> dict[str, Tensor]:
    """``fisher`` / ``fisher_delta`` / ``linear``: gradients of the output with respect to a
    scalar ``s`` per (example, filter) that scales the filter's removal ``value + s * delta``."""
    at_chain = mode in ("fisher_delta", "linear")
    scales: dict[str, Tensor] = {}
    with torch.enable_grad():
        if at_chain:
            try:
                with _model_errors(images):
                    logits = _forward_with_removal_scales(model, images, convs, scales)
            except _Untraceable as exc:
                warnings.warn(
                    f"kl={mode!r}: torch.fx cannot trace {type(model).__name__} ({exc}); linearising at the conv "
                    "output instead (delta = -a)",
                    stacklevel=4,
                )
                at_chain = False
        if not at_chain:
            logits = _forward_with_conv_scales(model, images, convs, scales)
        logits = _check_logits(logits, images.shape[0], labels)
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
            out = {name: _kl_rows(z[:, None, :], z[:, None, :] + j).mean(0) for name, j in zip(names, jac)}
    zeros = {name: torch.zeros(conv.out_channels, dtype=torch.float64) for name, conv in convs.items()}
    return {name: out[name].cpu() if name in out else zeros[name] for name in convs}


def _forward_with_conv_scales(
    model: nn.Module, images: Tensor, convs: dict[str, nn.Conv2d], scales: dict[str, Tensor]
) -> Any:
    """Forward with every conv output ``a`` replaced by ``a * (1 - s)``, ``s = 0`` a leaf."""
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(_module: nn.Module, _inp: Any, out: Tensor) -> Tensor:
            s = out.new_zeros(out.shape[:2] + (1,) * (out.dim() - 2)).requires_grad_(True)
            scales[name] = s  # a conv called several times: the last call is linearised
            return out * (1 - s)

        return hook

    try:
        for name, conv in convs.items():
            handles.append(conv.register_forward_hook(make_hook(name)))
        return _forward(model, images)
    finally:
        for h in handles:
            h.remove()


def _forward_with_removal_scales(
    model: nn.Module, images: Tensor, convs: dict[str, nn.Conv2d], scales: dict[str, Tensor]
) -> Any:
    """Interpret the fx graph; at the end of each conv's channel-wise chain (BN, ReLU,
    pooling, adding a clean tensor...), replace the value ``x`` by ``x + s * delta`` where
    ``delta`` is the exact change of removing each channel (all channels at once: the chain
    acts channel-wise) and ``s = 0`` is a leaf of shape ``(N, C, 1, ...)``."""
    graph = _Graph.trace(model)
    chains: dict[fx.Node, list[tuple[str, list[fx.Node]]]] = {}
    for name in convs:
        nodes = graph.conv_nodes.get(name, [])
        if len(nodes) != 1:
            continue  # unused (score 0) or shared conv (left at 0: warned below)
        chain = [nodes[0]]
        while len(chain[-1].users) == 1:
            user = next(iter(chain[-1].users))
            if user.op == "output" or not _acts_channelwise(graph, user, chain[-1]):
                break
            chain.append(user)
        chains.setdefault(chain[-1], []).append((name, chain))
    shared = [name for name in convs if len(graph.conv_nodes.get(name, [])) > 1]
    if shared:
        raise _Untraceable(f"conv(s) {', '.join(shared)} are called more than once")
    env: dict[fx.Node, Any] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = images if node is graph.input else _placeholder_default(node)
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
                for i, (prev, step) in enumerate(zip(chain, chain[1:])):
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
    raise _Untraceable("the traced graph has no output")


def _acts_channelwise(graph: _Graph, node: fx.Node, src: fx.Node) -> bool:
    """Whether :meth:`_Graph.compact_step` handles ``node`` (decided on a tiny probe)."""
    if node.op == "call_module":
        mod = graph.modules[node.target]
        return node.args == (src,) and not node.kwargs and (
            (isinstance(mod, _BatchNorm) and not mod.training and mod.running_mean is not None)
            or (type(mod) in _CHANNELWISE_MODULES and not getattr(mod, "return_indices", False))
        )
    if node.op == "call_function":
        if node.target in _CHANNELWISE_FUNCTIONS:
            return bool(node.args) and node.args[0] is src and src not in node.args[1:] and not any(
                isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())
            ) and not node.kwargs.get("return_indices")
        if node.target in _BINARY or node.target in (operator.iadd, operator.isub, operator.imul):
            return len(node.args) == 2 and not node.kwargs and (node.args[0] is src) != (node.args[1] is src)
        return False
    return node.op == "call_method" and node.target in _CHANNELWISE_METHODS and node.args == (src,) and not node.kwargs
