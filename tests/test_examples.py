"""Every script in examples/ runs with a tiny budget and prints one JSON line (RLlib's is skipped without Ray)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NEEDS = {"torchrl_qmix.py": "torchrl", "sb3_ppo.py": "stable_baselines3", "cleanrl_supersuit.py": "supersuit",
         "rllib_ppo.py": "ray", "benchmarl_task.py": "benchmarl"}  # BenchMARL: its own venv (see the script)


def test_every_example_is_listed():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(NEEDS)


def _run(name: str, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(EXAMPLES / name), "--smoke", *extra], capture_output=True, text=True,
                         timeout=600, env=env, cwd=EXAMPLES.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_example_runs_with_a_tiny_budget(name):
    if importlib.util.find_spec(NEEDS[name]) is None:
        if NEEDS[name] in os.environ.get("PRUNING_ENV_REQUIRE", "").split(","):  # .ci/run's own venvs: never skip
            pytest.fail(f"{NEEDS[name]} is required here (PRUNING_ENV_REQUIRE) but not installed")
        if name == "rllib_ppo.py":  # the script itself says it skips
            assert _run(name) == {"skipped": "ray[rllib] not installed"}
            return
        pytest.skip(f"{NEEDS[name]} not installed")
    result = _run(name, "--env-runners", "1") if name == "rllib_ppo.py" else _run(name)
    if name == "benchmarl_task.py":  # QMIX, 2 iterations of 120 frames on the Tiny surrogate (3-step episodes)
        assert result["algo"] == "qmix" and result["frames"] == 240 and result["iterations"] == 2
        assert result["episodes"] == 80 and math.isfinite(result["last_tenth_mean_return"])
        mappo = _run(name, "--algo", "mappo")
        assert mappo["algo"] == "mappo" and mappo["frames"] == 240 and mappo["episodes"] == 80
        batched = _run(name, "--num-envs", "4")  # one TorchRL env of 4 episodes (SurrogateBatchEnv), specs checked
        assert batched["num_envs"] == 4 and batched["frames"] == 240 and batched["episodes"] == 80
        assert math.isfinite(batched["last_tenth_mean_return"])
        return
    if name == "torchrl_qmix.py":
        assert result["episodes"] == 8 and result["updates"] == 8
        assert math.isfinite(result["first_loss"]) and math.isfinite(result["last_loss"])
    elif name == "sb3_ppo.py":
        assert result["steps"] == 24 and result["episodes"] == 8 and math.isfinite(result["greedy_return"])
        assert 0.0 < result["greedy_macs_ratio"] <= 1.0
    elif name == "cleanrl_supersuit.py":
        assert result["vec_envs"] == 8 and result["agent_episodes"] == 16  # 2 copies x 4 agents x 2 episodes
        assert math.isfinite(result["mean_return"]) and math.isfinite(result["last_loss"])
    else:
        assert result["iterations"] == 1 and result["env_steps"] >= 24 and result["episodes"] >= 1
        assert result["env_runners"] == 1  # sampled by one Ray env-runner actor (num_env_runners=1)
        assert math.isfinite(result["total_loss"])


@pytest.mark.long  # the same scripts as above on another env id: a subprocess each (.ci/run runs them)
@pytest.mark.parametrize("name", ["torchrl_qmix.py", "cleanrl_supersuit.py"])
def test_examples_run_on_the_surrogate_env(name):
    if importlib.util.find_spec(NEEDS[name]) is None:
        pytest.skip(f"{NEEDS[name]} not installed")
    result = _run(name, "--env", "pruning_env/Tiny-Surrogate-v1")
    loss = result["last_loss"]
    assert math.isfinite(loss)
