"""Single-agent Gymnasium views: centralised joint action and AMC-style sequential."""

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import pruning_env  # noqa: F401  (registers the Gymnasium ids)
from pruning_env.envs.plans import keep_count
from pruning_env.envs.registry import make_benchmark_env
from pruning_env.envs.views import JointPruningEnv, SequentialDiscretePruningEnv, SequentialPruningEnv


def test_views_pass_the_gymnasium_checker(tiny_env_factory):
    check_env(JointPruningEnv(tiny_env_factory()), skip_render_check=True)
    check_env(SequentialPruningEnv(tiny_env_factory()), skip_render_check=True)
    check_env(JointPruningEnv(tiny_env_factory(continuous=True)), skip_render_check=True)


def test_joint_view_equals_the_parallel_env(tiny_env_factory):
    joint = JointPruningEnv(tiny_env_factory())
    par = tiny_env_factory()
    joint.reset(seed=0)
    par.reset(seed=0)
    for step in range(3):
        action = np.array([step + 2, 3, 5, 1])
        _, r, term, _, info = joint.step(action)
        _, rewards, _, _, infos = par.step({f"layer_{i}": int(a) for i, a in enumerate(action)})
        assert r == rewards["layer_0"] and info == infos["layer_0"]
        assert joint.env.plan == par.plan
    assert term


def test_sequential_view_walks_the_layers_and_returns_the_team_reward(tiny_env_factory):
    env = SequentialPruningEnv(tiny_env_factory(exact_budget=False))  # the raw action, no budget projection
    obs, _ = env.reset(seed=0)
    total, steps, terminated = 0.0, 0, False
    while not terminated:
        obs, r, terminated, _, info = env.step(np.array([0.55], np.float32))
        total += r
        steps += 1
        assert env.observation_space.contains(obs)
    assert steps == 4 * 3  # layers x multi-agent steps
    assert info["rate"] == pytest.approx(0.4, abs=0.05)  # keep 0.55 -> rate 0.45 -> nearest grid rate 0.4
    # the same fixed keys on every step (the plan is env.env.plan, not an info)
    assert "plan" not in info and info["macs_ratio"] == pytest.approx(env.env.measure(env.env.plan).macs_ratio)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.array([0.5], np.float32))


def test_sequential_discrete_view_takes_rate_indices(tiny_env_factory):
    env = SequentialDiscretePruningEnv(tiny_env_factory(exact_budget=False))  # raw rates, no budget projection
    check_env(env, skip_render_check=True)
    assert env.action_space == gymnasium.spaces.Discrete(10)
    env.reset(seed=0)
    par = tiny_env_factory(exact_budget=False)
    par.reset(seed=0)
    actions = [3, 5, 1, 7]
    for t in range(4):
        obs, r, terminated, _, info = env.step(np.int64(actions[t]))
        assert env.observation_space.contains(obs) and not terminated
    _, rewards, _, _, infos = par.step({f"layer_{i}": a for i, a in enumerate(actions)})
    assert r == rewards["layer_0"] and env.env.plan == par.plan
    assert {k: v for k, v in info.items() if k != "plan"} == infos["layer_0"]
    assert [1.0 - env.env.plan.keep_ratio(n) for n in env.env.layer_names] == pytest.approx(
        [1.0 - keep_count(par, i, par.config.rates[a]) / par.plan.widths[n]
         for i, (n, a) in enumerate(zip(par.layer_names, actions))])
    with pytest.raises(ValueError, match="rate index"):
        env.step(10)
    with pytest.raises(ValueError, match="rate index"):
        env.step(0.5)


def test_gymnasium_registry_makes_the_views():
    env = gymnasium.make("pruning_env/Tiny-Joint-v1")
    obs, _ = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape
    env = gymnasium.make("pruning_env/Tiny-Sequential-v1")
    assert env.reset(seed=0)[0].shape == (11,)
    env = gymnasium.make("pruning_env/Tiny-SequentialDiscrete-v1")
    assert env.action_space == gymnasium.spaces.Discrete(10)


def test_gymnasium_make_with_the_module_prefix_needs_no_import():
    """``pruning_env:<id>`` imports the package first: the form that works in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import gymnasium; env = gymnasium.make('pruning_env:pruning_env/Tiny-Joint-v1'); "
            "print(env.reset(seed=0)[0].shape == env.observation_space.shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("True")


@pytest.mark.cifar
def test_views_on_vgg16_cifar10(cifar_vgg16):
    model, splits = cifar_vgg16

    def make():
        return make_benchmark_env("vgg16", "cifar10", model=model, splits=splits, device="cpu", eval_size=100)

    check_env(JointPruningEnv(make()), skip_render_check=True)
    check_env(SequentialPruningEnv(make()), skip_render_check=True)
