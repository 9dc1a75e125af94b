"""BatchNorm re-estimation of a pruned network (the env's and the finalize pipeline's first step)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pruning_env.core.config import check_settings, option
from pruning_env.core.data import Splits, batches

__all__ = ["BNRecalConfig", "recalibrate_bn"]


@dataclass(frozen=True)
class BNRecalConfig:
    """BatchNorm re-estimation after pruning (see :func:`recalibrate_bn`)."""

    bn_recal_batches: int = option(2, "training batches to re-estimate BN statistics on after pruning (0: off)",
                                   min=0)
    bn_recal_batch_size: int = option(128, "batch size of the BN re-estimation", min=1)

    def __post_init__(self) -> None:
        check_settings(self)

    def apply(self, model: nn.Module, splits: Splits, *, seed: int = 0,
              device: str | torch.device = "cpu") -> nn.Module:
        """Re-estimate ``model``'s BN statistics in place as configured (nothing when 0 batches)."""
        return recalibrate_bn(model, splits, self.bn_recal_batches, self.bn_recal_batch_size, seed, device)


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    splits: Splits,
    n_batches: int,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``n_batches`` training batches.

    The statistics are reset and re-accumulated as a cumulative (equal-weight)
    average (``momentum=None``) over ``n_batches`` shuffled, un-augmented batches
    of ``splits.train`` drawn with ``seed``, with the rest of the model in eval
    mode (dropout off). Each BN's momentum and every module's train/eval mode are
    restored afterwards. Deterministic in ``seed``. Modifies ``model`` in place
    and returns it; ``n_batches=0`` does nothing.
    """
    if n_batches < 0:
        raise ValueError(f"n_batches must be >= 0, got {n_batches}")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if n_batches == 0 or not norms:
        return model
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        gen = torch.Generator().manual_seed(seed)
        it = batches(splits.train, batch_size, mean=splits.mean, std=splits.std, shuffle=True, generator=gen,
                     device=device)
        for i, (x, _) in enumerate(it):
            if i >= n_batches:
                break
            model(x)
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return model
