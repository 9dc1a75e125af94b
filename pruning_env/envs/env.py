"""The multi-agent filter-pruning environment (a PettingZoo ``ParallelEnv``)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from pettingzoo import ParallelEnv
from torch import nn

from pruning_env.core import checkpoint as ckpt
from pruning_env.core.config import option
from pruning_env.criteria import compute_components, fuse, list_criteria, minmax, score
from pruning_env.core.data import Splits
from pruning_env.core.evaluation import evaluate
from pruning_env.engine.bn import recalibrate_bn
from pruning_env.engine.flops import count
from pruning_env.engine.graph import consumer_map, prunable_layers
from pruning_env.engine.macs import MacsModel
from pruning_env.engine.plan import PruningPlan
from pruning_env.engine.surgery import apply

__all__ = ["EnvConfig", "FilterPruningEnv", "objective", "REWARD_MODES", "OBSERVATION_FEATURES"]

REWARD_MODES = ("linear", "budget", "amc")
_LOG_FUSED_MAX = 2.5  # log of the largest possible DSFP fused score: |g-t|+|t-k|+0.5|g-k| <= 2.5

STATIC_FEATURES = (
    "depth",  # layer index / (L - 1)
    "in_channels",  # original input channels / widest layer of the network
    "out_channels",  # original filters / widest layer of the network
    "kernel_area",  # k_h * k_w / 25, clipped to 1
    "stride",  # stride / 2, clipped to 1
    "fmap_size",  # output height / input height
    "macs_share",  # the layer's share of the unpruned network's MACs
    "params_share",  # the layer's share of the unpruned network's parameters
)
DYNAMIC_FEATURES = (
    "keep_ratio",  # current filters / original filters of this layer
    "input_keep_ratio",  # same for the prunable layer feeding it (1 if none)
    "macs_ratio",  # MACs of the current network / unpruned
    "acc_ratio",  # last measured validation accuracy / unpruned, clipped to [0, 1]
    "progress",  # steps taken / episode length
)
DSFP_FEATURES = (
    "fused_mean", "fused_std", "fused_min", "fused_max",  # log(DSFP fused score) / 2.5 over current filters
    "grad_mean", "grad_std", "taylor_mean", "taylor_std", "kl_mean", "kl_std",  # min-max normalised components
    "grad_share", "taylor_share", "kl_share",  # the layer's share of the network's raw component mass
)
OBSERVATION_FEATURES = STATIC_FEATURES + DYNAMIC_FEATURES + DSFP_FEATURES  # + one "removed_mass" per grid rate
GLOBAL_FEATURES = ("macs_ratio", "params_ratio", "acc_ratio", "progress")


@dataclass
class EnvConfig:
    """Settings of :class:`FilterPruningEnv` (all have working defaults)."""

    rates: tuple[float, ...] = option(tuple(round(0.1 * i, 1) for i in range(10)), "grid of pruning rates (actions)")
    episode_length: int = option(3, "pruning steps per episode (T)")
    continuous: bool = option(False, "Box action (a pruning rate in [0, max rate]) instead of Discrete(K)")
    reward: str = option("linear", "reward mode", choices=list(REWARD_MODES))
    lam: float = option(0.5, "linear mode: weight of the MACs ratio (objective = acc_ratio - lam * macs_ratio)")
    macs_target: float = option(0.5, "budget mode: target MACs ratio (pruned / unpruned)")
    budget_penalty: float = option(2.0, "budget mode: penalty per unit of MACs ratio above the target")
    criterion: str = option("dsfp", "filter ranking used for the transition")
    direction: str = option("low", "dsfp: which end of the fused score is pruned (low: the paper's code; "
                            "benchmarks/results/criteria.md found no significant difference)", choices=["low", "high"])
    kl: str = option("exact", "KL component of the unpruned network (computed once, cached)")
    kl_per_step: str | None = option(None, "recompute KL on the pruned network every step: exact, linear or fisher")
    dynamic: bool = option(True, "recompute grad and Taylor scores on the pruned network every step")
    calib_size: int = option(128, "calibration images (train split) for the sensitivity scores")
    eval_size: int = option(1000, "validation images the reward's accuracy is measured on")
    eval_batch_size: int = option(500, "batch size of the reward evaluation")
    bn_recal_batches: int = option(2, "training batches to re-estimate BN statistics before evaluation (0: off)")
    bn_recal_batch_size: int = option(128, "batch size of the BN recalibration")
    min_keep: int = option(1, "filters every layer keeps at least")
    round_to: int = option(1, "round kept filters to a multiple of this")
    cache_size: int = option(4096, "evaluated plans remembered (LRU)")


def objective(cfg: EnvConfig, acc_ratio: float, macs_ratio: float, acc: float, macs: float) -> float:
    """The team objective J of a network (the reward is its per-step difference).

    * ``linear``: ``acc_ratio - lam * macs_ratio``
    * ``budget``: ``acc_ratio - budget_penalty * max(0, macs_ratio - macs_target)``
    * ``amc``: ``-error * log(MACs)`` (He et al. 2018), error = 1 - acc / 100.
    """
    if cfg.reward == "linear":
        return acc_ratio - cfg.lam * macs_ratio
    if cfg.reward == "budget":
        return acc_ratio - cfg.budget_penalty * max(0.0, macs_ratio - cfg.macs_target)
    return -(1.0 - acc / 100.0) * math.log(max(macs, 1.0))


@dataclass
class _Measured:
    """What the env knows about one plan: accuracy, cost and the scores of its network."""

    acc: float
    macs: int
    params: int
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # pruning order: low = prune first
    features: np.ndarray | None = None  # (L, n_dsfp_features + K)
    plan: PruningPlan | None = None


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
    ``Box(0, 1, (26 + K,), float32)``, the same layout for every agent:

    ====  ====================  ==========================================================
    idx   feature               meaning (all in [0, 1])
    ====  ====================  ==========================================================
    0     depth                 layer index / (L - 1)
    1     in_channels           original input channels / widest layer
    2     out_channels          original filters / widest layer
    3     kernel_area           k_h * k_w / 25 (clipped)
    4     stride                stride / 2 (clipped)
    5     fmap_size             output height / input height
    6     macs_share            layer's share of the unpruned MACs
    7     params_share          layer's share of the unpruned parameters
    8     keep_ratio            current / original filters of this layer
    9     input_keep_ratio      the same for the prunable layer feeding it (1 if none)
    10    macs_ratio            current / unpruned MACs of the whole network
    11    acc_ratio             last measured accuracy / unpruned (clipped to 1)
    12    progress              step / T
    13-16 fused_{mean,std,min,max}  log(DSFP fused score) / 2.5 of the current filters
    17-22 {grad,taylor,kl}_{mean,std}  min-max normalised DSFP components
    23-25 {grad,taylor,kl}_share    the layer's share of the network's raw component mass
    26+k  removed_mass[k]       share of the layer's sensitivity (mean of the normalised
                                components) that pruning to grid rate k would remove now
    ====  ====================  ==========================================================

    ``state()``: all observations concatenated (agent order) plus
    ``[macs_ratio, params_ratio, acc_ratio, progress]``; ``Box(0, 1, (L * (26 + K) + 4,))``.

    Action Space
    ------------
    ``Discrete(K)``: index into ``config.rates`` (default 0.0, 0.1, ..., 0.9), the
    target pruning rate of the layer (share of its ORIGINAL filters removed). With
    ``continuous=True``: ``Box(0, max(rates), (1,), float32)``. Pruning is monotone
    within an episode: a target below the layer's current rate keeps the current one.

    Rewards
    -------
    One team reward, identical for every agent: ``r_t = J(s_{t+1}) - J(s_t)`` where
    ``J`` is :func:`objective` (``linear``: ``acc_ratio - lam * macs_ratio``;
    ``budget``: accuracy ratio with a graded penalty above a MACs target; ``amc``:
    ``-error * log(MACs)``). So an episode's return is ``J(final) - J(unpruned)``.
    Learners that sum per-agent rewards (epymarl) see ``L`` times this; learners
    that average them (BenchMARL) see it as is.

    Starting State
    --------------
    ``reset`` always returns the unpruned network; its scores and accuracy are
    computed once per env and reused.

    Episode End
    -----------
    After ``T`` steps every agent is *terminated* (the plan is final); ``agents``
    becomes empty. ``infos`` carry ``acc`` (percent on the validation subset),
    ``acc_ratio``, ``macs_ratio``, ``params_ratio``, ``macs``, ``params``,
    ``objective``, ``rate`` (this layer's current rate) and ``plan`` (kept filter
    indices per layer): deterministic values only.

    Arguments
    ---------
    ``model``: a trained ``nn.Module`` (never modified) or a checkpoint path;
    ``splits``: :class:`pruning_env.core.data.Splits` (calibration from ``train``,
    rewards from ``val``; ``test`` is never touched); ``config``: :class:`EnvConfig`
    (or its fields as keyword arguments); ``max_cycles``: alias of
    ``episode_length`` (what ``pettingzoo.make`` passes); ``device``.

    Version History
    ---------------
    * v0: initial release.
    """

    metadata = {"name": "filter_pruning_v0", "render_modes": ["ansi", "human"], "is_parallelizable": True}

    def __init__(
        self,
        model: nn.Module | str | Path,
        splits: Splits,
        config: EnvConfig | None = None,
        *,
        max_cycles: int | None = None,
        device: str | torch.device = "cpu",
        render_mode: str | None = None,
        **overrides: Any,
    ) -> None:
        cfg = replace(config or EnvConfig(), **overrides)
        if max_cycles is not None:
            cfg = replace(cfg, episode_length=int(max_cycles))
        self.config = cfg = _validated(cfg)
        if render_mode not in (None, "ansi", "human"):
            raise ValueError(f"render_mode must be None, 'ansi' or 'human', got {render_mode!r}")
        self.render_mode = render_mode
        self.device = torch.device(device)
        if isinstance(model, (str, Path)):
            model = ckpt.load(model, map_location=self.device).model
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or a checkpoint path, got {type(model).__name__}")
        if not isinstance(splits, Splits):
            raise TypeError("splits must be a pruning_env.core.data.Splits (e.g. from pruning_env.core.data.load_splits)")
        self.splits = splits
        self.input_shape = splits.input_shape
        self._base = model.to(self.device).eval()  # never modified: every network is a new pruned copy
        self._layers = prunable_layers(self._base, self.input_shape)
        if not self._layers:
            raise ValueError("the model has no prunable conv layer (see pruning_env.engine.graph for the policy)")
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
        self._macs_model = MacsModel.from_model(self._base, self.input_shape)

        # Fixed calibration batch (train split) and reward subset (validation split).
        calib = splits.train.subset(cfg.calib_size)
        mean = torch.tensor(splits.mean).view(1, -1, 1, 1) * 255.0
        std = torch.tensor(splits.std).view(1, -1, 1, 1) * 255.0
        self._calib_x = ((calib.images.float() - mean) / std).to(self.device)
        self._calib_y = calib.labels.to(self.device)

        self._cache: OrderedDict[bytes, _Measured] = OrderedDict()
        self.num_evaluations = 0  # plans measured (cache misses): the budget unit of a search
        # Seconds spent per phase of plan measurement (for benchmarks/env_step.py; never in infos).
        self.timings: dict[str, float] = {}
        full = self._full_plan()
        self._base_macs, self._base_params = self._macs_model.predict(self._keep_counts(full))
        self._static = self._static_features()
        self._base_kl: dict[str, torch.Tensor] | None = None
        base = self._measure(full)
        self.baseline_acc = base.acc
        self._obs_dim = len(OBSERVATION_FEATURES) + len(self._rates)
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
            for space in (*self.action_spaces.values(), *self.observation_spaces.values()):
                space.seed(int(self._np_random.integers(2**31)))
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
        j_before = self._objective(before)
        keep = {}
        for i, name in enumerate(self._names):
            current = self._plan.indices(name)
            n_keep = self._n_keep(i, targets[i])
            if n_keep >= len(current):
                keep[name] = current  # monotone: never grow back
            else:
                order = before.scores[name]  # of the current filters, low = prune first
                survivors = torch.sort(torch.argsort(order, stable=True)[len(current) - n_keep:]).values
                keep[name] = current[survivors]
        self._plan = PruningPlan(keep, self._widths)
        after = self._measure(self._plan)
        self._step += 1
        reward = self._objective(after) - j_before
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
        glob = np.array(
            [measured.macs / self._base_macs, measured.params / self._base_params,
             min(1.0, measured.acc / max(self.baseline_acc, 1e-9)), self._step / self.config.episode_length],
            dtype=np.float32,
        )
        return np.clip(np.concatenate([obs.reshape(-1), glob]), 0.0, 1.0).astype(np.float32)

    def render(self) -> str | None:
        """A text table of per-layer rates and kept filters, MACs and the last reward."""
        measured = self._measure(self._plan)
        lines = [f"step {self._step}/{self.config.episode_length}  acc {measured.acc:.2f}% "
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

    def pruned_model(self) -> nn.Module:
        """A new, physically pruned copy of the current network (BN recalibrated as in the env)."""
        model = apply(self._base, self._plan, self.input_shape, layers=self._layers)
        self._recalibrate(model)
        return model

    def measured_plans(self) -> list[dict[str, Any]]:
        """Every plan measured and still cached, oldest first: its summary (as in ``infos``), ``plan``
        (a :class:`PruningPlan`) and ``key`` (``plan.key()``)."""
        return [{**self._summary(m), "plan": m.plan, "key": key} for key, m in self._cache.items()]

    def evaluate_plan(self, plan: PruningPlan) -> dict[str, float]:
        """Accuracy, MACs and objective of any plan (cached like env steps)."""
        m = self._measure(plan)
        return self._summary(m)

    # ------------------------------------------------------------------ internals

    def _full_plan(self) -> PruningPlan:
        return PruningPlan.full(self._layers)

    def _keep_counts(self, plan: PruningPlan) -> dict[str, int]:
        return {n: len(plan.keep[n]) for n in self._names}

    def _n_keep(self, i: int, rate: float) -> int:
        c = int(self._orig[i])
        n = int(round((1.0 - rate) * c))
        r = self.config.round_to
        if r > 1:
            n = min(c, int(math.ceil(n / r) * r))
        return max(min(self.config.min_keep, c), n)

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

    def _objective(self, m: _Measured) -> float:
        return objective(self.config, m.acc / max(self.baseline_acc, 1e-9), m.macs / self._base_macs, m.acc, m.macs)

    def _summary(self, m: _Measured) -> dict[str, float]:
        return {
            "acc": m.acc,
            "acc_ratio": m.acc / max(self.baseline_acc, 1e-9),
            "macs_ratio": m.macs / self._base_macs,
            "params_ratio": m.params / self._base_params,
            "macs": int(m.macs),
            "params": int(m.params),
            "objective": self._objective(m),
        }

    def _recalibrate(self, model: nn.Module) -> None:
        if self.config.bn_recal_batches > 0:
            recalibrate_bn(model, self.splits, n_batches=self.config.bn_recal_batches,
                           batch_size=self.config.bn_recal_batch_size, seed=0, device=self.device)

    def _measure(self, plan: PruningPlan) -> _Measured:
        """Accuracy, MACs and next-step scores of ``plan``'s network, cached by plan."""
        key = plan.key()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        cfg = self.config
        clock = time.perf_counter
        t0 = clock()
        macs, params = self._macs_model.predict(self._keep_counts(plan))
        is_base = all(len(plan.keep[n]) == c for n, c in zip(self._names, self._orig))
        model = self._base if is_base else apply(self._base, plan, self.input_shape, layers=self._layers)
        t1 = clock()
        if not is_base:
            self._recalibrate(model)
        t2 = clock()
        acc = evaluate(model, self.splits.val, mean=self.splits.mean, std=self.splits.std,
                       batch_size=cfg.eval_batch_size, device=self.device, limit=cfg.eval_size)
        t3 = clock()
        scores, features = self._score(model, plan, is_base)
        t4 = clock()
        for phase, seconds in (("surgery", t1 - t0), ("bn_recal", t2 - t1), ("evaluation", t3 - t2),
                               ("scoring", t4 - t3)):
            self.timings[phase] = self.timings.get(phase, 0.0) + seconds
        measured = _Measured(acc=acc, macs=int(macs), params=int(params), scores=scores, features=features,
                             plan=plan)
        self.num_evaluations += 1
        self._cache[key] = measured
        if len(self._cache) > cfg.cache_size:
            self._cache.popitem(last=False)
        return measured

    def _score(self, model: nn.Module, plan: PruningPlan, is_base: bool) -> tuple[dict, np.ndarray]:
        """Per-layer pruning order of the current filters and the DSFP observation features."""
        cfg = self.config
        names = self._names
        if self._base_kl is None:
            self._base_kl = compute_components(self._base, self._calib_x, self._calib_y, layers=names,
                                               kl=cfg.kl).kl
        if cfg.dynamic or is_base or cfg.kl_per_step:
            comp = compute_components(model, self._calib_x, self._calib_y, layers=names,
                                      kl=cfg.kl_per_step if (cfg.kl_per_step and not is_base) else None)
            grad, taylor = comp.grad, comp.taylor
            kl = comp.kl if comp.kl is not None else {n: self._base_kl[n][plan.indices(n)] for n in names}
        else:  # static sensitivity: the unpruned network's scores of the surviving filters
            grad = {n: self._base_components["grad"][n][plan.indices(n)] for n in names}
            taylor = {n: self._base_components["taylor"][n][plan.indices(n)] for n in names}
            kl = {n: self._base_kl[n][plan.indices(n)] for n in names}
        if is_base:
            self._base_components = {"grad": grad, "taylor": taylor}
        fused = fuse(grad, taylor, kl)
        if cfg.criterion == "dsfp":
            order = fused if cfg.direction == "low" else {n: -v for n, v in fused.items()}
        else:
            order = score(model, self._calib_x, self._calib_y, cfg.criterion, layers=names,
                          **({"seed": 0} if cfg.criterion == "random" else {}))
        return order, self._dsfp_features(grad, taylor, kl, fused, order)

    def _dsfp_features(self, grad, taylor, kl, fused, order) -> np.ndarray:
        rows = []
        mass = {c: sum(float(d[n].sum()) for n in self._names) or 1.0
                for c, d in (("g", grad), ("t", taylor), ("k", kl))}
        for i, n in enumerate(self._names):
            comps = [minmax(d[n].double()) for d in (grad, taylor, kl)]
            log_f = torch.log(fused[n].double()) / _LOG_FUSED_MAX
            sens = (comps[0] + comps[1] + comps[2]) / 3.0
            total = float(sens.sum())
            ranked = sens[torch.argsort(order[n], stable=True)]
            cum = torch.cat([torch.zeros(1, dtype=ranked.dtype), torch.cumsum(ranked, 0)])
            current = len(ranked)
            removed = []
            for rate in self._rates:
                n_prune = max(0, current - self._n_keep(i, float(rate)))
                removed.append(float(cum[n_prune]) / total if total > 0 else n_prune / max(current, 1))
            rows.append([
                float(log_f.mean()), _std(log_f), float(log_f.min()), float(log_f.max()),
                *[v for c in comps for v in (float(c.mean()), _std(c))],
                float(grad[n].sum()) / mass["g"], float(taylor[n].sum()) / mass["t"], float(kl[n].sum()) / mass["k"],
                *removed,
            ])
        return np.clip(np.asarray(rows, dtype=np.float32), 0.0, 1.0)

    def _static_features(self) -> np.ndarray:
        report = count(self._base, self.input_shape)
        per_macs, per_params = report.per_layer_macs, report.per_layer_params
        widest = max(max(layer.in_channels, layer.out_channels) for layer in self._layers)
        n = len(self._layers)
        rows = []
        for i, layer in enumerate(self._layers):
            kh, kw = layer.kernel_size
            rows.append([
                i / max(n - 1, 1), layer.in_channels / widest, layer.out_channels / widest, min(1.0, kh * kw / 25),
                min(1.0, layer.stride[0] / 2), layer.out_hw[0] / self.input_shape[1],
                per_macs[layer.name] / self._base_macs, per_params[layer.name] / self._base_params,
            ])
        return np.clip(np.asarray(rows, dtype=np.float32), 0.0, 1.0)

    def _observation_matrix(self, m: _Measured) -> np.ndarray:
        keep = np.array([len(self._plan.keep[n]) for n in self._names]) / self._orig
        input_keep = np.array([keep[j] if j >= 0 else 1.0 for j in self._input_layer])
        dyn = np.stack([
            keep, input_keep, np.full(len(keep), m.macs / self._base_macs),
            np.full(len(keep), min(1.0, m.acc / max(self.baseline_acc, 1e-9))),
            np.full(len(keep), self._step / self.config.episode_length),
        ], axis=1)
        mat = np.concatenate([self._static, dyn.astype(np.float32), m.features], axis=1)
        return np.clip(mat, 0.0, 1.0).astype(np.float32)

    def _observations(self, m: _Measured) -> dict[str, np.ndarray]:
        mat = self._observation_matrix(m)
        return {a: mat[self._agent_index[a]] for a in self.possible_agents}

    def _infos(self, m: _Measured) -> dict[str, dict[str, Any]]:
        summary = self._summary(m)
        plan = self._plan.to_dict()
        return {a: {**summary, "rate": 1.0 - len(self._plan.keep[self._names[i]]) / float(self._orig[i]),
                    "plan": plan}
                for i, a in enumerate(self.possible_agents)}


def _std(x: torch.Tensor) -> float:
    return float(x.std(unbiased=False)) if x.numel() > 1 else 0.0


def _validated(cfg: EnvConfig) -> EnvConfig:
    rates = tuple(float(r) for r in cfg.rates)
    if not rates or any(not (0.0 <= r < 1.0) for r in rates) or len(set(rates)) != len(rates):
        raise ValueError(f"rates must be distinct pruning rates in [0, 1), got {cfg.rates!r}")
    if cfg.episode_length < 1:
        raise ValueError(f"episode_length / max_cycles must be >= 1, got {cfg.episode_length}")
    if cfg.reward not in REWARD_MODES:
        raise ValueError(f"reward must be one of {REWARD_MODES}, got {cfg.reward!r}")
    if cfg.reward == "budget" and not 0.0 < cfg.macs_target <= 1.0:
        raise ValueError(f"macs_target must be a MACs ratio in (0, 1], got {cfg.macs_target}")
    if cfg.criterion not in list_criteria():
        raise ValueError(f"unknown criterion {cfg.criterion!r}; choose one of {', '.join(list_criteria())}")
    if cfg.direction not in ("low", "high"):
        raise ValueError(f"direction must be 'low' or 'high', got {cfg.direction!r}")
    for name in ("calib_size", "eval_size", "eval_batch_size", "min_keep", "round_to", "cache_size",
                 "bn_recal_batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    return replace(cfg, rates=rates)


def config_dict(cfg: EnvConfig) -> dict[str, Any]:
    """The config as a JSON-friendly dict."""
    d = asdict(cfg)
    d["rates"] = list(d["rates"])
    return d
