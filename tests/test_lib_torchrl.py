"""TorchRL 0.14 runs ``pruning_env/Tiny-v1`` as shipped: PettingZooWrapper, spec checks, a Collector, QMIX."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchrl")
from torchrl.collectors import Collector
from torchrl.envs.libs.pettingzoo import PettingZooWrapper
from torchrl.envs.utils import check_env_specs

import pruning_env
from pruning_env.envs.env import INFO_KEYS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import torchrl_qmix


@pytest.mark.parametrize("kwargs", [{}, {"return_state": True, "use_mask": True}], ids=["plain", "state+mask"])
def test_wrapper_specs_and_a_rollout_match_the_env(tiny_env_factory, kwargs):
    env = PettingZooWrapper(tiny_env_factory(), **kwargs)
    assert env.group_map == {"layer": [f"layer_{i}" for i in range(4)]}
    check_env_specs(env)
    assert env.observation_spec["layer", "observation"].shape == (4, 38)
    assert set(env.observation_spec["layer", "info"].keys()) == set(INFO_KEYS)
    if kwargs:
        assert env.observation_spec["state"].shape == (4 * 38 + 4,)
        assert env.observation_spec["layer", "mask"].shape == (4,)
    # A fixed-action rollout of one episode; rewards and infos are the env's own.
    ref = tiny_env_factory()
    ref.reset(seed=0)
    env.set_seed(0)
    td = env.reset()
    rewards, infos = [], []
    for t in range(3):
        actions = {a: (t * 3 + i) % 10 for i, a in enumerate(ref.possible_agents)}
        td["layer", "action"] = torch.tensor(list(actions.values()))
        td = env.step(td)
        _, r, _, _, info = ref.step(actions)
        rewards.append(td["next", "layer", "reward"].squeeze(-1))
        infos.append(td["next", "layer", "info"])
        torch.testing.assert_close(rewards[-1], torch.full((4,), r["layer_0"], dtype=torch.float32))
        for k in INFO_KEYS:
            expected = torch.tensor([info[a][k] for a in ref.possible_agents], dtype=torch.float32)
            torch.testing.assert_close(infos[-1][k], expected)
        td = td["next"]
    assert bool(td["done"]) and bool(td["layer", "done"].all())


def test_a_collector_runs_two_episodes(tiny_env_factory):
    env = PettingZooWrapper(tiny_env_factory(), return_state=True, use_mask=True)
    collector = Collector(env, None, frames_per_batch=6, total_frames=6)  # None: random policy
    data = next(iter(collector))
    collector.shutdown()
    assert data.batch_size == (6,)
    assert data["next", "layer", "reward"].shape == (6, 4, 1)
    assert int(data["next", "done"].sum()) == 2  # Tiny-v1 episodes are 3 steps
    r = data["next", "layer", "reward"].squeeze(-1)
    assert torch.equal(r, r[:, :1].expand_as(r))  # one team reward
    objective = data["next", "layer", "info", "objective"][:, 0]
    assert np.isfinite(objective.numpy()).all()


def test_qmix_updates_with_the_qmixer_loss():
    out = torchrl_qmix.train(batches=2, frames_per_batch=6, updates_per_batch=3)
    assert out["episodes"] == 4 and out["updates"] == 6
    assert math.isfinite(out["first_loss"]) and math.isfinite(out["last_loss"])


def test_the_registered_id_wraps_too():
    env = PettingZooWrapper(pruning_env.make("pruning_env/Tiny-v1"), return_state=True)
    assert env.rollout(3)["next", "done"][-1].item()
