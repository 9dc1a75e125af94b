"""The env's settings: one composed dataclass that ``train_marl.py`` and the benchmarks nest whole."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pruning_env.core.config import check_settings, flat_dict, nested, option
from pruning_env.criteria.config import ScoringConfig
from pruning_env.engine.bn import BNRecalConfig
from pruning_env.engine.plan import RateRule
from pruning_env.envs.objective import REWARD_MODES
from pruning_env.training.proxy import ProxyConfig

__all__ = ["EnvConfig", "changed_settings", "config_dict"]


@dataclass
class EnvConfig:
    """Settings of :class:`~pruning_env.envs.env.FilterPruningEnv` (all have working defaults).

    Composed of the shared :class:`~pruning_env.criteria.config.ScoringConfig` (ranking),
    :class:`~pruning_env.engine.plan.RateRule` (rate -> kept filters),
    :class:`~pruning_env.engine.bn.BNRecalConfig` and :class:`~pruning_env.training.proxy.ProxyConfig`
    (the reward's signal); every leaf setting has one flat name
    (``criterion``, ``min_keep``, ``bn_recal_batches``...), which is what the env's keyword
    arguments, ``pruning_env.make`` and the command lines take.
    """

    rates: tuple[float, ...] = option(tuple(round(0.1 * i, 1) for i in range(10)), "grid of pruning rates (actions)",
                                  min=0, max=1, max_exclusive=True)
    episode_length: int = option(3, "pruning steps per episode (T)", min=1)
    continuous: bool = option(False, "Box action (a pruning rate in [0, max rate]) instead of Discrete(K)")
    reward: str = option("budget", "reward mode: budget (accuracy under a MACs target), linear or amc",
                         choices=list(REWARD_MODES))
    lam: float = option(0.5, "linear reward: objective = acc_ratio - lam * macs_ratio", min=0)
    macs_target: float = option(0.5, "budget reward: target MACs ratio (pruned / unpruned)",
                                min=0, max=1, min_exclusive=True)
    budget_penalty: float = option(2.0, "budget reward: penalty per unit of MACs ratio above the target "
                                   "(only reached with --no-exact-budget)", min=0)
    exact_budget: bool = option(True, "budget reward: every step's joint action is projected onto the MACs "
                                "target (pruning_env.engine.budget), so every final plan is at or just below it")
    scoring: ScoringConfig = nested(ScoringConfig, "filter ranking of the transition (the unpruned network's KL "
                                    "component is computed once and cached)")
    kl_per_step: str | None = option(None, "recompute KL on the pruned network every step: exact, linear or fisher")
    dynamic: bool = option(True, "recompute grad and Taylor scores on the pruned network every step")
    eval_size: int = option(1000, "validation images the reward's accuracy is measured on", min=1)
    eval_batch_size: int = option(500, "batch size of the reward evaluation", min=1)
    bn: BNRecalConfig = nested(BNRecalConfig, "BN re-estimation before each reward evaluation")
    proxy: ProxyConfig = nested(ProxyConfig, "what the reward measures after the BN re-estimation "
                                "(see benchmarks/results/reward_fidelity.md)")
    rule: RateRule = nested(RateRule, "how a rate becomes a number of kept filters")
    cache_size: int = option(4096, "evaluated plans remembered (LRU)", min=1)

    def __post_init__(self) -> None:
        check_settings(self)  # every declared range and choice (the nested configs' too)
        rates = tuple(float(r) for r in self.rates)
        if not rates or len(set(rates)) != len(rates):
            raise ValueError(f"--rates: rates must be distinct pruning rates (at least one), got {self.rates!r}")
        self.rates = rates

    @property
    def budget_target(self) -> float | None:
        """The MACs ratio every final plan meets exactly (``None`` unless ``reward="budget"`` with
        ``exact_budget``)."""
        return self.macs_target if self.reward == "budget" and self.exact_budget else None


def config_dict(cfg: EnvConfig) -> dict[str, Any]:
    """The config as a flat, JSON-friendly dict (one entry per setting, by flat name)."""
    return flat_dict(cfg)


def changed_settings(cfg: EnvConfig) -> dict[str, Any]:
    """``{flat name: value}`` of the settings where ``cfg`` differs from :class:`EnvConfig`'s defaults.

    What a script passes to a registered env id, so that id keeps its own defaults for the rest
    (e.g. ``Tiny-v1``'s small evaluation subset).
    """
    default = flat_dict(EnvConfig())
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in flat_dict(cfg).items() if v != default[k]}
