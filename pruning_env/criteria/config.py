"""How filters are ranked: the one scoring config the env, the prune CLI and the benchmarks share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pruning_env.core.config import nested, option
from pruning_env.core.data import CalibrationConfig
from pruning_env.criteria import KL_MODES, get_criterion, list_criteria

__all__ = ["ScoringConfig"]


@dataclass(frozen=True)
class ScoringConfig:
    """Which criterion ranks the filters, and on which calibration data."""

    criterion: str = option("dsfp", "filter ranking (see pruning_env.criteria)", choices=list_criteria)
    direction: str = option("low", "dsfp: which end of the fused score is pruned (low: the paper's code; "
                            "both compared: benchmarks/results/criteria.md)", choices=["low", "high"])
    kl: str = option("exact", "KL mode of the kl and dsfp criteria", choices=KL_MODES)
    calibration: CalibrationConfig = nested(CalibrationConfig, "the calibration batch")

    @property
    def calib_size(self) -> int:
        """Calibration images of the data-driven criteria (``calibration.calib_size``)."""
        return self.calibration.calib_size

    @property
    def uses_kl(self) -> bool:
        """Whether the criterion takes a KL mode (``kl`` matters only then)."""
        return "kl" in get_criterion(self.criterion).options

    @property
    def needs_data(self) -> bool:
        """Whether the criterion needs a calibration batch."""
        return get_criterion(self.criterion).needs_data

    def options(self, seed: int = 0) -> dict[str, Any]:
        """Keyword options of :func:`pruning_env.criteria.score` for this config: the settings the criterion
        accepts (as its registry entry declares them), and ``seed``, which every criterion takes."""
        accepted = get_criterion(self.criterion).options
        own = {"direction": self.direction, "kl": self.kl}
        return {"seed": seed, **{k: v for k, v in own.items() if k in accepted}}
