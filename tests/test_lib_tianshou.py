"""Tianshou 2.0 runs ``pruning_env/Tiny-v1`` as shipped: ``PettingZooEnv(parallel_to_aec(env))``, a vectorised
Collector and a ``VectorReplayBuffer`` that stacks the env's infos over several episodes."""

from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.utils import parallel_to_aec

pytest.importorskip("tianshou")
from tianshou.algorithm.multiagent.marl import MultiAgentOffPolicyAlgorithm
from tianshou.algorithm.random import MARLRandomDiscreteMaskedOffPolicyAlgorithm
from tianshou.data import Collector, VectorReplayBuffer
from tianshou.env import DummyVectorEnv, PettingZooEnv

from pruning_env.envs.env import INFO_KEYS


def test_collect_several_episodes_into_a_replay_buffer(tiny_env_factory):
    def make():
        return PettingZooEnv(parallel_to_aec(tiny_env_factory()))

    env = make()
    algo = MultiAgentOffPolicyAlgorithm(
        algorithms=[MARLRandomDiscreteMaskedOffPolicyAlgorithm(env.action_space) for _ in env.agents], env=env)
    buffer = VectorReplayBuffer(400, 2)
    collector = Collector(algo, DummyVectorEnv([make, make]), buffer)
    collector.reset()
    stats = collector.collect(n_episode=6)
    layers, steps = 4, 3
    assert stats.n_collected_episodes >= 6
    assert (stats.lens == layers * steps).all()  # AEC: one agent per step, 3 parallel steps
    assert len(buffer) == stats.n_collected_steps
    data = buffer[buffer.sample_indices(0)]  # every stored transition (the sub-buffers are not contiguous)
    assert set(INFO_KEYS) <= set(data.info.keys())
    for key in INFO_KEYS:
        assert np.asarray(data.info[key]).shape == (len(buffer),)
    assert data.rew.shape == (len(buffer), layers)  # tianshou keeps every agent's reward
    # Each episode's return is the env's own: J(final plan) - J(unpruned), the same for every agent.
    ref = tiny_env_factory()
    j0 = ref.measured_plans()[0].objective  # the unpruned network's J (its measurement comes first)
    ends = np.flatnonzero(data.terminated)
    assert len(ends) == stats.n_collected_episodes
    final_objective = np.sort(np.asarray(data.info["objective"])[ends] - j0)
    returns = stats.returns.reshape(len(ends), layers)
    np.testing.assert_allclose(returns, returns[:, :1].repeat(layers, axis=1))
    np.testing.assert_allclose(np.sort(returns[:, 0]), final_objective, atol=1e-6)
    assert (np.asarray(data.info["mmacs"]) > 0).all() and np.isfinite(np.asarray(data.info["acc"])).all()
