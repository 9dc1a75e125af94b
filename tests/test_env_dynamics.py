"""Episode semantics of the pruning env: determinism, monotone pruning, rewards, MACs, caching."""

import math

import numpy as np
import pytest
import torch

from pruning_env.engine.flops import count
from pruning_env.envs.features import OBSERVATION_FEATURES
from pruning_env.envs.registry import make_benchmark_env


def _rollout(env, actions_per_step, seed=0):
    obs, infos = env.reset(seed=seed)
    trace = [(obs, infos)]
    for actions in actions_per_step:
        trace.append(env.step(actions))
    return trace


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def test_whole_episodes_are_deterministic(tiny_env_factory):
    rng = np.random.default_rng(0)
    actions = [{f"layer_{i}": int(rng.integers(10)) for i in range(4)} for _ in range(3)]
    first = _rollout(tiny_env_factory(), actions)
    second = _rollout(tiny_env_factory(), actions)
    _assert_same(first, second)


def test_pruning_is_monotone_and_return_is_objective_difference(tiny_env_factory):
    env = tiny_env_factory()
    _, infos = env.reset(seed=0)
    j0 = infos["layer_0"]["objective"]
    total = 0.0
    rates_seen = []
    for step_actions in ([{f"layer_{i}": 5 for i in range(4)}, {f"layer_{i}": 2 for i in range(4)},
                          {f"layer_{i}": 7 for i in range(4)}]):
        _, rewards, terms, truncs, infos = env.step(step_actions)
        assert len(set(rewards.values())) == 1  # one team reward
        total += rewards["layer_0"]
        rates_seen.append([infos[a]["rate"] for a in sorted(infos)])
    assert rates_seen[1] == rates_seen[0]  # a lower target keeps the current rate
    assert all(r2 >= r1 for r1, r2 in zip(rates_seen[1], rates_seen[2]))
    assert all(terms.values()) and not any(truncs.values()) and env.agents == []
    assert total == pytest.approx(infos["layer_0"]["objective"] - j0, abs=1e-9)
    # a plan is the kept filters of each layer, a subset of the previous step's
    plan = env.plan.to_dict()
    assert set(plan["keep"]) == set(env.layer_names)


def test_reward_modes(tiny_env_factory):
    for mode, kwargs in (("linear", {"lam": 0.3}), ("budget", {"macs_target": 0.4}), ("amc", {})):
        env = tiny_env_factory(reward=mode, proxy="acc", **kwargs)  # the formulas in accuracy ratios
        env.reset(seed=0)
        _, rewards, _, _, infos = env.step({a: 6 for a in env.agents})
        info = infos["layer_0"]
        # The formulas written out here, independently of the env's objective():
        macs = env.measure(env.plan).macs  # the exact integer count (infos give MMACs)
        assert info["mmacs"] == pytest.approx(macs / 1e6)
        acc_ratio, macs_ratio = info["acc"] / env.baseline_acc, macs / env.base_macs
        expected = {"linear": acc_ratio - 0.3 * macs_ratio,
                    "budget": acc_ratio - 2.0 * max(0.0, macs_ratio - 0.4),
                    "amc": -(1.0 - info["acc"] / 100.0) * math.log(macs)}[mode]
        assert info["acc_ratio"] == pytest.approx(acc_ratio) and info["macs_ratio"] == pytest.approx(macs_ratio)
        assert info["objective"] == pytest.approx(expected)
        j0 = {"linear": 1.0 - 0.3, "budget": 1.0 - 2.0 * 0.6,  # the unpruned network: both ratios are 1
              "amc": -(1.0 - env.baseline_acc / 100.0) * math.log(env.base_macs)}[mode]
        assert rewards["layer_0"] == pytest.approx(expected - j0)
    budget = tiny_env_factory(reward="budget", macs_target=0.05, budget_penalty=2.0, proxy="acc")
    budget.reset(seed=0)
    _, _, _, _, infos = budget.step({a: 1 for a in budget.agents})
    info = infos["layer_0"]
    assert info["objective"] == pytest.approx(info["acc_ratio"] - 2.0 * (info["macs_ratio"] - 0.05))


def test_reset_restores_the_unpruned_network_and_never_touches_the_original(tiny_env_factory):
    env = tiny_env_factory()
    before = {k: v.clone() for k, v in env.base_model.state_dict().items()}
    env.reset(seed=0)
    env.step({a: 8 for a in env.agents})
    obs_again, infos = env.reset(seed=0)
    assert infos["layer_0"]["macs_ratio"] == 1.0
    assert all(o[OBSERVATION_FEATURES.index("keep_ratio")] == 1.0 for o in obs_again.values())
    for k, v in env.base_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_plans_are_cached(tiny_env_factory):
    env = tiny_env_factory()
    actions = {a: 4 for a in env.possible_agents}
    env.reset(seed=0)
    env.step(actions)
    n = env.num_evaluations
    env.reset(seed=0)
    env.step(actions)
    assert env.num_evaluations == n


