"""RLlib 2.x runs ``pruning_env/Tiny-v1`` as shipped: ``ParallelPettingZooEnv`` and PPO with one shared policy.

Ray is an optional extra (``.[rllib]``, its own virtual environment: it pins gymnasium 1.2.2); skipped without it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.rllib")
from ray.rllib.env.wrappers.pettingzoo_env import ParallelPettingZooEnv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import rllib_ppo


def test_the_wrapper_steps_like_the_env(tiny_env_factory):
    env = ParallelPettingZooEnv(tiny_env_factory())
    ref = tiny_env_factory()
    obs, infos = env.reset(seed=0)
    ref.reset(seed=0)
    assert set(obs) == set(ref.possible_agents) and set(infos) == set(ref.possible_agents)
    for t in range(3):
        actions = {a: (t + i) % 10 for i, a in enumerate(ref.possible_agents)}
        obs, rewards, terms, truncs, infos = env.step(actions)
        _, ref_rewards, _, _, ref_infos = ref.step(actions)
        assert rewards == ref_rewards and infos == ref_infos
        assert all(np.isfinite(o).all() for o in obs.values())
    assert terms["__all__"] and not truncs["__all__"]


def test_ppo_trains_one_shared_policy():
    result = rllib_ppo.train(iterations=2, batch=24)
    assert result["iterations"] == 2 and result["env_steps"] >= 48 and result["episodes"] >= 2
    assert math.isfinite(result["total_loss"])
    # RLlib sums the agents' rewards: its episode return is 4 (layers) x each agent's (= the team return).
    per_agent = result["agent_episode_returns_mean"]
    assert set(per_agent) == {f"layer_{i}" for i in range(4)}
    team = per_agent["layer_0"]
    assert all(v == pytest.approx(team) for v in per_agent.values())
    assert result["episode_return_mean"] == pytest.approx(4 * team)
