"""PettingZoo API conformance of the pruning env (Tiny-v0 and VGG-16 on the real CIFAR-10)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pettingzoo.test import api_test, max_cycles_test, parallel_api_test, state_test
from pettingzoo.utils import parallel_to_aec

import pruning_env
from pruning_env import filter_pruning_v0
from pruning_env.envs.env import INFO_KEYS
from pruning_env.envs.registry import make_benchmark_env


def test_tiny_passes_the_pettingzoo_tests(tiny_env_factory):
    parallel_api_test(tiny_env_factory(), num_cycles=30)
    api_test(parallel_to_aec(tiny_env_factory()), num_cycles=30)
    state_test(parallel_to_aec(tiny_env_factory()), tiny_env_factory(), num_cycles=10)
    max_cycles_test(filter_pruning_v0)


def test_spaces_are_cached_shared_and_bounded(tiny_env_factory):
    env = tiny_env_factory()
    a0, a1 = env.possible_agents[:2]
    assert env.possible_agents == [f"layer_{i}" for i in range(4)]
    assert env.observation_space(a0) is env.observation_space(a0) is env.observation_spaces[a1]
    assert env.action_space(a0) is env.action_spaces[a1] and env.action_space(a0).n == 10
    assert np.isfinite(env.state_space.low).all() and np.isfinite(env.state_space.high).all()
    obs, infos = env.reset(seed=0)
    for a, o in obs.items():
        assert env.observation_space(a).contains(o)
    assert env.state_space.contains(env.state())
    assert infos[a0]["macs_ratio"] == 1.0 and infos[a0]["acc_ratio"] == 1.0


def test_continuous_actions(tiny_env_factory):
    env = tiny_env_factory(continuous=True, exact_budget=False)  # the raw action, no budget projection
    parallel_api_test(env, num_cycles=10)
    env.reset(seed=0)
    _, _, _, _, infos = env.step({a: np.array([0.5], np.float32) for a in env.agents})
    assert infos["layer_0"]["rate"] == pytest.approx(0.5, abs=0.07)


def test_bad_actions_raise_clear_errors(tiny_env_factory):
    env = tiny_env_factory()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="missing \\['layer_3'\\]"):
        env.step({a: 0 for a in env.agents[:3]})
    with pytest.raises(ValueError, match="unknown \\['layer_9'\\]"):
        env.step({**{a: 0 for a in env.agents}, "layer_9": 0})
    with pytest.raises(ValueError, match="layer_0 must be an int in \\[0, 9\\]"):
        env.step({**{a: 0 for a in env.agents}, "layer_0": 10})
    with pytest.raises(ValueError, match="must be an int"):
        env.step({**{a: 0 for a in env.agents}, "layer_0": 0.5})
    for _ in range(env.config.episode_length):
        env.step({a: 1 for a in env.agents})
    with pytest.raises(RuntimeError, match="call reset"):
        env.step({a: 1 for a in env.possible_agents})


def test_bad_config_raises_clear_errors(tiny_env_factory):
    with pytest.raises(ValueError, match="--rates: rates must be in \\[0, 1\\), got 1.0"):
        tiny_env_factory(rates=(0.0, 1.0))
    with pytest.raises(ValueError, match="--rates: rates must be distinct"):
        tiny_env_factory(rates=(0.1, 0.1))
    with pytest.raises(ValueError, match="--criterion: criterion must be one of .*dsfp.*, got 'nope'"):
        tiny_env_factory(criterion="nope")
    with pytest.raises(ValueError, match="macs_target"):
        tiny_env_factory(reward="budget", macs_target=1.5)


def test_render_is_a_table(tiny_env_factory):
    env = tiny_env_factory()
    env.reset(seed=0)
    env.step({a: 5 for a in env.agents})
    text = env.render()
    assert "layer_3" in text and "MACs" in text and "reward" in text


def test_infos_are_fixed_shape_floats_with_the_same_keys_everywhere(tiny_env_factory):
    env = tiny_env_factory()
    _, infos = env.reset(seed=0)
    seen = [infos]
    while env.agents:
        seen.append(env.step({a: 7 for a in env.agents})[4])
    for infos in seen:
        assert set(infos) == set(env.possible_agents)
        for info in infos.values():
            assert tuple(info) == INFO_KEYS
            assert all(type(v) is float and np.isfinite(v) for v in info.values())
            # float32 (TorchRL's info dtype) keeps them to float32 precision: no integer counts above 2**24
            assert all(abs(float(np.float32(v)) - v) <= 1e-6 * max(1.0, abs(v)) for v in info.values())
    assert seen[0]["layer_0"]["mmacs"] == pytest.approx(env.base_macs / 1e6)
    assert seen[0]["layer_0"]["mparams"] == pytest.approx(env.base_params / 1e6)
    # the plan: the public accessors, or the opt-in info key
    assert env.measured_plans()[-1]["plan"] == env.plan
    env = tiny_env_factory(plan_info=True)
    _, infos = env.reset(seed=0)
    assert infos["layer_0"]["plan"] == env.plan.to_dict()


def test_render_before_reset_shows_the_unpruned_network(tiny_env_factory):
    text = tiny_env_factory().render()
    assert "not reset yet" in text and "step 0/3" in text and "layer_3" in text


def test_the_callers_model_keeps_its_mode_and_weights(tiny_env_factory):
    import copy

    from pruning_env.envs.env import FilterPruningEnv

    source = tiny_env_factory()
    model = copy.deepcopy(source.base_model).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    env = FilterPruningEnv(model, source.splits, source.config)
    env.reset(seed=0)
    env.step({a: 5 for a in env.agents})
    assert model.training and all(m.training for m in model.modules())
    assert env.base_model is not model and not env.base_model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # an eval-mode model on the env's device needs no copy
    model.eval()
    assert FilterPruningEnv(model, source.splits, source.config).base_model is model


def test_registry_and_make():
    ids = pruning_env.list_envs()
    assert "pruning_env/Tiny-v0" in ids and "pruning_env/VGG16-CIFAR10-v0" in ids
    assert "pruning_env/ResNet56-CIFAR100-v0" in ids and "pruning_env/AlexNet-CIFAR10-v0" in ids
    import pettingzoo

    env = pettingzoo.make("parallel", "pruning_env/Tiny-v0", max_cycles=4)
    assert env.config.episode_length == 4
    assert pruning_env.make("pruning_env/Tiny-v0").config.episode_length == 3
    with pytest.raises(ValueError, match="unknown env id.*Tiny-v0"):
        pruning_env.make("pruning_env/Nope-v0")


@pytest.mark.cifar
def test_vgg16_cifar10_passes_the_pettingzoo_tests(cifar_vgg16):
    model, splits = cifar_vgg16

    def make():
        return make_benchmark_env("vgg16", "cifar10", model=model, splits=splits, device="cpu", eval_size=100)

    env = make()
    assert len(env.possible_agents) == 13
    # a few cycles cover the API's checks (episodes end after 3 steps); Tiny-v0 runs the long ones
    parallel_api_test(env, num_cycles=3)
    api_test(parallel_to_aec(make()), num_cycles=3)
    state_test(parallel_to_aec(make()), make(), num_cycles=2)
    module = SimpleNamespace(
        parallel_env=lambda max_cycles: make_benchmark_env("vgg16", "cifar10", model=model, splits=splits,
                                                           device="cpu", eval_size=100, max_cycles=max_cycles),
        env=lambda max_cycles: parallel_to_aec(module.parallel_env(max_cycles)),
    )
    max_cycles_test(module)


@pytest.mark.cifar
def test_pettingzoo_make_finds_a_registered_cifar_env_with_your_model(cifar_vgg16):
    import pettingzoo

    model, splits = cifar_vgg16
    env = pettingzoo.make("parallel", "pruning_env/VGG16-CIFAR10-v0", model=model, splits=splits, eval_size=100)
    assert len(env.possible_agents) == 13


def test_every_registered_id_parses_to_the_network_and_data_it_was_registered_with(tiny_env_factory):
    import pettingzoo

    from pruning_env.envs.registry import parse_env_id

    ids = pruning_env.list_envs()
    for env_id in ids:
        parts = parse_env_id(env_id)
        kwargs = pettingzoo.parallel_registry[env_id].kwargs
        if kwargs:  # a CIFAR id: make_benchmark_env(net=..., dataset=...)
            assert (parts.net, parts.dataset) == (kwargs["net"], kwargs["dataset"]), env_id
            assert parts.num_classes == {"cifar10": 10, "cifar100": 100}[parts.dataset], env_id
    tiny = parse_env_id(next(i for i in ids if "/Tiny-" in i))
    assert (tiny.net, tiny.dataset) == ("tiny", "synthetic")
    assert tiny.num_classes == tiny_env_factory().splits.num_classes
    for bad in ("pruning_env/Nope-v0", "pruning_env/VGG16-MNIST-v0", "VGG16-CIFAR10-v0", "pruning_env/VGG16-CIFAR10"):
        with pytest.raises(ValueError, match="unknown env id"):
            parse_env_id(bad)
