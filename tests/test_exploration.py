"""Local exploration of the value-based learners (QMIX / VDN / IQL ``explore_radius``)."""

import numpy as np
import pytest

import agents
from agents.qmix import explore_action


def test_uniform_exploration_reaches_every_available_action():
    rng = np.random.default_rng(0)
    avail = np.array([1, 1, 0, 1, 1, 1], bool)
    seen = {explore_action(rng, 3, avail, 0) for _ in range(300)}
    assert seen == {0, 1, 3, 4, 5}


def test_local_exploration_stays_next_to_the_greedy_action():
    rng = np.random.default_rng(0)
    avail = np.ones(10, bool)
    assert {explore_action(rng, 4, avail, 1) for _ in range(200)} == {3, 5}
    assert {explore_action(rng, 4, avail, 2) for _ in range(300)} == {2, 3, 5, 6}
    assert {explore_action(rng, 0, avail, 1) for _ in range(50)} == {1}  # at the edge of the grid
    avail[[3, 5]] = False
    assert {explore_action(rng, 4, avail, 1) for _ in range(50)} == {4}  # no neighbour left: stay greedy
    avail[4] = False
    assert {explore_action(rng, 4, avail, 1) for _ in range(200)} <= set(np.flatnonzero(avail))


@pytest.mark.parametrize("name", ["qmix", "vdn", "iql"])
def test_learners_train_with_local_exploration(tiny_env_factory, name):
    env = tiny_env_factory()
    algo = agents.make_algorithm(name, env, seed=0, explore_radius=1, batch_size=2, eps_anneal_steps=6)
    logs = [algo.train_episode() for _ in range(3)]
    assert all(np.isfinite(log.episode_return) for log in logs)
    assert algo.epsilon() < 1.0
    with pytest.raises(ValueError, match="explore_radius"):
        agents.make_algorithm(name, tiny_env_factory(), seed=0, explore_radius=-1)
