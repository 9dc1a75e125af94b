"""QMIX/VDN/IQL on cooperative matrix games: they learn, and only QMIX coordinates.

* The repeated monotonic game (``MatrixGameEnv``'s default payoff, every agent's payoff
  increasing in its own action): per-agent greedy play solves it, so QMIX, VDN and IQL
  must all go from a non-optimal greedy joint action at initialisation to the optimum.
  That tests learning, not coordination.
* The two-step game of the QMIX paper (``TwoStepGameEnv``): the first step picks a matrix
  (2A: 7 everywhere; 2B: 8 only if both agents pick action 1). Under uniform exploration
  only a learner that represents 2B's non-additive joint value sees that 2B is worth 8:
  QMIX picks 2B (return 8), VDN and IQL pick 2A (return 7), on every seed tried.
* The games themselves obey PettingZoo's contracts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pettingzoo.test import api_test, parallel_api_test, state_test
from pettingzoo.utils.conversions import parallel_to_aec

from agents import Algorithm, make_algorithm
from agents.qmix import lambda_returns
from tests.matrix_game import MatrixGameEnv, TwoStepGameEnv

# Two-step episodes so that targets bootstrap once (step 0) and stop at termination (step 1).
SHORT_RUN = dict(eps_anneal_steps=200, updates_per_episode=2, target_update_interval=10)
TRAIN_EPISODES = 120  # the 10 QMIX/VDN runs and IQL's seeds 0-2 already succeed after 60


def greedy_return(algo: Algorithm) -> float:
    return algo.evaluate().episode_return


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", ["qmix", "vdn"])
def test_greedy_joint_action_reaches_optimum(name: str, seed: int) -> None:
    env = MatrixGameEnv(n_steps=2)
    algo = make_algorithm(name, env, seed=seed, **SHORT_RUN)
    assert greedy_return(algo) < env.optimal_return  # so that reaching it below is learnt
    for _ in range(TRAIN_EPISODES):
        log = algo.train_episode()
    assert math.isfinite(log.metrics["td_loss"])
    greedy = algo.evaluate()
    optimum = dict(zip(env.possible_agents, env.optimal_joint_action))
    assert greedy.actions == [optimum, optimum]
    assert greedy.episode_return == pytest.approx(env.optimal_return)
    assert greedy.final_info["joint_action"] == list(env.optimal_joint_action)


@pytest.mark.parametrize("seed", range(3))
def test_iql_learns_a_game_that_independent_learning_solves(seed: int) -> None:
    env = MatrixGameEnv(n_steps=2)
    algo = make_algorithm("iql", env, seed=seed, **SHORT_RUN)
    assert algo.config.mixer == "none"
    before = algo.evaluate()
    assert before.episode_return < env.optimal_return  # seeds 0, 1, 2 start at 8, 6, 8 of 18
    losses = [algo.train_episode().metrics.get("td_loss") for _ in range(TRAIN_EPISODES)]
    learnt = [x for x in losses if x is not None]
    assert all(math.isfinite(x) for x in learnt) and algo.gradient_steps == 2 * len(learnt)
    # TD loss: about 28-34 over the first updates, 3-4 at the end (epsilon's floor keeps some noise)
    assert np.mean(learnt[-10:]) < np.mean(learnt[:5]) / 3
    optimum = dict(zip(env.possible_agents, env.optimal_joint_action))
    after = algo.evaluate()
    assert after.actions == [optimum, optimum]
    assert after.episode_return == pytest.approx(env.optimal_return)


# Uniform exploration throughout (epsilon 1, as in the QMIX paper's analysis of this game): the
# learners' values are then fits to fixed data, and the outcome is a property of the value
# representation, not of exploration luck. 2B is the "AND" matrix: the additive fit of it under
# uniform data values (1, 1) at 6 and an independent learner its action 1 at 4, both a clear margin
# below 2A's 7. (With the paper's 2B = [[0, 1], [1, 8]], VDN's margin is 6.5 vs 7, and this budget
# does not resolve it reliably: VDN reached 8 on 1 of 16 seeds.) With this budget, seeds 0-15
# all gave QMIX 8 and VDN and IQL 7.
TWO_STEP_PAYOFF_2B = [[0.0, 0.0], [0.0, 8.0]]
TWO_STEP_RUN = dict(eps_start=1.0, eps_end=1.0, lr=3e-3, updates_per_episode=2, target_update_interval=10)
TWO_STEP_EPISODES = 100


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name, stage, expected_return", [("qmix", "2B", 8.0), ("vdn", "2A", 7.0), ("iql", "2A", 7.0)])
def test_two_step_game_only_qmix_coordinates(name: str, stage: str, expected_return: float, seed: int) -> None:
    env = TwoStepGameEnv(payoff_2b=TWO_STEP_PAYOFF_2B)
    assert env.optimal_stage == "2B" and env.optimal_return == 8.0
    algo = make_algorithm(name, env, seed=seed, **TWO_STEP_RUN)
    for _ in range(TWO_STEP_EPISODES):
        algo.train_episode()
    assert algo.epsilon() == 1.0
    greedy = algo.evaluate()
    assert greedy.length == 2
    assert greedy.actions[0]["agent_0"] == (1 if stage == "2B" else 0)  # agent_0's first action picks the stage
    assert greedy.final_info["stage"] == stage
    assert greedy.episode_return == expected_return
    if name == "qmix":
        assert greedy.actions[1] == {"agent_0": 1, "agent_1": 1}


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


def test_two_step_game_dynamics() -> None:
    env = TwoStepGameEnv()
    assert env.optimal_stage == "2B" and env.optimal_joint_action == (1, 1) and env.optimal_return == 8.0
    for first, stage, payoff in ((0, "2A", [[7, 7], [7, 7]]), (1, "2B", [[0, 1], [1, 8]])):
        for a_0 in (0, 1):
            for a_1 in (0, 1):
                obs, _ = env.reset(seed=0)
                assert obs["agent_0"].tolist() == [1, 0, 0, 0] and env.state().tolist() == [1, 0, 0, 0]
                obs, rewards, terms, truncs, infos = env.step({"agent_0": first, "agent_1": 1 - first})
                assert rewards == {"agent_0": 0.0, "agent_1": 0.0} and not any(terms.values())
                assert obs["agent_1"].tolist() == ([0, 1, 0, 0] if stage == "2A" else [0, 0, 1, 0])
                assert infos["agent_0"]["stage"] == "1"
                obs, rewards, terms, truncs, infos = env.step({"agent_0": a_0, "agent_1": a_1})
                assert rewards["agent_1"] == payoff[a_0][a_1] and all(terms.values()) and not any(truncs.values())
                assert infos["agent_0"] == {"joint_action": [a_0, a_1], "payoff": payoff[a_0][a_1], "stage": stage}
                assert env.agents == [] and obs["agent_0"].tolist() == [0, 0, 0, 1]
    with pytest.raises(RuntimeError, match="finished episode"):
        env.step({"agent_0": 0, "agent_1": 0})
    with pytest.raises(ValueError, match=r"payoff_2b must have shape \(2, 2\)"):
        TwoStepGameEnv(payoff_2b=[1.0, 2.0])


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
    parallel_api_test(TwoStepGameEnv(), num_cycles=10)
    api_test(parallel_to_aec(TwoStepGameEnv()), num_cycles=10)
    state_test(parallel_to_aec(TwoStepGameEnv()), TwoStepGameEnv())
