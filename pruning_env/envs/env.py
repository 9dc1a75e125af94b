"""The multi-agent filter-pruning environment (a PettingZoo ``ParallelEnv``).

Helpers computed from its public surface (a layer's kept filters at a rate, the DSFP-uniform plan, the
objective of an outside network) are functions in :mod:`pruning_env.envs.plans`.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium import spaces
from pettingzoo import ParallelEnv
from torch import nn

from pruning_env.core import checkpoint as ckpt
from pruning_env.core.config import with_overrides
from pruning_env.core.data import Splits
from pruning_env.core.models import check_classes, check_float32
from pruning_env.engine.bn import BNRecalConfig
from pruning_env.engine.budget import budget_keep_counts, check_reachable
from pruning_env.engine.flops import count
from pruning_env.engine.graph import PrunableLayer, consumer_map, prunable_layers
from pruning_env.engine.macs import MacsModel
from pruning_env.engine.plan import PruningPlan, narrow_plan
from pruning_env.envs.config import EnvConfig
from pruning_env.envs.features import (
    FEATURES,
    GLOBAL_FEATURES,
    assemble,
    dynamic_columns,
    observation_features,
    observation_table,
    rst_table,
    static_features,
)
from pruning_env.envs.measure import Measurement, PlanMeter
from pruning_env.envs.plans import REMOVED_FROM_ENV

__all__ = ["INFO_KEYS", "FilterPruningEnv"]

#: The keys of every agent's info (each a float; see ``FilterPruningEnv``'s "Infos"): the
#: :class:`~pruning_env.envs.measure.Measurement`'s info keys and the agent's layer ``rate``.
INFO_KEYS = (*Measurement.info_keys(), "rate")


class FilterPruningEnv(ParallelEnv):
    """Filter pruning of a CNN as a cooperative multi-agent game.

    Description
    -----------
    Every prunable conv layer of a trained CNN is an agent. Over an episode of
    ``T`` steps the agents simultaneously choose a pruning rate for their layers;
    the env prunes each layer to its rate with DSFP single-shot pruning (filters
    ranked by fusing gradient sensitivity, first-order Taylor and output-KL
    sensitivity; the network is physically shrunk), re-estimates BatchNorm
    statistics on a few training batches and measures accuracy on a held-out
    validation subset. The team is rewarded for keeping accuracy while removing
    MACs.

    Agents
    ------
    ``layer_0 ... layer_{L-1}``, one per prunable conv in forward order (see
    :func:`pruning_env.engine.graph.prunable_layers`: ResNets expose only block-internal
    convs). All agents share one observation space and one action space.

    Observation Space
    -----------------
    ``Box(0, 1, (<F> + K,), float32)``, the same layout for every agent, assembled by name from the declared
    list :data:`pruning_env.envs.features.FEATURES` (``observation_features(K)`` gives the names in column
    order, so ``observation_features(K).index("macs_target")`` finds a column):

