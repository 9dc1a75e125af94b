"""No-learning baselines on the same ParallelEnv API as the learners.

* ``"random"`` - random search: in every training episode each agent samples a
  uniformly random (allowed) action at every step; ``evaluate()`` replays the best
  joint-action sequence found so far.
* ``"dsfp-uniform"`` - one pruning rate for all layers: every agent takes the SAME
  action index k at every step. Training episodes sweep the indices in order
  (``k = episode % K``); ``evaluate()`` plays the best k found so far by return.

Both need ``Discrete`` action spaces (identical ones for ``dsfp-uniform``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from pettingzoo import ParallelEnv

from agents.base import Algorithm, EpisodeLog, split_observation
from agents.registry import register

__all__ = ["DSFPUniform", "DSFPUniformConfig", "RandomSearch", "RandomSearchConfig"]


def _discrete_sizes(env: ParallelEnv) -> dict[str, int]:
    sizes = {}
    for agent in env.possible_agents:
        space = env.action_space(agent)
        if not isinstance(space, spaces.Discrete):
            raise ValueError(f"baselines need Discrete action spaces; {agent} has {space}")
        sizes[agent] = int(space.n)
    return sizes


@dataclass
class RandomSearchConfig:
    """Options of the random-search baseline."""

    replay_best_in_evaluate: bool = True
    """evaluate() replays the best joint-action sequence seen so far (False: a fresh random episode)."""


@register("random")
class RandomSearch(Algorithm):
    """Random search: uniform random actions for every agent at every step, keep the best episode."""

    config_cls = RandomSearchConfig

    def __init__(
        self,
        env: ParallelEnv,
        config: RandomSearchConfig | None = None,
        *,
        seed: int,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(env, config, seed=seed, device=device)
        self.n_actions = _discrete_sizes(env)
        self.best_return = -np.inf
        self.best_actions: list[dict[str, int]] = []

    def _random_policy(self, obs: dict[str, Any], infos: dict[str, dict]) -> dict[str, int]:
        actions = {}
        for agent in obs:
            _, mask = split_observation(obs[agent], infos.get(agent))
            allowed = np.arange(self.n_actions[agent]) if mask is None else np.flatnonzero(mask)
            actions[agent] = int(self.rngs.np.choice(allowed))
        return actions

    def _train_episode(self) -> EpisodeLog:
        log, _ = self.play_episode(self._random_policy)
        if log.episode_return > self.best_return:
            self.best_return = log.episode_return
            self.best_actions = copy.deepcopy(log.actions)
        log.metrics["best_return"] = float(self.best_return)
        return log

    def upcoming_actions(self, episodes: int, steps: int) -> list[list[dict[str, int]]]:
        """The next training episodes' random actions, drawn from a copy of the generator (no action masks:
        with masks the actions depend on observations, and nothing is promised)."""
        rng = copy.deepcopy(self.rngs.np)
        agents = list(self.env.possible_agents)
        return [[{a: int(rng.choice(np.arange(self.n_actions[a]))) for a in agents} for _ in range(steps)]
                for _ in range(episodes)]

    def evaluate(self) -> EpisodeLog:
        if not (self.config.replay_best_in_evaluate and self.best_actions):
            return self.play_episode(self._random_policy)[0]
        plan = self.best_actions
        step = 0

        def replay(obs: dict[str, Any], infos: dict[str, dict]) -> dict[str, int]:
            nonlocal step
            # Episodes longer than the recorded one repeat its last joint action.
            joint = plan[min(step, len(plan) - 1)]
            step += 1
            return {agent: joint[agent] for agent in obs}

        return self.play_episode(replay)[0]

    def state_dict(self) -> dict[str, Any]:
        d = super().state_dict()
        d.update(best_return=float(self.best_return), best_actions=copy.deepcopy(self.best_actions))
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        super().load_state_dict(d)
        self.best_return = float(d["best_return"])
        self.best_actions = copy.deepcopy(d["best_actions"])


@dataclass
class DSFPUniformConfig:
    """The uniform-rate baseline has no hyper-parameters: it sweeps every action index."""


@register("dsfp-uniform")
class DSFPUniform(Algorithm):
    """One action index (= one pruning rate) for every agent and step; sweep the indices, keep the best."""

    config_cls = DSFPUniformConfig

    def __init__(
        self,
        env: ParallelEnv,
        config: DSFPUniformConfig | None = None,
        *,
        seed: int,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(env, config, seed=seed, device=device)
        sizes = set(_discrete_sizes(env).values())
        if len(sizes) != 1:
            raise ValueError("dsfp-uniform needs the same number of actions for every agent")
        self.n_actions = sizes.pop()
        self.best_return_by_index: dict[int, float] = {}

    @property
    def best_index(self) -> int:
        """Action index with the best return so far (lowest index on ties; 0 before any episode)."""
        if not self.best_return_by_index:
            return 0
        return max(sorted(self.best_return_by_index), key=lambda k: self.best_return_by_index[k])

    def _play_index(self, k: int) -> EpisodeLog:
        log, _ = self.play_episode(lambda obs, infos: {agent: k for agent in obs})
        log.metrics["uniform_index"] = float(k)
        return log

    def _train_episode(self) -> EpisodeLog:
        k = self.episodes_done % self.n_actions
        log = self._play_index(k)
        self.best_return_by_index[k] = max(log.episode_return, self.best_return_by_index.get(k, -np.inf))
        log.metrics["best_return"] = float(max(self.best_return_by_index.values()))
        return log

    def upcoming_actions(self, episodes: int, steps: int) -> list[list[dict[str, int]]]:
        """The sweep's next episodes: index ``(episodes_done + i) % K`` for every agent at every step."""
        agents = list(self.env.possible_agents)
        return [[{a: (self.episodes_done + i) % self.n_actions for a in agents}] * steps for i in range(episodes)]

    def evaluate(self) -> EpisodeLog:
        return self._play_index(self.best_index)

    def state_dict(self) -> dict[str, Any]:
        d = super().state_dict()
        d["best_return_by_index"] = dict(self.best_return_by_index)
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        super().load_state_dict(d)
        self.best_return_by_index = {int(k): float(v) for k, v in d["best_return_by_index"].items()}
