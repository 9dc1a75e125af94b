"""Helpers around a :class:`~pruning_env.envs.env.FilterPruningEnv`, computed from its documented surface.

The env itself keeps the PettingZoo API and the few methods that need its state (``measure``,
``measured_plans``, ``plan_from_rates``, ``build_network``, ``measure_network``); what can be derived from
those lives here, as functions taking the env:

* :func:`keep_count`: the filters a layer keeps at a pruning rate (the engine's one rate rule, the env's
  ``min_keep`` / ``round_to``);
* :func:`uniform_plan`: the DSFP-uniform plan (one step at one rate on every layer);
* :func:`objective_of`: the objective J of a network known by its accuracy, MACs and quality;
* :func:`gradual_plan`: keep counts reached in equal steps, the transition's scores re-measured after each;
* :func:`reference_plans`: the uniform (single-shot and gradual) and the global-ranking plan at a MACs budget
  (the reference candidates of the final selection, :mod:`pruning_env.training.selection`).

:data:`REMOVED_FROM_ENV` names what replaces each env method that v1 removed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from pruning_env.engine.budget import budget_keep_counts
from pruning_env.engine.global_prune import GLOBAL_STEPS, iterative_global_plan
from pruning_env.engine.plan import PruningPlan, narrow_plan, plan_top_k
from pruning_env.envs.objective import objective
from pruning_env.training.selection import REFERENCE_SOURCES

if TYPE_CHECKING:
    from pruning_env.envs.env import FilterPruningEnv

__all__ = ["REFERENCES", "REMOVED_FROM_ENV", "gradual_plan", "keep_count", "objective_of", "reference_plans",
           "uniform_plan"]

#: Public names the -v0 env had and v1 removed, and what replaces each (its ``AttributeError`` says so).
REMOVED_FROM_ENV = {
    "evaluate_plan": "env.measure(plan) (a Measurement; .to_dict() gives the old dict)",
    "measurement": "env.measure(plan) (a Measurement: metrics, signals, scores and features)",
    "pruned_model": "env.build_network(env.plan)",
    "widths": "env.plan.widths",
    "keep_count": "pruning_env.envs.plans.keep_count(env, layer, rate)",
    "uniform_plan": "pruning_env.envs.plans.uniform_plan(env, rate)",
    "objective_of": "pruning_env.envs.plans.objective_of(env, acc, macs, quality)",
}


def keep_count(env: FilterPruningEnv, layer: int | str, rate: float) -> int:
    """Filters ``layer`` (agent index or conv name) of ``env`` keeps at pruning ``rate``: the engine's one rate
    rule (:func:`pruning_env.engine.plan.keep_count_for_rate`) with the env's ``min_keep`` / ``round_to``."""
    names = env.layer_names
    if isinstance(layer, str) and layer not in names:
        raise ValueError(f"unknown layer {layer!r}; the env's layers are {names}")
    if isinstance(layer, int) and not 0 <= layer < len(names):
        raise ValueError(f"layer index {layer} out of range: the env has {len(names)} layers")
    lay = env.layers[layer if isinstance(layer, int) else names.index(layer)]
    return env.config.rule.keep_count(lay.out_channels, float(rate))


def uniform_plan(env: FilterPruningEnv, rate: float) -> PruningPlan:
    """The plan one step at ``rate`` on every layer gives from the unpruned network (DSFP-uniform at ``rate``):
    each layer keeps ``keep_count(env, layer, rate)`` filters, the lowest transition scores pruned. Never
    projected onto a budget (``env.plan_from_rates(rates)`` is)."""
    return env.plan_from_rates([rate] * len(env.layer_names), budget=False)


def objective_of(env: FilterPruningEnv, acc: float, macs: float, quality: float | None = None) -> float:
    """The objective J of a network with validation accuracy ``acc`` (percent, on the env's reward images),
    ``macs`` MACs per image and the reward proxy's ``quality`` (None: the accuracy ratio, i.e. J under
    ``proxy="acc"``), under ``env``'s reward settings (what ``env.measure(plan).objective`` is for a plan)."""
    q = acc / max(env.baseline_acc, 1e-9) if quality is None else quality
    return objective(env.config, q, macs / env.base_macs, acc, macs)


REFERENCES = REFERENCE_SOURCES
"""The reference candidates of :func:`reference_plans`, by source name (the selection's own list)."""


