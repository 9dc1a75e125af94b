"""Single-agent Gymnasium views of :class:`~pruning_env.envs.env.FilterPruningEnv`.

Both views wrap the same multi-agent env, so single-agent algorithms are
compared with multi-agent ones on exactly the same problem (same plans, same
rewards, same evaluation budget accounting via ``env.num_evaluations``).

* :class:`JointPruningEnv`: one joint action for all layers per step
  (``MultiDiscrete([K] * L)``, or ``Box(0, max_rate, (L,))`` for a continuous env);
  observation = the global ``state()``; reward = the team reward.
* :class:`SequentialPruningEnv`: AMC-style (He et al. 2018): one layer per step,
  a continuous keep ratio in [0, 1] as action, AMC's per-layer state. After the
  last layer's decision the multi-agent env takes its step; that step's team
  reward is returned then (0 on the other steps), so the return is the same as
  the multi-agent episode's.
* :class:`SequentialDiscretePruningEnv`: the same AMC-style walk with a ``Discrete(K)``
  action, the index into the env's rate grid (``config.rates``), for DQN-style learners.

Infos: every view returns the multi-agent env's infos of ``layer_0`` (fixed-shape floats,
the same keys at reset and every step); the sequential views repeat the last measured ones
on the steps inside a pass over the layers. The plan is ``view.env.plan``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium
import numpy as np
from gymnasium import spaces

from pruning_env.envs.env import FilterPruningEnv
from pruning_env.envs.features import assemble

__all__ = ["AMC_FEATURES", "JointPruningEnv", "SequentialDiscretePruningEnv", "SequentialPruningEnv"]

AMC_FEATURES = (
    "layer_index",  # i / (L - 1)
    "in_channels",  # original input channels / widest layer
    "out_channels",  # original filters / widest layer
    "stride",  # stride / 2
    "kernel_area",  # k_h * k_w / 25
    "fmap_size",  # output height / input height
    "layer_macs",  # the layer's share of the unpruned MACs
    "reduced_macs",  # share of the unpruned MACs removed by the decisions taken so far in this pass
    "rest_macs",  # share of the unpruned MACs in the layers after this one
    "previous_action",  # the keep ratio chosen for the previous layer (1 for the first)
    "progress",  # multi-agent step / T
)


class JointPruningEnv(gymnasium.Env):
    """All layers' rates as one action; observation = ``state()`` of the multi-agent env."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"]}

    def __init__(self, env: FilterPruningEnv) -> None:
        self.env = env
        self.render_mode = "ansi"
        n = len(env.possible_agents)
        space = env.action_space(env.possible_agents[0])
        if isinstance(space, spaces.Discrete):
            self.action_space = spaces.MultiDiscrete([int(space.n)] * n)
        else:
            self.action_space = spaces.Box(0.0, float(space.high[0]), (n,), np.float32)
        self.observation_space = env.state_space

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        _, infos = self.env.reset(seed=seed, options=options)
        return self.env.state(), infos[self.env.possible_agents[0]]

    def step(self, action):
        agents = self.env.possible_agents
        arr = np.asarray(action)
        if arr.shape != self.action_space.shape:
            raise ValueError(f"joint action must have shape {self.action_space.shape}, got {arr.shape}")
        if isinstance(self.action_space, spaces.MultiDiscrete):
            actions = {a: int(arr[i]) for i, a in enumerate(agents)}
        else:
            actions = {a: arr[i : i + 1].astype(np.float32) for i, a in enumerate(agents)}
        _, rewards, terms, truncs, infos = self.env.step(actions)
        a0 = agents[0]
        return self.env.state(), rewards[a0], terms[a0], truncs[a0], infos[a0]

    def render(self) -> str | None:
        return self.env.render()