<observation table>

    ``state()``: all observations concatenated (agent order) plus
    ``[macs_ratio, params_ratio, acc_ratio, progress]``; ``Box(0, 1, (L * (<F> + K) + 4,))``.

    Action Space
    ------------
    ``Discrete(K)``: index into ``config.rates`` (default 0.0, 0.1, ..., 0.9), the
    target pruning rate of the layer (share of its ORIGINAL filters removed). With
    ``continuous=True``: ``Box(0, max(rates), (1,), float32)``. Pruning is monotone
    within an episode: a target below the layer's current rate keeps the current one.

    **Exact budget** (``reward="budget"`` with ``exact_budget=True``, the default): the joint
    action is a *proposal*. :func:`pruning_env.engine.budget.budget_keep_counts` moves all
    proposed rates together, in the agents' proportions, so that the final step's network is at
    or just below ``macs_target`` and no earlier step goes below it. The agents still choose
    the allocation (which layers prune more); the observation features ``macs_target`` and
    ``macs_to_cut`` show the target and what remains to cut. The ``rate`` info is the rate the layer actually got.

    Rewards
    -------
    One team reward, identical for every agent: ``r_t = J(s_{t+1}) - J(s_t)`` where
    ``J`` is :func:`objective` (``linear``: ``acc_ratio - lam * macs_ratio``;
    ``budget``: quality with a graded penalty above a MACs target, which an exact budget never
    reaches; ``amc``: ``-error * log(MACs)``). The quality is the reward proxy's signal on an
    accuracy-ratio scale (``config.proxy``, :mod:`pruning_env.training.proxy`): by default
    ``exp(-KL)`` of the pruned network's outputs (after the BN re-estimation, on the reward images)
    from the unpruned network's; the accuracy ratio (``proxy="acc"``, the default before the reward revision)
    is the alternative; optionally after a few KD steps (``proxy_kd_steps``). How well each ranks plans like a
    fine-tune, and at what cost: README "Results" and ``benchmarks/results/reward_fidelity.md``.
    So an episode's return is ``J(final) - J(unpruned)``.
    Learners that sum per-agent rewards (epymarl) see ``L`` times this; learners
    that average them (BenchMARL) see it as is.

    Starting State
    --------------
    ``reset`` always returns the unpruned network; its scores and accuracy are
    computed once per env and reused.

    Episode End
    -----------
    After ``T`` steps every agent is *terminated* (the plan is final); ``agents``
    becomes empty.

    Infos
    -----
    The same keys at ``reset`` and at every step, each a Python ``float`` that survives a
    float32 cast (learners such as TorchRL and Tianshou stack infos into fixed-shape
    float32 buffers): :data:`INFO_KEYS`, the info form of the plan's
    :class:`~pruning_env.envs.measure.Measurement` (:meth:`~pruning_env.envs.measure.Measurement.info`)
    and the agent's layer ``rate``:

