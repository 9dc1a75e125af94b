"""The Algorithm plug-in contract: registry, one-episode API, exact resume, determinism."""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from pettingzoo import ParallelEnv

import agents.base as base
from agents import (
    Algorithm,
    EpisodeLog,
    MatrixGameEnv,
    QMIXConfig,
    list_algorithms,
    make_algorithm,
    register,
    register_mixer,
)
from agents.qmix import Mixer



class ToySequentialEnv(gym.Env):
    """AMC-style sequential view for tests: one layer per step, keep ratio in [0, 1].

    Observation: (step / n_layers, previous action, 1 - step / n_layers). Reward 0 until
    the last layer, then ``-mean((a_t - target_t)^2)`` with fixed per-layer targets.
    """

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.targets = np.linspace(0.2, 0.8, n_layers)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (3,), np.float32)
        self.action_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)

    def _obs(self, prev: float) -> np.ndarray:
        frac = self.t / self.n_layers
        return np.array([frac, prev, 1.0 - frac], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t, self.actions = 0, []
        return self._obs(0.0), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        assert self.action_space.contains(action), action
        self.actions.append(float(action[0]))
        self.t += 1
        done = self.t == self.n_layers
        reward = -float(np.mean((np.array(self.actions) - self.targets) ** 2)) if done else 0.0
        return self._obs(float(action[0])), reward, done, False, {"plan": list(self.actions)} if done else {}


def toy_sequential(env: ParallelEnv) -> ToySequentialEnv:
    return ToySequentialEnv(len(env.possible_agents))


ALL = ["qmix", "vdn", "iql", "amc", "random", "dsfp-uniform"]
SMALL: dict[str, dict[str, Any]] = {
    "qmix": dict(learning_starts=2, batch_size=4, updates_per_episode=2, eps_anneal_steps=20, target_update_interval=3),
    "qmix-variant": dict(
        agent_net="gru", td_lambda=0.6, optimizer="rmsprop", target_tau=0.05,
        learning_starts=2, batch_size=4, updates_per_episode=2, eps_anneal_steps=20, buffer_size=5,
    ),
    "vdn": dict(learning_starts=2, batch_size=4, eps_anneal_steps=20),
    "iql": dict(learning_starts=2, batch_size=4, eps_anneal_steps=20),
    "amc": dict(
        warmup_episodes=2, batch_size=8, actor_hidden=(32, 32), critic_hidden=(32, 32),
        buffer_size=20, make_sequential_env=toy_sequential,
    ),
    "random": {},
    "dsfp-uniform": {},
}
CASES = ALL + ["qmix-variant"]


def build(case: str, seed: int = 0) -> Algorithm:
    env = MatrixGameEnv(n_agents=3, n_actions=4, n_steps=3)
    return make_algorithm(case.removesuffix("-variant"), env, seed=seed, **SMALL[case])


def as_plain(log: EpisodeLog) -> dict[str, Any]:
    return dataclasses.asdict(log)


def run(algo: Algorithm, n: int) -> list[dict[str, Any]]:
    logs = [as_plain(algo.train_episode()) for _ in range(n)]
    return logs + [as_plain(algo.evaluate())]


def test_registry_lists_all_and_rejects_unknown_names() -> None:
    assert set(ALL) <= set(list_algorithms())
    with pytest.raises(ValueError, match=r"unknown algorithm 'qmixx'.*known: .*dsfp-uniform.*qmix"):
        make_algorithm("qmixx", MatrixGameEnv(), seed=0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['learning_rate'\].*config fields"):
        make_algorithm("qmix", MatrixGameEnv(), seed=0, learning_rate=1e-3)
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        make_algorithm("qmix", MatrixGameEnv(), seed=0, mixer="nope")
    assert isinstance(make_algorithm("agents.baselines:random", MatrixGameEnv(), seed=0), Algorithm)
    assert make_algorithm("vdn", MatrixGameEnv(), seed=0).config.mixer == "vdn"
    assert make_algorithm("qmix", MatrixGameEnv(), seed=0, config=QMIXConfig(lr=0.1), gamma=0.5).config.lr == 0.1


def test_plugins_in_one_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new algorithm and a new mixer plug in by decorator and run by name."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    import agents.qmix as qmix

    monkeypatch.setattr(qmix, "_MIXERS", dict(qmix._MIXERS))

    @dataclasses.dataclass
    class AlwaysConfig:
        action: int = 1
        """Action every agent takes."""

    @register("always")
    class Always(Algorithm):
        config_cls = AlwaysConfig

        def train_episode(self) -> EpisodeLog:
            log, _ = self.play_episode(lambda obs, infos: {a: self.config.action for a in obs})
            self.episodes_done += 1
            return log

        def evaluate(self) -> EpisodeLog:
            return self.play_episode(lambda obs, infos: {a: self.config.action for a in obs})[0]

        def state_dict(self) -> dict:
            return super().state_dict()

        def load_state_dict(self, d: dict) -> None:
            super().load_state_dict(d)

    @register_mixer("max")
    class MaxMixer(Mixer):
        def forward(self, agent_qs: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
            return agent_qs.max(dim=-1, keepdim=True).values

    log = make_algorithm("always", MatrixGameEnv(), seed=0, action=2).train_episode()
    assert log.episode_return == 9.0 and log.actions == [{"agent_0": 2, "agent_1": 2}]
    algo = make_algorithm("qmix", MatrixGameEnv(), seed=0, mixer="max", **SMALL["qmix"])
    assert isinstance(algo.mixer, MaxMixer)
    assert all(math.isfinite(algo.train_episode().episode_return) for _ in range(4))
    assert algo.gradient_steps > 0


@pytest.mark.parametrize("case", CASES)
def test_train_and_evaluate_one_episode_each(case: str) -> None:
    algo = build(case)
    for i in range(4):
        log = algo.train_episode()
        assert isinstance(log, EpisodeLog)
        assert log.length == 3 and len(log.actions) == 3
        if case == "amc":  # one layer (agent) per step
            assert [set(step) for step in log.actions] == [{"agent_0"}, {"agent_1"}, {"agent_2"}]
        else:
            assert all(set(step) == {"agent_0", "agent_1", "agent_2"} for step in log.actions)
        assert all(math.isfinite(v) for v in log.metrics.values())
        assert algo.episodes_done == i + 1
    assert algo.env_steps == 12
    ev = algo.evaluate()
    assert algo.episodes_done == 4 and ev.length == 3
    if case == "amc":
        assert ev.final_info["plan"] == pytest.approx([step[f"agent_{t}"] for t, step in enumerate(ev.actions)])
        assert all(0.0 <= v <= 1.0 for step in ev.actions for v in step.values())
        assert "critic_loss" in log.metrics and "actor_loss" in log.metrics
    else:
        assert set(ev.final_info) == {"joint_action", "payoff"}
        assert all(isinstance(v, int) and 0 <= v < 4 for step in ev.actions for v in step.values())
    if case.startswith(("qmix", "vdn", "iql")):
        assert "td_loss" in log.metrics and "epsilon" in log.metrics


@pytest.mark.parametrize("case", CASES)
def test_state_dict_round_trip_resumes_exactly(case: str) -> None:
    first = build(case, seed=3)
    run(first, 5)
    saved = first.state_dict()
    continued = run(first, 4)  # keeps training after the snapshot: the snapshot must not change

    buf = io.BytesIO()
    torch.save(saved, buf)  # checkpoints hold only tensors and plain values
    buf.seek(0)
    restored = torch.load(buf, weights_only=True)

    fresh = build(case, seed=99)  # different seed and a new env: everything must come from the state
    fresh.load_state_dict(restored)
    assert fresh.seed == 3
    assert run(fresh, 4) == continued


@pytest.mark.parametrize("case", CASES)
def test_same_seed_same_results(case: str) -> None:
    a, b = run(build(case, seed=7), 5), run(build(case, seed=7), 5)
    assert a == b
    if case not in ("dsfp-uniform",):
        assert run(build(case, seed=8), 5) != a


def test_dsfp_uniform_sweeps_indices_and_evaluates_best() -> None:
    env = MatrixGameEnv(n_actions=4, payoff=np.diag([1.0, 5.0, 2.0, 0.0]))
    algo = make_algorithm("dsfp-uniform", env, seed=0)
    logs = [algo.train_episode() for _ in range(6)]
    assert [log.actions[0]["agent_0"] for log in logs] == [0, 1, 2, 3, 0, 1]
    assert all(len(set(log.actions[0].values())) == 1 for log in logs)
    assert algo.best_index == 1
    assert algo.evaluate().actions == [{"agent_0": 1, "agent_1": 1}]


def test_random_search_replays_best_in_evaluate() -> None:
    env = MatrixGameEnv(n_steps=2)
    algo = make_algorithm("random", env, seed=0)
    best = max((algo.train_episode() for _ in range(15)), key=lambda log: log.episode_return)
    ev = algo.evaluate()
    assert ev.episode_return == best.episode_return == algo.best_return
    assert ev.actions == best.actions
