"""Reward proxies (training.proxy): the env's reward changes with the proxy settings exactly as documented."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pruning_env.core.data import batches
from pruning_env.engine.surgery import apply
from pruning_env.envs.plans import objective_of, uniform_plan
from pruning_env.training.proxy import RewardImages, Signals, kd_steps


def _one_step(env, action=4):
    _, infos = env.reset(seed=0)
    env.j0 = infos["layer_0"]["objective"]  # J(unpruned): quality 1 minus the budget penalty at MACs ratio 1
    return env.step({a: action for a in env.agents})


def _kl_and_ce(env, model):
    """KL(p_unpruned || p_model) and cross-entropy on the env's reward images, written out here."""
    split = env.splits.val.subset(env.config.eval_size)
    kl, ce, n = 0.0, 0.0, 0
    with torch.no_grad():
        for x, y in batches(split, 97, mean=env.splits.mean, std=env.splits.std):
            p = F.softmax(env.base_model(x).double(), 1)
            q = F.softmax(model.eval()(x).double(), 1)
            kl += float((p * (p.log() - q.log())).sum())
            ce += float(-q.log()[torch.arange(len(y)), y].sum())
            n += len(y)
    return kl / n, ce / n


def test_accuracy_proxy_is_the_accuracy_ratio(tiny_env_factory):
    assert tiny_env_factory().config.proxy.proxy == "kl"  # the default (benchmarks/results/reward_fidelity.md)
    env = tiny_env_factory(max_cycles=1, proxy="acc")
    _, rewards, _, _, infos = _one_step(env)
    info = infos["layer_0"]
    assert info["quality"] == pytest.approx(info["acc"] / env.baseline_acc)
    assert info["quality"] == pytest.approx(info["acc_ratio"])
    assert env.j0 == pytest.approx(1.0 - 2.0 * (1.0 - 0.5))
    assert rewards["layer_0"] == pytest.approx(info["objective"] - env.j0)
    assert info["objective"] == pytest.approx(info["quality"])  # the exact budget: no penalty at the end


def test_kl_and_ce_proxies_reward_the_documented_quality(tiny_env_factory):
    acc_env = tiny_env_factory(max_cycles=1, proxy="acc")
    _, _, _, _, acc_infos = _one_step(acc_env)
    kl_env = tiny_env_factory(max_cycles=1, proxy="kl")
    _, rewards, _, _, infos = _one_step(kl_env)
    kl, ce = _kl_and_ce(kl_env, kl_env.build_network(kl_env.plan))
    assert kl > 0
    assert infos["layer_0"]["quality"] == pytest.approx(math.exp(-kl), rel=1e-4)
    assert rewards["layer_0"] == pytest.approx(math.exp(-kl) - kl_env.j0, rel=1e-3)
    assert infos["layer_0"]["acc"] == acc_infos["layer_0"]["acc"]  # the same network, only the signal differs
    ce_env = tiny_env_factory(max_cycles=1, proxy="ce")
    _, _, _, _, infos = _one_step(ce_env)
    _, ce_base = _kl_and_ce(ce_env, ce_env.base_model)
    assert infos["layer_0"]["quality"] == pytest.approx(math.exp(ce_base - ce), rel=1e-4)


def test_kd_steps_change_the_reward_deterministically(tiny_env_factory):
    plain = tiny_env_factory(max_cycles=1)  # proxy="kl", the default
    _, _, _, _, before = _one_step(plain, action=6)
    first = tiny_env_factory(max_cycles=1, proxy="kl", proxy_kd_steps=8)
    _, r1, _, _, after = _one_step(first, action=6)
    second = tiny_env_factory(max_cycles=1, proxy="kl", proxy_kd_steps=8)
    _, r2, _, _, _ = _one_step(second, action=6)
    assert r1 == r2
    assert after["layer_0"]["quality"] != before["layer_0"]["quality"]
    # the documented pipeline, written out: surgery, BN re-estimation, 8 KD steps (seed 0), KL on the reward images
    model = apply(first.base_model, first.plan, first.input_shape, layers=first.layers)
    first.config.bn.apply(model, first.splits, seed=0)
    kd_steps(model, first.base_model, first.splits, 8, lr=0.01, batch_size=128, seed=0)
    images = RewardImages(first.base_model, first.splits.val, mean=first.splits.mean, std=first.splits.std,
                          limit=first.config.eval_size)
    assert after["layer_0"]["quality"] == pytest.approx(math.exp(-images.measure(model).kl), rel=1e-6)
    assert first.timings["proxy_kd"] > 0 and "proxy_kd" in plain.timings
    # the plan (the transition) does not depend on the proxy
    assert first.plan == plain.plan


def test_kd_checkpoints_equal_separate_runs(tiny_env_factory):
    env = tiny_env_factory()
    plan = uniform_plan(env, 0.5)
    images = RewardImages(env.base_model, env.splits.val, mean=env.splits.mean, std=env.splits.std, limit=128)
    seen: dict[int, Signals] = {}
    def fresh():
        m = apply(env.base_model, plan, env.input_shape, layers=env.layers)
        env.config.bn.apply(m, env.splits, seed=0)
        return m

    m = fresh()
    kd_steps(m, env.base_model, env.splits, 6, lr=0.01, batch_size=32, checkpoints=(2, 6),
             on_checkpoint=lambda n: seen.__setitem__(n, images.measure(m)))
    for n in (2, 6):
        alone = fresh()
        kd_steps(alone, env.base_model, env.splits, n, lr=0.01, batch_size=32)
        assert images.measure(alone) == seen[n]


def test_proxy_settings_are_checked_before_any_work(tiny_env_factory):
    with pytest.raises(ValueError, match="proxy"):
        tiny_env_factory(proxy="loss")
    with pytest.raises(ValueError, match="proxy_kd_steps"):
        tiny_env_factory(proxy_kd_steps=-1)
    images_base = Signals(acc=80.0, kl=0.0, ce=0.5)
    assert Signals(acc=40.0, kl=0.2, ce=0.7).quality("acc", images_base) == pytest.approx(0.5)
    assert Signals(acc=40.0, kl=0.2, ce=0.7).quality("ce", images_base) == pytest.approx(np.exp(-0.2))


def test_a_network_built_elsewhere_is_measured_like_a_plan(tiny_env_factory):
    for proxy, steps in (("kl", 0), ("acc", 3)):
        env = tiny_env_factory(max_cycles=1, proxy=proxy, proxy_kd_steps=steps)
        _, _, _, _, infos = _one_step(env, action=5)
        model = env.build_network(env.plan)  # BN re-estimated as the env does
        before = {k: v.clone() for k, v in model.state_dict().items()}
        measured = env.measure_network(model)
        assert measured.to_dict() == env.measure(env.plan).to_dict()  # every metric, the objective included
        assert measured.info() == {k: v for k, v in infos["layer_0"].items() if k != "rate"}
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # KD ran on a copy
        assert objective_of(env, measured.acc, measured.macs, quality=measured.quality) == measured.objective
