"""The search loop shared by ``train_marl.py`` and the benchmarks (budget unit: plans measured)."""

from pruning_env.search.loop import (
    Search,
    SearchConfig,
    algorithm_env,
    algorithm_overrides,
    check_algo_config,
    pareto_front,
)

__all__ = ["Search", "SearchConfig", "algorithm_env", "algorithm_overrides", "check_algo_config", "pareto_front"]