def gradual_plan(env: FilterPruningEnv, keep_counts: Mapping[str, int], steps: int) -> PruningPlan:
    """The plan that reaches ``keep_counts`` from the unpruned network in ``steps`` equal steps, each step's
    filters chosen by the transition scores of the network the step before left (the env's transition, as an
    episode of ``steps`` steps prunes; ``dynamic`` says whether those scores are re-measured on the pruned
    network or fused from the unpruned network's over the filters left). Step ``s`` of ``S`` keeps
    ``round(C - s / S * (C - keep_counts))`` filters of a layer of ``C``.

    Args:
        env: the pruning env (its network and transition scores; each intermediate plan is measured once).
        keep_counts: ``{layer: filters kept at the end}`` for every layer of the env.
        steps: number of pruning steps, >= 1 (1: the single-shot plan ``plan_top_k`` gives).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    names = env.layer_names
    missing = [n for n in names if n not in keep_counts]
    if missing:
        raise ValueError(f"keep_counts has no entry for layers {missing}")
    plan = PruningPlan.full(env.layers)
    widths = np.asarray([plan.widths[n] for n in names])
    final = np.asarray([int(keep_counts[n]) for n in names])
    for s in range(1, steps + 1):
        counts = np.maximum(final, np.rint(widths - s / steps * (widths - final)).astype(int))
        plan = narrow_plan(plan, env.measure(plan).scores, dict(zip(names, counts.tolist())))
    return plan


def reference_plans(env: FilterPruningEnv, macs_ratio: float | None = None, *,
                    global_steps: int = GLOBAL_STEPS) -> dict[str, PruningPlan]:
    """The non-learned plans at a MACs budget, ``{source: plan}`` for :data:`REFERENCES`:

    * ``"uniform"``: every layer at one rate, the env's exact-budget rule
      (:func:`~pruning_env.engine.budget.budget_keep_counts` from an all-zero proposal: the rate every layer
      shares rises until the network is within the budget, then filters are given back one at a time), the
      lowest transition scores pruned: DSFP-uniform at the budget;
    * ``"gradual"``: the same keep counts reached in the episode's ``episode_length`` equal steps, the
      transition's scores re-measured after each (:func:`gradual_plan`; iterative pruning as a uniform policy
      over an episode does it); the same plan as ``"uniform"`` with one step (the selection's candidates
      then list it once);
    * ``"global"``: Torch-Pruning's iterative global magnitude pruning (group L1 of each filter's coupled
      tensors, ``global_steps`` steps up to the env's largest rate) to the budget, its last step's filters given
      back while the budget holds (:func:`~pruning_env.engine.global_prune.iterative_global_plan`).

    Args:
        env: the pruning env (its network, rate rule and transition scores).
        macs_ratio: the budget as pruned / unpruned MACs (default: the env's exact budget,
            :attr:`EnvConfig.budget_target`).
        global_steps: the global plan's schedule (Torch-Pruning's ``iterative_steps``).

    Raises:
        ValueError: no budget (``macs_ratio`` None and the env has no exact budget), or one out of (0, 1].
    """
    ratio = env.config.budget_target if macs_ratio is None else float(macs_ratio)
    if ratio is None or not 0.0 < ratio <= 1.0:
        raise ValueError(f"reference plans need a MACs budget in (0, 1] (the env's --macs-target with the budget "
                         f"reward, or macs_ratio=); got {ratio}")
    target = ratio * env.base_macs
    full = PruningPlan.full(env.layers)
    widths = np.asarray([full.widths[n] for n in env.layer_names])
    max_rate = max(float(r) for r in env.config.rates)
    counts = budget_keep_counts(env.macs_model, env.config.rule, widths, [0.0] * len(widths), target, final=True,
                                max_rate=max_rate)
    transition = env.measure(full).scores  # the unpruned network's transition scores (cached)
    final = {n: int(c) for n, c in zip(env.layer_names, counts)}
    uniform = plan_top_k(transition, final)
    gradual = gradual_plan(env, final, env.config.episode_length)
    glob = iterative_global_plan(env.base_model, env.layers, env.macs_model, target, max_rate=max_rate,
                                 steps=global_steps, min_keep=env.config.rule.min_keep,
                                 round_to=env.config.rule.round_to)
    return {"uniform": uniform, "gradual": gradual, "global": glob}
