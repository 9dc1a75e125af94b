"""AMC on the real pruning env through the new API: the caller hands it the sequential view."""

from __future__ import annotations

import math

import pytest

import pruning_env
from agents import get_algorithm, make_algorithm

SMALL_AMC = dict(batch_size=8, actor_hidden=(16, 16), critic_hidden=(16, 16), buffer_size=100)


@pytest.fixture(scope="module")
def tiny_parallel_env(tiny_env_factory):
    """``pruning_env/Tiny-v1`` as registered with PettingZoo (the fixture only ensures the package is set up)."""
    return pruning_env.make("pruning_env/Tiny-v1")


def test_amc_wants_the_sequential_view(tiny_parallel_env) -> None:
    cls = get_algorithm("amc")
    assert cls.env_api == "sequential"
    with pytest.raises(TypeError, match=r"wrap it: pruning_env\.SequentialPruningEnv\(env\)"):
        make_algorithm("amc", tiny_parallel_env, seed=0)


def test_amc_searches_the_tiny_env(tiny_parallel_env) -> None:
    env = tiny_parallel_env
    seq_env = pruning_env.SequentialPruningEnv(env)
    layers, episode_length = list(env.possible_agents), env.config.episode_length
    steps = len(layers) * episode_length  # one AMC episode decides every layer once per parallel step

    over = get_algorithm("amc").budget_overrides(plans=8 * episode_length, episode_length=episode_length)
    assert over == {"warmup_episodes": 1}
    algo = make_algorithm("amc", seq_env, seed=0, **SMALL_AMC, **over)
    assert algo.env is seq_env

    warm = algo.train_episode()  # the warm-up episode: uniform random keep ratios, no learning
    learnt = algo.train_episode()
    assert warm.metrics["warmup"] == 1.0 and "critic_loss" not in warm.metrics
    assert learnt.metrics["warmup"] == 0.0
    assert math.isfinite(learnt.metrics["critic_loss"]) and math.isfinite(learnt.metrics["actor_loss"])
    assert algo.episodes_done == 2 and algo.env_steps == 2 * steps
    greedy = algo.evaluate()

    # The view names the layers when it exposes possible_agents; otherwise AMC numbers its steps.
    names = list(getattr(seq_env, "possible_agents", None) or [])
    expected = [names[t % len(names)] for t in range(steps)] if names else [f"step_{t}" for t in range(steps)]
    for log in (warm, learnt, greedy):
        assert log.length == steps
        assert [next(iter(step)) for step in log.actions] == expected
        assert all(0.0 <= a <= 1.0 for step in log.actions for a in step.values())
        assert math.isfinite(log.episode_return)
        # the episode ends with the parallel env's final infos (fixed-shape numbers; the plan is env.plan)
        assert set(log.final_info) >= {"acc_ratio", "macs_ratio", "mmacs"} and "plan" not in log.final_info
        assert 0.0 < log.final_info["macs_ratio"] <= 1.0

    # Greedy play is deterministic and does not train.
    again = algo.evaluate()
    assert again.actions == greedy.actions and again.episode_return == greedy.episode_return
    assert algo.episodes_done == 2