<info table>

    Deterministic values only. The plan (kept filter indices per layer) is :attr:`plan`; the exact
    integer MACs and parameters of any plan are in :meth:`measure` / :meth:`measured_plans`.
    ``plan_info=True`` adds ``plan`` (``PruningPlan.to_dict()``,
    lists that shrink as layers are pruned) to every info: off by default, and unsafe
    for learners that stack infos.

    Arguments
    ---------
    ``model``: a trained ``nn.Module`` (never modified) or a checkpoint path;
    ``splits``: :class:`pruning_env.core.data.Splits` (calibration from ``train``,
    rewards from ``val``; ``test`` is never touched); ``config``: :class:`EnvConfig`
    (or its fields as keyword arguments); ``max_cycles``: alias of
    ``episode_length`` (what ``pettingzoo.make`` passes); ``device`` (a model that is not
    in eval mode or not on ``device`` is copied first: the caller's module keeps its mode and
    device); ``plan_info`` (see Infos).

    Surface
    -------
    Besides the PettingZoo API (``possible_agents``, ``agents``, the spaces, ``reset``, ``step``, ``state``,
    ``render``, ``close``): the settings and data (``config``, ``splits``, ``device``, ``input_shape``,
    ``plan_info``); the unpruned network (:attr:`base_model`, :attr:`layers`, :attr:`layer_names`,
    :attr:`base_macs`, :attr:`base_params`, :attr:`macs_model`, ``baseline_acc``, :attr:`static_features`,
    :attr:`base_sensitivities`,
    :attr:`calibration_batch`); the episode (:attr:`plan`, :attr:`current_step`); plans of this network
    (:meth:`measure` -> :class:`~pruning_env.envs.measure.Measurement`, :meth:`measured_plans`,
    :meth:`plan_from_rates`, :meth:`build_network`, :meth:`measure_network`); accounting and the replica hook
    (``num_evaluations``, ``timings``, ``measurement_source``). More helpers, computed from these:
    :mod:`pruning_env.envs.plans`.

    Version History
    ---------------
    * v1 (issue 25): the current behaviour, released under new ids (``pruning_env/Tiny-v1``,
      ``...-CIFAR10-v1``, ``...-Joint-v1``, ``filter_pruning_v1``) because the revisions below changed it under
      the ``-v0`` ids. The ``-v0`` ids are removed: making one raises an error naming its ``-v1`` id and what
      changed. The surface: one measurement record (:meth:`measure` returns a
      :class:`~pruning_env.envs.measure.Measurement`, the shape infos, search points and parallel workers
      share; ``evaluate_plan`` and ``measurement`` became :meth:`measure`, :meth:`measured_plans` lists
      Measurements); ``pruned_model()`` is ``build_network(env.plan)``, ``widths`` is ``plan.widths``;
      ``keep_count``, ``uniform_plan`` and ``objective_of`` are functions of :mod:`pruning_env.envs.plans`
      (the removed names raise an ``AttributeError`` naming their replacement). Observations (assembled by
      name), rewards and infos are the same as the last ``-v0`` revision's, value for value.
    * v0: initial release (default reward ``linear``; observations of 26 + K features; infos with the
      plan and integer ``macs`` / ``params``), then changed under the same id by:
    * v0, architecture revision: a layer's kept filters at a rate follow the engine's one rule
      (:func:`~pruning_env.engine.plan.keep_count_for_rate`: ``floor(rate * C)`` filters removed;
      before, the env rounded the kept count, e.g. 11 instead of 12 of 16 at rate 0.3); the
      calibration batch is :func:`~pruning_env.core.data.calibration_batch` (seed 0), the same
      images ``prune --seed 0`` scores; the default reward is ``budget`` (was ``linear``), the
      default of ``train_marl.py`` and the benchmarks. Results measured before this revision say so
      in ``benchmarks/results/``.
    * v0, reward revision (issue 16): exact MACs budgets by default with the budget reward (the
      joint action is projected onto the target; ``exact_budget=False`` restores the soft
      penalty); observations gained ``macs_target`` and ``macs_to_cut`` (28 + K features);
      the reward's signal is configurable (``proxy``, ``proxy_kd_steps``) and defaults to the KL from the
      unpruned network's outputs (was the accuracy ratio: ``proxy="acc"``); infos gained ``quality``.
    * v0, library revision (issue 13): infos hold only fixed-shape floats, the same keys at
      ``reset`` and every step (``INFO_KEYS``); ``plan`` left them (opt-in ``plan_info=True``)
      and the integer ``macs`` / ``params`` became ``mmacs`` / ``mparams`` (millions), so
      TorchRL's ``PettingZooWrapper`` and Tianshou's replay buffers take the env as shipped.
      The env no longer switches a caller's model to eval mode or moves it (it copies it);
      ``render()`` before ``reset()`` renders the unpruned network.
    """

    metadata: ClassVar[dict[str, Any]] = {"name": "filter_pruning_v1", "render_modes": ["ansi", "human"],
                                          "is_parallelizable": True}

    def __init__(
        self,
        model: nn.Module | str | Path,
        splits: Splits,
        config: EnvConfig | None = None,
        *,
        max_cycles: int | None = None,
        device: str | torch.device = "cpu",
        render_mode: str | None = None,
        plan_info: bool = False,
        **overrides: Any,
    ) -> None:
        cfg = self._init_settings(config, max_cycles, render_mode, device, plan_info, overrides)
        if isinstance(model, (str, Path)):
            model = ckpt.load(model, map_location=self.device).model
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or a checkpoint path, got {type(model).__name__}")
        check_float32(model)
        if not isinstance(splits, Splits):
            raise TypeError("splits must be a pruning_env.Splits (e.g. from pruning_env.load_splits)")
        self.splits = splits
        self.input_shape = splits.input_shape
        self._base = _private_eval_copy(model, self.device)  # never modified: every network is a new pruned copy
        check_classes(self._base, self.input_shape, splits.num_classes)
        layers = prunable_layers(self._base, self.input_shape)
        # Fixed calibration batch (train split) and reward images (validation split): see envs.measure.
        self._init_problem(self._base, layers, lambda: PlanMeter(self._base, layers, splits, cfg, self._keep_count,
                                                                 self.device))

    def _init_settings(self, config: EnvConfig | None, max_cycles: int | None, render_mode: str | None,
                       device: str | torch.device, plan_info: bool, overrides: dict[str, Any]) -> EnvConfig:
        """The settings of ``__init__`` (shared with envs made another way, e.g. the surrogate's)."""
        try:
            cfg = with_overrides(config or EnvConfig(), **overrides)
        except TypeError as exc:  # an unknown keyword: say which settings exist
            raise TypeError(f"{type(self).__name__}: {exc}") from None
        if max_cycles is not None:
            cfg = with_overrides(cfg, episode_length=int(max_cycles))
        self.config = cfg
        if render_mode not in (None, "ansi", "human"):
            raise ValueError(f"render_mode must be None, 'ansi' or 'human', got {render_mode!r}")
        self.render_mode = render_mode
        self.device = torch.device(device)
        self.plan_info = bool(plan_info)
        return cfg

    def _init_problem(self, model: nn.Module, layers: list[PrunableLayer], make_meter: Callable[[], PlanMeter]) -> None:
        """The agents, spaces, meter and the unpruned network's measurement of ``model``'s prunable ``layers``
        (``make_meter()`` measures plans; called once the rate rule can be: it may take ``self._keep_count``)."""
        cfg = self.config
        if not layers:
            raise ValueError("the model has no prunable conv layer (see pruning_env.engine.graph for the policy)")
        self._layers = layers
        self._names = [layer.name for layer in self._layers]
        self._orig = np.array([layer.out_channels for layer in self._layers])
        self._widths = {layer.name: layer.out_channels for layer in self._layers}
        self.possible_agents = [f"layer_{i}" for i in range(len(self._layers))]
        self.agents: list[str] = []
        self._agent_index = {a: i for i, a in enumerate(self.possible_agents)}
        producer = consumer_map(self._layers)
        self._input_layer = [
            self._names.index(producer[layer.name][0]) if layer.name in producer else -1 for layer in self._layers
        ]
        self._rates = np.asarray(cfg.rates, dtype=np.float64)
        self._meter = make_meter()
        self._macs_model = self._meter.macs_model
        self._cache: OrderedDict[str, Measurement] = OrderedDict()
        #: On a cache miss, ``measurement_source(plan)`` may return another same-model/data/config env's
        #: :meth:`measure` of it (a parallel worker's: :mod:`pruning_env.search.parallel`); None: measure here.
        self.measurement_source: Callable[[PruningPlan], Measurement | None] | None = None
        self.num_evaluations = 0  # plans measured (cache misses): the budget unit of a search
        # Seconds spent per phase of plan measurement (for benchmarks/env_step.py; never in infos).
        self.timings = self._meter.timings
        full = self._full_plan()
        self._base_macs, self._base_params = self._macs_model.predict(self._keep_counts(full))
        target = cfg.budget_target
        if target is not None:
            check_reachable(self._macs_model, cfg.rule, float(self._rates.max()), target)
        self._static = static_features(model, self._layers, self.input_shape, self._base_macs, self._base_params)
        base = self._measure(full)
        self.baseline_acc = base.acc
        self._feature_names = observation_features(len(self._rates))  # the observation's columns, in order
        self._obs_dim = len(self._feature_names)
        obs_space = spaces.Box(0.0, 1.0, (self._obs_dim,), np.float32)
        if cfg.continuous:
            act_space: spaces.Space = spaces.Box(0.0, float(self._rates.max()), (1,), np.float32)
        else:
            act_space = spaces.Discrete(len(self._rates))
        self.observation_spaces = {a: obs_space for a in self.possible_agents}
        self.action_spaces = {a: act_space for a in self.possible_agents}
        self.state_space = spaces.Box(0.0, 1.0, (len(self._layers) * self._obs_dim + len(GLOBAL_FEATURES),), np.float32)
        self._np_random = np.random.default_rng()
        self._plan = full
        self._step = 0
        self._done = True
        self._last_reward = 0.0

    # ------------------------------------------------------------------ PettingZoo API

    def observation_space(self, agent: str) -> spaces.Box:
        return self.observation_spaces[agent]

    def action_space(self, agent: str) -> spaces.Space:
        return self.action_spaces[agent]

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
        if seed is not None:
            self._np_random = np.random.default_rng(seed)
            last: dict[int, tuple[spaces.Space, int]] = {}  # one seed per space, each space's last (agents share)
            for space in (*self.action_spaces.values(), *self.observation_spaces.values()):
                last[id(space)] = (space, int(self._np_random.integers(2**31)))
            for space, space_seed in last.values():
                space.seed(space_seed)
        self.agents = list(self.possible_agents)
        self._plan = self._full_plan()
        self._step = 0
        self._done = False
        self._last_reward = 0.0
        measured = self._measure(self._plan)
        return self._observations(measured), self._infos(measured)

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        if self._done:
            raise RuntimeError("the episode is over (all agents terminated); call reset() before step()")
        targets = self._parse_actions(actions)
        before = self._measure(self._plan)
        j_before = before.objective
        final = self._step + 1 >= self.config.episode_length
        self._plan = self._next_plan(self._plan, before, targets, final=final)
        after = self._measure(self._plan)
        self._step += 1
        reward = after.objective - j_before
        self._last_reward = reward
        obs = self._observations(after)
        infos = self._infos(after)
        done = self._step >= self.config.episode_length
        rewards = {a: float(reward) for a in self.agents}
        terminations = {a: done for a in self.agents}
        truncations = {a: False for a in self.agents}
        if done:
            self._done = True
            self.agents = []
        if self.render_mode == "human":
            print(self.render())
        return obs, rewards, terminations, truncations, infos

    def state(self) -> np.ndarray:
        measured = self._measure(self._plan)
        obs = self._observation_matrix(measured)
        whole = {"macs_ratio": measured.macs_ratio, "params_ratio": measured.params_ratio,
                 "acc_ratio": min(1.0, measured.acc_ratio), "progress": self._step / self.config.episode_length}
        glob = assemble({k: np.array([v]) for k, v in whole.items()}, GLOBAL_FEATURES)[0]
        return np.concatenate([obs.reshape(-1), glob]).astype(np.float32)

    def render(self) -> str | None:
        """A text table of per-layer rates and kept filters, MACs and the last reward."""
        measured = self._measure(self._plan)
        lines = [f"{'(not reset yet) ' if not self.agents and self._step == 0 else ''}"
                 f"step {self._step}/{self.config.episode_length}  acc {measured.acc:.2f}% "
                 f"(base {self.baseline_acc:.2f}%)  MACs {measured.macs / 1e6:.2f}M "
                 f"({100 * measured.macs / self._base_macs:.1f}%)  reward {self._last_reward:+.4f}",
                 f"{'agent':<10} {'layer':<22} {'kept':>11} {'rate':>6}"]
        for i, name in enumerate(self._names):
            kept = len(self._plan.keep[name])
            lines.append(f"{self.possible_agents[i]:<10} {name:<22} {kept:>5}/{self._orig[i]:<5} "
                         f"{1 - kept / self._orig[i]:>6.2f}")
        text = "\n".join(lines)
        return text if self.render_mode in (None, "ansi", "human") else None

    def close(self) -> None:
        self._cache.clear()

    # ------------------------------------------------------------------ helpers for users

    @property
    def layer_names(self) -> list[str]:
        """Conv module names of the agents, in agent order."""
        return list(self._names)

    @property
    def plan(self) -> PruningPlan:
        """The current pruning plan (kept filter indices of the original network)."""
        return self._plan

    @property
    def base_model(self) -> nn.Module:
        """The unpruned network (do not modify it)."""
        return self._base

    @property
    def layers(self) -> list[PrunableLayer]:
        """The prunable layers (one per agent, in agent order): name, BN, consumers, shapes."""
        return list(self._layers)

    @property
    def current_step(self) -> int:
        """Steps taken in the current episode (0 after ``reset``, ``episode_length`` at its end)."""
        return self._step

    @property
    def static_features(self) -> dict[str, np.ndarray]:
        """The unpruned network's per-layer facts by name (:data:`~pruning_env.envs.features.STATIC_FEATURES`):
        ``{feature: (L,) float32 array in [0, 1]}``, agent order (the same columns of every observation)."""
        return {name: column.copy() for name, column in self._static.items()}

    @property
    def calibration_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed calibration batch of the sensitivity scores: normalised ``(N, C, H, W)`` float images
        and ``(N,)`` int64 labels from the TRAINING split, on the env's device (do not modify)."""
        return self._meter.calib_x, self._meter.calib_y

    @property
    def base_sensitivities(self) -> dict[str, dict[str, torch.Tensor]]:
        """The unpruned network's DSFP components on the calibration batch: ``{"grad" | "taylor" | "kl": {layer:
        (C,) tensor}}`` (what ``dynamic=False`` scores every plan's surviving filters by)."""
        return self._meter.sensitivities()

    @property
    def macs_model(self) -> MacsModel:
        """The analytic MACs/params predictor of the unpruned network (``predict(keep_counts)``)."""
        return self._macs_model

    @property
    def base_macs(self) -> int:
        """MACs per image of the unpruned network."""
        return int(self._base_macs)

    @property
    def base_params(self) -> int:
        """Parameters of the unpruned network."""
        return int(self._base_params)

    def plan_from_rates(self, rates: Any, *, budget: bool = True) -> PruningPlan:
        """The plan ONE step proposing per-layer ``rates`` (``(L,)``, agent order) gives from the unpruned
        network: with ``budget`` and an exact budget (:attr:`EnvConfig.budget_target`) the rates are first
        projected onto it as the final step of an episode is (:mod:`pruning_env.engine.budget`), so the plan
        meets the MACs target; the lowest transition scores are pruned."""
        rates = np.asarray(rates, dtype=np.float64).reshape(-1)
        if rates.shape != (len(self._names),) or not np.isfinite(rates).all() or (rates < 0).any() \
                or (rates >= 1).any():
            raise ValueError(f"rates must be {len(self._names)} pruning rates in [0, 1) (one per layer), got "
                             f"{rates.tolist()}")
        full = self._full_plan()
        return self._next_plan(full, self._measure(full), rates.tolist(), final=True, budget=budget)

    def measure(self, plan: PruningPlan) -> Measurement:
        """The :class:`~pruning_env.envs.measure.Measurement` of any ``plan`` of this env's network: measured now
        unless cached (like env steps; a new plan counts in :attr:`num_evaluations`); the env's state is not
        touched."""
        return self._measure(plan)

    def measured_plans(self) -> list[Measurement]:
        """The measurement of every plan measured and still cached, oldest first (each with its ``plan``)."""
        return list(self._cache.values())

    def measure_network(self, model: nn.Module) -> Measurement:
        """The env's measurement of a network built elsewhere (e.g. by another pruning library), taken as it is
        (re-estimate its BN first, as the env does): accuracy and quality on the reward images after the proxy's
        KD steps if any (on a copy: ``model`` is not changed), its exact MACs and parameters, the ratios and the
        objective; ``plan`` None. Not cached, not counted."""
        signals = self._meter.network_signals(model)
        report = count(model, self.input_shape)
        return self._meter.record(None, signals.acc, signals.quality(self.config.proxy.proxy,
                                  self._meter.base_signals), report.macs, report.params, signals=signals)

    def build_network(self, plan: PruningPlan, *, bn: BNRecalConfig | None = None) -> nn.Module:
        """A new, physically pruned network of any ``plan`` of this env's network, with BN re-estimated as the env
        does (or as ``bn`` says, e.g. on more batches); the env's state is not touched."""
        return self._meter.build(plan, bn)

    def __getattr__(self, name: str) -> Any:  # only reached for names the env does not have
        if name in REMOVED_FROM_ENV:
            raise AttributeError(f"FilterPruningEnv.{name} was removed in v1; use {REMOVED_FROM_ENV[name]} (see the "
                                 "env's Version History)")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ internals

    def _keep_count(self, layer: int, rate: float) -> int:
        """Filters agent ``layer`` keeps at pruning ``rate`` (the engine's one rate rule, this env's settings)."""
        return self.config.rule.keep_count(int(self._orig[layer]), float(rate))

    def _full_plan(self) -> PruningPlan:
        full = self.__dict__.get("_full")
        if full is None:  # plans are immutable: one identity plan per env
            full = self._full = PruningPlan.full(self._layers)
        return full

    def _keep_counts(self, plan: PruningPlan) -> dict[str, int]:
        return {n: len(plan.keep[n]) for n in self._names}

    def _next_plan(self, plan: PruningPlan, measured: Measurement, targets: list[float], *, final: bool,
                   budget: bool = True) -> PruningPlan:
        """The transition: each layer keeps ``keep_count(targets)`` filters (never more than now; projected
        onto the exact budget, if any), the lowest-scoring current filters pruned."""
        current = np.array([len(plan.keep[n]) for n in self._names])
        target = self.config.budget_target if budget else None
        if target is None:
            counts = np.minimum(current, [self._keep_count(i, r) for i, r in enumerate(targets)])
        else:
            counts = budget_keep_counts(self._macs_model, self.config.rule, current, targets,
                                        target * self._base_macs, final=final, max_rate=float(self._rates.max()))
        # the lowest transition scores of the current filters pruned
        return narrow_plan(plan, measured.scores, dict(zip(self._names, counts.tolist())))

    def _parse_actions(self, actions: dict[str, Any]) -> list[float]:
        if not isinstance(actions, dict):
            raise TypeError(f"actions must be a dict {{agent: action}}, got {type(actions).__name__}")
        missing = [a for a in self.agents if a not in actions]
        unknown = [a for a in actions if a not in self._agent_index]
        if missing or unknown:
            raise ValueError(
                f"actions must have exactly one entry per live agent; missing {missing}, unknown {unknown}"
            )
        rates = []
        for agent in self.possible_agents:
            a = actions[agent]
            space = self.action_spaces[agent]
            if self.config.continuous:
                arr = np.asarray(a, dtype=np.float64).reshape(-1)
                if arr.size != 1 or not np.isfinite(arr).all() or not (0.0 <= arr[0] <= space.high[0] + 1e-6):
                    raise ValueError(f"action of {agent} must be a rate in [0, {space.high[0]:.3g}], got {a!r}")
                rates.append(float(arr[0]))
            else:
                if isinstance(a, np.ndarray) and a.size == 1:
                    a = a.reshape(()).item()
                if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)) or not 0 <= a < space.n:
                    raise ValueError(f"action of {agent} must be an int in [0, {space.n - 1}], got {a!r}")
                rates.append(float(self._rates[int(a)]))
        return rates

    def _measure(self, plan: PruningPlan) -> Measurement:
        """The measurement of ``plan``'s network, cached by plan."""
        key = plan.key()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        provided = self.measurement_source(plan) if self.measurement_source is not None else None
        if provided is not None:  # a replica's: the ratios and the objective are derived here, as for our own
            return self._remember(key, self._meter.record(plan, provided.acc, provided.quality, provided.macs,
                                                          provided.params, signals=provided.signals,
                                                          scores=provided.scores, features=provided.features))
        return self._remember(key, self._meter.measure(plan))

    def _remember(self, key: str, measured: Measurement) -> Measurement:
        self.num_evaluations += 1
        self._cache[key] = measured
        if len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)
        return measured

    def _observation_matrix(self, m: Measurement) -> np.ndarray:
        """``(L, F + K)``: every agent's observation, assembled by feature name (see Observation Space)."""
        keep = np.array([len(self._plan.keep[n]) for n in self._names]) / self._orig
        dynamic = dynamic_columns(keep, self._input_layer, m.macs_ratio, m.acc_ratio,
                                  self._step / self.config.episode_length, self.config.budget_target)
        return assemble({**self._static, **dynamic, **m.features}, self._feature_names)

    def _observations(self, m: Measurement) -> dict[str, np.ndarray]:
        mat = self._observation_matrix(m)
        return {a: mat[self._agent_index[a]] for a in self.possible_agents}

    def _infos(self, m: Measurement) -> dict[str, dict[str, Any]]:
        shared = m.info()
        extra = {"plan": self._plan.to_dict()} if self.plan_info else {}
        return {a: {**shared, "rate": 1.0 - len(self._plan.keep[self._names[i]]) / float(self._orig[i]), **extra}
                for i, a in enumerate(self.possible_agents)}


def _private_eval_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself when it is in eval mode with every tensor on ``device``, else an eval-mode copy there:
    the caller's module is never switched to eval mode nor moved."""
    def on(t: torch.Tensor) -> bool:
        return t.device.type == device.type and (device.index is None or t.device.index == device.index)

    tensors = [*model.parameters(), *model.buffers()]
    if not any(m.training for m in model.modules()) and all(on(t) for t in tensors):
        return model
    return copy.deepcopy(model).to(device).eval()


if FilterPruningEnv.__doc__:  # the tables are generated from the declarations, so they cannot go stale
    _INFO_ROWS = [*Measurement.meanings().items(), ("rate", "this layer's current pruning rate (1 - kept / original)")]
    FilterPruningEnv.__doc__ = (FilterPruningEnv.__doc__.replace("<F>", str(len(FEATURES)))
                                .replace("<observation table>", observation_table())
                                .replace("<info table>", rst_table(("key", "meaning"), _INFO_ROWS)))
