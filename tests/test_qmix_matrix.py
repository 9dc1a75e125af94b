"""QMIX/VDN/IQL learn the cooperative matrix game; the game obeys the PettingZoo contracts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pettingzoo.test import api_test, parallel_api_test, state_test
from pettingzoo.utils.conversions import parallel_to_aec

from agents import MatrixGameEnv, make_algorithm
from agents.qmix import lambda_returns


# Two-step episodes so that targets bootstrap once (step 0) and stop at termination (step 1).
SHORT_RUN = dict(eps_anneal_steps=200, updates_per_episode=2, target_update_interval=10)
TRAIN_EPISODES = 120  # all 10 (mixer, seed) runs already succeed after 60


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", ["qmix", "vdn"])
def test_greedy_joint_action_reaches_optimum(name: str, seed: int) -> None:
    env = MatrixGameEnv(n_steps=2)
    algo = make_algorithm(name, env, seed=seed, **SHORT_RUN)
    for _ in range(TRAIN_EPISODES):
        log = algo.train_episode()
    assert math.isfinite(log.metrics["td_loss"])
    greedy = algo.evaluate()
    optimum = dict(zip(env.possible_agents, env.optimal_joint_action))
    assert greedy.actions == [optimum, optimum]
    assert greedy.episode_return == pytest.approx(env.optimal_return)
    assert greedy.final_info["joint_action"] == list(env.optimal_joint_action)


def test_iql_runs_and_learns_something() -> None:
    env = MatrixGameEnv(n_steps=2)
    algo = make_algorithm("iql", env, seed=0, **SHORT_RUN)
    losses = [algo.train_episode().metrics.get("td_loss") for _ in range(40)]
    assert algo.config.mixer == "none"
    assert all(math.isfinite(x) for x in losses if x is not None)
    assert algo.gradient_steps > 0
    assert algo.evaluate().length == 2


@pytest.mark.parametrize("end_by, expected", [("termination", [0.0, 1.0]), ("truncation", [0.0, 0.0])])
def test_buffer_marks_termination_not_truncation(end_by: str, expected: list[float]) -> None:
    env = MatrixGameEnv(n_steps=2, end_by=end_by)
    algo = make_algorithm("qmix", env, seed=0, learning_starts=100)
    algo.train_episode()
    episode = algo.buffer.episodes[-1]
    assert episode["terminated"].tolist() == expected
    assert episode["obs"].shape == (3, 2, 3) and episode["state"].shape == (3, 3)
    assert episode["actions"].shape == (2, 2) and episode["avail"].all()


def test_lambda_returns_by_hand() -> None:
    gamma, lam = 0.5, 0.5
    reward = torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 3.0]])  # episode 0 has 2 steps (padded)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    terminated = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # episode 1 is truncated after 3
    next_values = torch.tensor([[10.0, 20.0, 99.0], [10.0, 20.0, 30.0]]).unsqueeze(-1)

    one_step = lambda_returns(reward, terminated, mask, next_values, gamma, 0.0).squeeze(-1)
    assert one_step[0, :2].tolist() == [1 + 0.5 * 10, 2.0]          # no bootstrap at termination
    assert one_step[1].tolist() == [1 + 0.5 * 10, 2 + 0.5 * 20, 3 + 0.5 * 30]  # truncation bootstraps

    ret = lambda_returns(reward, terminated, mask, next_values, gamma, lam).squeeze(-1)
    g1 = 2.0
    assert ret[0, 1].item() == pytest.approx(g1)
    assert ret[0, 0].item() == pytest.approx(1 + gamma * ((1 - lam) * 10 + lam * g1))
    h2 = 3 + gamma * 30
    h1 = 2 + gamma * ((1 - lam) * 20 + lam * h2)
    assert ret[1, 2].item() == pytest.approx(h2)
    assert ret[1, 1].item() == pytest.approx(h1)
    assert ret[1, 0].item() == pytest.approx(1 + gamma * ((1 - lam) * 10 + lam * h1))


def test_matrix_game_pettingzoo_contracts() -> None:
    parallel_api_test(MatrixGameEnv(n_steps=3), num_cycles=10)
    parallel_api_test(MatrixGameEnv(n_agents=3, n_actions=2, end_by="truncation"), num_cycles=10)
    api_test(parallel_to_aec(MatrixGameEnv(n_steps=2)), num_cycles=10)
    state_test(parallel_to_aec(MatrixGameEnv(n_steps=2)), MatrixGameEnv(n_steps=2))
    env = MatrixGameEnv()
    assert env.observation_space("agent_0") is env.observation_space("agent_0")
    assert env.action_space("agent_1") is env.action_spaces["agent_1"]
    assert env.optimal_joint_action == (2, 2) and env.optimal_return == 9.0
    assert np.array_equal(env.payoff, [[1, 2, 3], [2, 4, 6], [3, 6, 9]])
