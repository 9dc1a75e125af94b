"""The pruning engine: prunable-layer analysis, plans and the one rate rule, surgery, MACs, BN re-estimation.

It knows nothing of reinforcement learning: it turns scores into plans (:mod:`.plan`),
plans into smaller networks (:mod:`.surgery`), and predicts or counts their cost
(:mod:`.macs`, :mod:`.flops`).
"""

from pruning_env.engine.bn import BNRecalConfig, recalibrate_bn
from pruning_env.engine.flops import FlopsReport, count
from pruning_env.engine.graph import GraphError, PrunableLayer, consumer_map, prunable_layers
from pruning_env.engine.macs import MacsModel
from pruning_env.engine.plan import (
    PlanError,
    PruningPlan,
    RateRule,
    keep_count_for_rate,
    plan_global,
    plan_per_layer,
    plan_top_k,
    plan_uniform,
)
from pruning_env.engine.surgery import apply

__all__ = [
    "BNRecalConfig",
    "FlopsReport",
    "GraphError",
    "MacsModel",
    "PlanError",
    "PrunableLayer",
    "PruningPlan",
    "RateRule",
    "apply",
    "consumer_map",
    "count",
    "keep_count_for_rate",
    "plan_global",
    "plan_per_layer",
    "plan_top_k",
    "plan_uniform",
    "prunable_layers",
    "recalibrate_bn",
]
