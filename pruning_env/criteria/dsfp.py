"""DSFP's criteria: its three sensitivities ``grad``, ``taylor``, ``kl`` and their fusion ``dsfp``.

:func:`compute_components` computes the three in one call (one forward/backward for the
gradients, the KL in the mode chosen); :func:`fuse` combines them.

Pruning direction of ``dsfp``: the source paper leaves it open. Its public code prunes the
filters with the LOWEST fused score, its text and README say the HIGHEST ("inconsistent
importance, prune first"). The ``dsfp`` criterion therefore requires an explicit
``direction``: ``"low"`` returns the fused score ``s`` itself (low ``s`` pruned first),
``"high"`` returns ``-s`` (high ``s`` pruned first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import torch
from torch import Tensor, nn

from pruning_env.criteria.base import Criterion, register_criterion
from pruning_env.criteria.checks import check_batch, check_model, preserved, select_layers, to_model, to_out
from pruning_env.criteria.gradient import gradient_pass
from pruning_env.criteria.kl import KL_OPTIONS, kl_labels_needed, kl_options, kl_scores

__all__ = [
    "DIRECTIONS",
    "Components",
    "DSFPCriterion",
    "GradCriterion",
    "KLCriterion",
    "TaylorCriterion",
    "apply_direction",
    "compute_components",
    "fuse",
    "fuse_normalised",
    "minmax",
]

DIRECTIONS: Final[tuple[str, ...]] = ("low", "high")
"""Values of the ``direction=`` option of ``dsfp``: which end of the fused score is pruned."""


def _check_direction(direction: Any) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(
            "criterion 'dsfp' needs an explicit direction='low' (prune the lowest fused scores, as the paper's "
            f"code) or direction='high' (prune the highest, as the paper's text); got {direction!r}"
        )


def apply_direction(fused: Mapping[str, Tensor], direction: str) -> dict[str, Tensor]:
    """The ``dsfp`` criterion's scores (low = pruned first) of fused scores :func:`fuse` gave, for ``direction``:
    ``"low"`` the fused score ``s`` itself, ``"high"`` ``-s`` (see the module docstring). The one place the
    direction is applied: the criterion, the env and the benchmarks that fuse their own components call it.

    Args:
        fused: ``{layer: (C,) tensor}`` of fused scores.
        direction: one of :data:`DIRECTIONS`.
    """
    _check_direction(direction)
    return dict(fused) if direction == "low" else {name: -v for name, v in fused.items()}


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


def _components(
    model: nn.Module, images: Tensor, labels: Tensor, convs: Mapping[str, nn.Conv2d], opts: Mapping[str, Any]
) -> Components:
    """:func:`compute_components` on a validated batch already on the model's device."""
    with preserved(model, restore_buffers=True):
        grad, taylor, _ = gradient_pass(model, images, labels, convs, with_gates=False)
    kl = None
    if opts["kl"] is not None:
        kl = {name: to_out(v) for name, v in kl_scores(model, images, labels, convs, **opts).items()}
    return Components(
        grad={n: to_out(v) for n, v in grad.items()},
        taylor={n: to_out(v) for n, v in taylor.items()},
        kl=kl,
        kl_mode=opts["kl"],
    )


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
        kl: a mode of :data:`~pruning_env.criteria.KL_MODES`, or ``None`` to skip the KL
            (the cheap call, e.g. for per-step dynamic sensitivities: one forward/backward).
        kl_batch_size: calibration images used for the KL (DSFP's code: 128).
        kl_chunk_size: filters evaluated per batched run in ``"exact"`` mode (default:
            sized to about 256 MiB per activation).
        kl_verify: in ``"exact"`` mode, check one filter per layer against the loop.

    Returns:
        :class:`Components` with ``(out_channels,)`` float32 CPU tensors per layer.
    """
    check_model(model)
    convs = select_layers(model, layers)
    opts = kl_options(
        {"kl": kl, "kl_batch_size": kl_batch_size, "kl_chunk_size": kl_chunk_size, "kl_verify": kl_verify}
    )
    x, y = check_batch(images, labels, need_labels=True)
    x, y = to_model(model, x, y)
    assert y is not None
    return _components(model, x, y, convs, opts)


def minmax(x: Tensor) -> Tensor:
    """Min-max normalise a layer's scores to [0, 1]; a constant layer gives zeros (no NaN)."""
    lo, hi = x.min(), x.max()
    span = hi - lo
    if not bool(span > 0):
        return torch.zeros_like(x)
    return (x - lo) / span


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
        out[name] = fuse_normalised(*(minmax(p) for p in parts))
    return out


def fuse_normalised(g: Tensor, t: Tensor, k: Tensor) -> Tensor:
    """:func:`fuse` of one layer's min-max normalised ``(C,)`` float64 components (checked by the caller):
    ``exp(|g - t| + |t - k| + 0.5 |g - k|)`` as float32."""
    return torch.exp((g - t).abs() + (t - k).abs() + 0.5 * (g - k).abs()).float()


# ----------------------------------------------------------------------------- the criteria


@register_criterion("grad")
class GradCriterion(Criterion):
    """Mean over the filter's weights of ``|dL/dW|`` (DSFP; cross-entropy ``L``)."""

    def compute(self, model: nn.Module, images: Tensor | None, labels: Tensor | None,
                convs: Mapping[str, nn.Conv2d], *, seed: int) -> Mapping[str, Tensor]:
        assert images is not None and labels is not None
        with preserved(model, restore_buffers=True):
            return gradient_pass(model, images, labels, convs, with_gates=False)[0]


@register_criterion("taylor")
class TaylorCriterion(Criterion):
    """Mean over the filter's weights of ``|W * dL/dW|`` (DSFP)."""

    def compute(self, model: nn.Module, images: Tensor | None, labels: Tensor | None,
                convs: Mapping[str, nn.Conv2d], *, seed: int) -> Mapping[str, Tensor]:
        assert images is not None and labels is not None
        with preserved(model, restore_buffers=True):
            return gradient_pass(model, images, labels, convs, with_gates=False)[1]


def _check_kl_mode(criterion: str, mode: str | None) -> None:
    if mode is None:
        raise ValueError(f"criterion {criterion!r} needs a KL mode; kl=None is only for compute_components()")


@register_criterion("kl")
class KLCriterion(Criterion):
    """``KL(softmax(z) || softmax(z_F))`` of zeroing the filter's output channel (DSFP), in
    the mode of option ``kl`` (see :mod:`pruning_env.criteria.kl`); labels only for the
    Fisher modes."""

    options = KL_OPTIONS

    def check_options(self) -> None:
        self.config = kl_options(self.config)
        _check_kl_mode(self.name, self.config["kl"])

    def labels_required(self) -> bool:
        return kl_labels_needed(self.config["kl"])

    def compute(self, model: nn.Module, images: Tensor | None, labels: Tensor | None,
                convs: Mapping[str, nn.Conv2d], *, seed: int) -> Mapping[str, Tensor]:
        assert images is not None
        return kl_scores(model, images, labels, convs, **self.config)


@register_criterion("dsfp")
class DSFPCriterion(Criterion):
    """The DSFP fusion (:func:`fuse`) of ``grad``, ``taylor`` and ``kl``, signed by the
    required ``direction`` (see the module docstring)."""

    options: ClassVar[Mapping[str, Any]] = {"direction": None, **KL_OPTIONS}  # direction: required

    def check_options(self) -> None:
        kl_opts = kl_options(self.config)
        direction = self.config["direction"]
        _check_direction(direction)
        _check_kl_mode(self.name, kl_opts["kl"])
        self.config = {"direction": direction, **kl_opts}

    def compute(self, model: nn.Module, images: Tensor | None, labels: Tensor | None,
                convs: Mapping[str, nn.Conv2d], *, seed: int) -> Mapping[str, Tensor]:
        assert images is not None and labels is not None
        kl_opts = {k: v for k, v in self.config.items() if k != "direction"}
        comps = _components(model, images, labels, convs, kl_opts)
        assert comps.kl is not None
        fused = fuse(comps.grad, comps.taylor, comps.kl)
        return apply_direction(fused, self.config["direction"])