def test_reported_macs_equal_the_counter_on_the_pruned_network(tiny_env_factory):
    env = tiny_env_factory()
    env.reset(seed=0)
    _, _, _, _, infos = env.step({a: i % 10 for i, a in enumerate(env.agents)})
    pruned = env.build_network(env.plan)
    report = count(pruned, env.input_shape)
    exact = env.measure(env.plan)
    assert exact.macs == report.macs and exact.params == report.params
    assert infos["layer_0"]["mmacs"] == pytest.approx(report.macs / 1e6)
    assert infos["layer_0"]["mparams"] == pytest.approx(report.params / 1e6)


def test_build_network_of_any_plan_is_the_envs_network_and_leaves_the_env_alone(tiny_env_factory):
    from pruning_env.engine.bn import BNRecalConfig

    env = tiny_env_factory()
    env.reset(seed=0)
    env.step({a: (3 * i) % 10 for i, a in enumerate(env.agents)})
    plan, x = env.plan, torch.randn(4, *env.input_shape)
    current = env.build_network(env.plan).eval()
    env.reset(seed=0)  # another plan is current now: the built network still follows the plan given
    built = env.build_network(plan).eval()
    assert env.plan.key() != plan.key()
    with torch.no_grad():
        assert torch.equal(current(x), built(x))
        raw = env.build_network(plan, bn=BNRecalConfig(bn_recal_batches=0)).eval()  # no BN re-estimation
        assert not torch.equal(raw(x), built(x))


@pytest.mark.cifar
def test_real_cifar_episode_macs_match_the_counter(cifar_vgg16):
    model, splits = cifar_vgg16
    env = make_benchmark_env("vgg16", "cifar10", model=model, splits=splits, device="cpu", eval_size=500)
    env.reset(seed=0)
    rng = np.random.default_rng(1)
    for _ in range(env.config.episode_length):
        _, _, _, _, infos = env.step({a: int(rng.integers(10)) for a in env.agents})
    info = infos["layer_0"]
    pruned = env.build_network(env.plan)
    assert env.measure(env.plan).macs == count(pruned, (3, 32, 32)).macs
    assert np.float32(info["mmacs"]) == pytest.approx(count(pruned, (3, 32, 32)).macs / 1e6, rel=1e-6)
    assert 0.0 < info["macs_ratio"] < 1.0 and 0.0 <= info["acc"] <= 100.0
    assert env.baseline_acc > 25.0  # the briefly trained baseline is far above chance (10 %)


@pytest.mark.parametrize("direction", ["low", "high"])
def test_the_envs_dsfp_ranking_is_the_criterions_in_both_directions(tiny_env_factory, direction):
    """The env fuses the components it has at hand: its order must still be the ``dsfp`` criterion's."""
    from pruning_env.core.data import calibration_batch
    from pruning_env.criteria import score
    from pruning_env.engine.plan import plan_top_k
    from pruning_env.envs.plans import keep_count, uniform_plan

    env = tiny_env_factory(criterion="dsfp", direction=direction)
    x, y = calibration_batch(env.splits, env.config.scoring.calib_size, seed=0)
    scores = score(env.base_model, x, y, "dsfp", layers=env.layer_names, direction=direction,
                   kl=env.config.scoring.kl)
    counts = {name: keep_count(env, name, 0.5) for name in env.layer_names}
    assert uniform_plan(env, 0.5) == plan_top_k(scores, counts)


def test_the_envs_transition_breaks_ties_as_every_plan_does(tiny_env_factory):
    """Equal scores: each step prunes the lower indices of the filters still there (engine.plan.top_k_indices)."""
    from pruning_env.criteria import Criterion, register_criterion, unregister_criterion
    from pruning_env.engine.plan import PruningPlan, top_k_indices
    from pruning_env.envs.plans import keep_count

    @register_criterion("test_all_equal")
    class AllEqual(Criterion):
        needs_data = False
        needs_labels = False

        def compute(self, model, images, labels, convs, *, seed):
            return {name: torch.zeros(conv.out_channels) for name, conv in convs.items()}

    try:
        env = tiny_env_factory(criterion="test_all_equal", reward="linear", max_cycles=2)
        env.reset(seed=0)
        rates = list(env.config.rates)
        env.step({a: rates.index(0.3) for a in env.agents})
        env.step({a: rates.index(0.6) for a in env.agents})
        widths = {name: env.macs_model.widths[i] for i, name in enumerate(env.layer_names)}
        first = {n: top_k_indices(torch.zeros(w), keep_count(env, n, 0.3)).tolist() for n, w in widths.items()}
        second = {n: [first[n][i] for i in top_k_indices(torch.zeros(len(first[n])), keep_count(env, n, 0.6))]
                  for n in widths}
        assert env.plan == PruningPlan(second, widths)
        assert all(keep == list(range(widths[n] - len(keep), widths[n])) for n, keep in second.items())
    finally:
        unregister_criterion("test_all_equal")
