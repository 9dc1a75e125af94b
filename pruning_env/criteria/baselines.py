"""Published baseline criteria: ``l1``, ``l2``, ``taylor_fo``, ``fpgm`` and ``random``.

All but ``taylor_fo`` are data-free (they read the weights only); ``random`` is the only
criterion that uses ``seed``.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from pruning_env.criteria.base import Criterion, register_criterion
from pruning_env.criteria.checks import preserved
from pruning_env.criteria.gradient import gradient_pass

__all__ = ["FPGMCriterion", "L1Criterion", "L2Criterion", "RandomCriterion", "TaylorFOCriterion"]


class _WeightCriterion(Criterion):
    """A data-free criterion computed from each conv's weight ``(C_out, C_in, k_h, k_w)`` alone."""

    needs_data = False
    needs_labels = False

    def per_filter(self, weight: Tensor) -> Tensor:
        """``(C_out,)`` scores from a detached weight tensor."""
        raise NotImplementedError

    def compute(self, model: nn.Module, images: Tensor | None, labels: Tensor | None,
                convs: Mapping[str, nn.Conv2d], *, seed: int) -> Mapping[str, Tensor]:
        with torch.no_grad():
            return {name: self.per_filter(conv.weight.detach()) for name, conv in convs.items()}


@register_criterion("l1")
class L1Criterion(_WeightCriterion):
    """``sum |W|`` over the filter's weights (Li et al. 2017)."""

    def per_filter(self, weight: Tensor) -> Tensor:
        return weight.abs().flatten(1).sum(1)


@register_criterion("l2")
class L2Criterion(_WeightCriterion):
    """``sqrt(sum W^2)`` over the filter's weights (Li et al. 2017), in float64."""

    def per_filter(self, weight: Tensor) -> Tensor:
        return weight.double().pow(2).flatten(1).sum(1).sqrt()


@register_criterion("taylor_fo")
class TaylorFOCriterion(Criterion):
    """``mean_n (sum_{h,w} a * dl_n/da)^2`` (Molchanov et al. 2019, "Importance Estimation
    for Neural Network Pruning"): ``a`` is the filter's channel at the OUTPUT of the
    BatchNorm that directly follows the conv (the paper's gate position; the conv output
    when there is none), ``l_n`` example n's loss. Per-example squares averaged over the
    batch; the paper's code squares the batch-summed gradient instead."""

    def compute(self, model: nn.Module, images: Tensor | None, labels: Tensor | None,
                convs: Mapping[str, nn.Conv2d], *, seed: int) -> Mapping[str, Tensor]:
        assert images is not None and labels is not None
        with preserved(model, restore_buffers=True):
            return gradient_pass(model, images, labels, convs, with_gates=True)[2]


@register_criterion("fpgm")
class FPGMCriterion(_WeightCriterion):
    """Sum of Euclidean distances from the filter's weights to those of every other filter
    of the layer (He et al. 2019, "Filter Pruning via Geometric Median", as their code
    approximates the distance to the geometric median): filters near the median are the
    most replaceable, so low = prune first."""

    def per_filter(self, weight: Tensor) -> Tensor:
        flat = weight.flatten(1).double()
        dist = torch.cdist(flat, flat, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
        return dist.sum(1)


@register_criterion("random")
class RandomCriterion(Criterion):
    """Uniform in ``[0, 1)``, seeded by ``seed`` and the layer's name, so a layer's values do
    not depend on which other layers are scored."""

    needs_data = False
    needs_labels = False
    uses_seed = True

    def compute(self, model: nn.Module, images: Tensor | None, labels: Tensor | None,
                convs: Mapping[str, nn.Conv2d], *, seed: int) -> Mapping[str, Tensor]:
        out = {}
        for name, conv in convs.items():
            gen = torch.Generator().manual_seed((zlib.crc32(name.encode()) + 1_000_003 * seed) % 2**63)
            out[name] = torch.rand(conv.out_channels, generator=gen)
        return out
