"""Stable-Baselines3 2.x on the Gymnasium views of ``pruning_env/Tiny-v1``: ``check_env``, PPO on the joint view,
DQN on the ``Discrete(K)`` sequential view; rewards equal the multi-agent env's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")
from stable_baselines3 import DQN, PPO
from stable_baselines3.common.env_checker import check_env

from pruning_env.envs.views import JointPruningEnv, SequentialDiscretePruningEnv, SequentialPruningEnv


def test_sb3_check_env_accepts_every_view(tiny_env_factory):
    for view in (JointPruningEnv, SequentialPruningEnv, SequentialDiscretePruningEnv):
        check_env(view(tiny_env_factory()), warn=True, skip_render_check=True)


def _episodes(model) -> list[dict]:
    return list(model.ep_info_buffer)


def test_ppo_learns_on_the_joint_view_and_its_rewards_are_the_envs(tiny_env_factory):
    view = JointPruningEnv(tiny_env_factory())
    model = PPO("MlpPolicy", view, n_steps=12, batch_size=12, n_epochs=2, seed=0, verbose=0)
    model.learn(total_timesteps=24)
    eps = _episodes(model)
    assert model.num_timesteps == 24 and len(eps) == 8 and all(e["l"] == 3 for e in eps)
    assert all(math.isfinite(e["r"]) for e in eps)
    # A greedy episode through the view gives the parallel env's rewards for the same joint actions.
    par = tiny_env_factory()
    obs, _ = view.reset(seed=1)
    par.reset(seed=1)
    done = False
    while not done:
        action, _ = model.predict(obs, deterministic=True)
        assert view.action_space.contains(action)
        obs, r, done, _, _ = view.step(action)
        _, rewards, _, _, _ = par.step({a: int(action[i]) for i, a in enumerate(par.possible_agents)})
        assert r == rewards["layer_0"]
    assert view.env.plan == par.plan


def test_dqn_runs_on_the_sequential_discrete_view(tiny_env_factory):
    view = SequentialDiscretePruningEnv(tiny_env_factory())
    model = DQN("MlpPolicy", view, learning_starts=12, buffer_size=200, batch_size=8, train_freq=4,
                target_update_interval=12, seed=0, verbose=0)
    before = [p.detach().clone() for p in model.q_net.parameters()]
    model.learn(total_timesteps=48)
    eps = _episodes(model)
    assert len(eps) == 4 and all(e["l"] == 12 for e in eps)  # 4 layers x 3 multi-agent steps
    after = list(model.q_net.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after))  # gradient steps were taken
    assert all(torch.isfinite(a).all() for a in after)
    # Its episode return is the multi-agent episode's for the same rates.
    obs, _ = view.reset(seed=0)
    actions, ret, done = [], 0.0, False
    while not done:
        a, _ = model.predict(obs, deterministic=True)
        actions.append(int(a))
        obs, r, done, _, _ = view.step(a)
        ret += r
    par = tiny_env_factory()
    par.reset(seed=0)
    total = 0.0
    for t in range(3):
        _, rewards, _, _, _ = par.step({f"layer_{i}": actions[4 * t + i] for i in range(4)})
        total += rewards["layer_0"]
    assert ret == pytest.approx(total) and np.isfinite(ret)
