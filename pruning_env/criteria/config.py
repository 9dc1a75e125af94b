"""How filters are ranked: the one scoring config the env, the prune CLI and the benchmarks share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pruning_env.core.config import option
from pruning_env.criteria import KL_MODES, list_criteria

__all__ = ["ScoringConfig"]


@dataclass(frozen=True)
class ScoringConfig:
    """Which criterion ranks the filters, and on which calibration data."""

    criterion: str = option("dsfp", "filter ranking (see pruning_env.criteria)", choices=list_criteria)
    direction: str = option("low", "dsfp: which end of the fused score is pruned (low: the paper's code; "
                            "benchmarks/results/criteria.md found no significant difference)", choices=["low", "high"])
    kl: str = option("exact", "KL mode of the kl and dsfp criteria", choices=KL_MODES)
    calib_size: int = option(128, "calibration images (from the TRAINING split) for data-driven criteria")

    @property
    def uses_kl(self) -> bool:
        """Whether the criterion has a KL component (``kl`` matters only then)."""
        return self.criterion in ("dsfp", "kl")

    def options(self, seed: int = 0) -> dict[str, Any]:
        """Keyword options of :func:`pruning_env.criteria.score` for this config."""
        opts: dict[str, Any] = {"seed": seed}
        if self.criterion == "dsfp":
            opts["direction"] = self.direction
        if self.uses_kl:
            opts["kl"] = self.kl
        return opts
