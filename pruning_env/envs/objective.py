"""The team objective J of a pruned network; the env's reward is its per-step difference."""

from __future__ import annotations

import math
from typing import Protocol

__all__ = ["REWARD_MODES", "objective"]

REWARD_MODES = ("linear", "budget", "amc")


class _RewardSettings(Protocol):
    reward: str
    lam: float
    macs_target: float
    budget_penalty: float


def objective(cfg: _RewardSettings, acc_ratio: float, macs_ratio: float, acc: float, macs: float) -> float:
    """The team objective J of a network (higher is better).

    Args:
        cfg: the reward settings (an :class:`~pruning_env.envs.config.EnvConfig`).
        acc_ratio: validation accuracy / the unpruned network's.
        macs_ratio: MACs / the unpruned network's.
        acc: validation accuracy in percent.
        macs: MACs per image.

    * ``linear``: ``acc_ratio - lam * macs_ratio``
    * ``budget``: ``acc_ratio - budget_penalty * max(0, macs_ratio - macs_target)``
    * ``amc``: ``-error * log(MACs)`` (He et al. 2018), error = 1 - acc / 100.
    """
    if cfg.reward == "linear":
        return acc_ratio - cfg.lam * macs_ratio
    if cfg.reward == "budget":
        return acc_ratio - cfg.budget_penalty * max(0.0, macs_ratio - cfg.macs_target)
    if cfg.reward == "amc":
        return -(1.0 - acc / 100.0) * math.log(max(macs, 1.0))
    raise ValueError(f"reward must be one of {REWARD_MODES}, got {cfg.reward!r}")