class SequentialPruningEnv(gymnasium.Env):
    """AMC-style view: one layer per step, action = keep ratio in [0, 1].

    A keep ratio ``a`` means target pruning rate ``1 - a``, clipped to the env's
    largest rate; for a discrete env it snaps to the nearest rate of the grid.
    Observation: ``Box(0, 1, (11,))`` with the features of :data:`AMC_FEATURES`.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"]}

    def __init__(self, env: FilterPruningEnv) -> None:
        self.env = env
        self.render_mode = "ansi"
        self.action_space = spaces.Box(0.0, 1.0, (1,), np.float32)
        self.observation_space = spaces.Box(0.0, 1.0, (len(AMC_FEATURES),), np.float32)
        self._n = len(env.possible_agents)
        self.possible_agents = list(env.possible_agents)  # the layer deciding at step t is possible_agents[t % L]
        self._discrete = isinstance(env.action_space(env.possible_agents[0]), spaces.Discrete)
        self._rates = np.asarray(env.config.rates)
        static = env.static_features
        # The static part of AMC's state, per layer, by AMC feature name (from the env's static features).
        self._static = {"layer_index": static["depth"], **{k: static[k] for k in ("in_channels", "out_channels",
                                                                                 "stride", "kernel_area",
                                                                                 "fmap_size")}}
        self._layer_macs = static["macs_share"].astype(np.float64)
        self._rest = np.array([self._layer_macs[i + 1 :].sum() for i in range(self._n)])
        self._pending: dict[str, Any] = {}
        self._layer = 0
        self._prev = 1.0
        self._reduced = 0.0
        self._info: dict[str, float] = {}
        self._done = True

    def _obs(self) -> np.ndarray:
        i = self._layer
        feats = {**{k: v[i] for k, v in self._static.items()}, "layer_macs": self._layer_macs[i],
                 "reduced_macs": self._reduced, "rest_macs": self._rest[i], "previous_action": self._prev,
                 "progress": self.env.current_step / self.env.config.episode_length}
        return assemble({k: np.array([v]) for k, v in feats.items()}, AMC_FEATURES)[0]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        _, infos = self.env.reset(seed=seed, options=options)
        self._pending, self._layer, self._prev, self._reduced, self._done = {}, 0, 1.0, 0.0, False
        self._info = dict(infos[self.env.possible_agents[0]])
        return self._obs(), dict(self._info)

    def step(self, action):
        if self._done:
            raise RuntimeError("the episode is over; call reset() before step()")
        arr = np.asarray(action, dtype=np.float64).reshape(-1)
        if arr.size != 1 or not np.isfinite(arr[0]):
            raise ValueError(f"action must be one keep ratio in [0, 1], got {action!r}")
        keep = float(np.clip(arr[0], 0.0, 1.0))
        rate = min(1.0 - keep, float(self._rates.max()))
        agent = self.env.possible_agents[self._layer]
        if self._discrete:
            self._pending[agent] = int(np.argmin(np.abs(self._rates - rate)))
            rate = float(self._rates[self._pending[agent]])
        else:
            self._pending[agent] = np.array([rate], dtype=np.float32)
        name = self.env.layer_names[self._layer]
        current_rate = 1.0 - self.env.plan.keep_ratio(name)
        # MACs of a layer scale ~ with its filters: a first-order estimate of what this decision removes.
        self._reduced += self._layer_macs[self._layer] * max(0.0, rate - current_rate)
        self._prev = 1.0 - rate
        self._layer += 1
        reward, terminated = 0.0, False
        if self._layer == self._n:
            _, rewards, terms, _, infos = self.env.step(self._pending)
            a0 = self.env.possible_agents[0]
            reward, terminated, self._info = rewards[a0], terms[a0], dict(infos[a0])
            self._pending, self._layer, self._prev, self._reduced = {}, 0, 1.0, 0.0
            self._done = terminated
        return self._obs(), float(reward), bool(terminated), False, dict(self._info)

    def render(self) -> str | None:
        return self.env.render()


class SequentialDiscretePruningEnv(SequentialPruningEnv):
    """AMC-style view with ``Discrete(K)`` actions: action ``k`` sets the deciding layer's target rate to
    ``config.rates[k]`` (what the multi-agent env's agents choose), so DQN-style learners run on it.
    Observation, rewards and infos as :class:`SequentialPruningEnv`."""

    def __init__(self, env: FilterPruningEnv) -> None:
        super().__init__(env)
        self.action_space = spaces.Discrete(len(self._rates))

    def step(self, action):
        arr, k = np.asarray(action), len(self._rates)
        if arr.size != 1 or not np.issubdtype(arr.dtype, np.integer) or not 0 <= int(arr.reshape(())) < k:
            raise ValueError(f"action must be an int in [0, {k - 1}] (a rate index), got {action!r}")
        return super().step(np.array([1.0 - float(self._rates[int(arr.reshape(()))])]))
