"""PettingZoo API conformance of the pruning env (Tiny-v1 and VGG-16 on the real CIFAR-10)."""

import importlib
import inspect
import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pettingzoo import ParallelEnv
from pettingzoo.test import api_test, max_cycles_test, parallel_api_test, state_test
from pettingzoo.utils import parallel_to_aec

import pruning_env
from pruning_env import filter_pruning_v1
from pruning_env.envs import plans
from pruning_env.envs.env import INFO_KEYS, FilterPruningEnv
from pruning_env.envs.measure import Measurement
from pruning_env.envs.registry import TINY_ID, VERSION, check_env_id, make_benchmark_env


def test_tiny_passes_the_pettingzoo_tests(tiny_env_factory):
    parallel_api_test(tiny_env_factory(), num_cycles=30)
    api_test(parallel_to_aec(tiny_env_factory()), num_cycles=30)
    state_test(parallel_to_aec(tiny_env_factory()), tiny_env_factory(), num_cycles=10)
    max_cycles_test(filter_pruning_v1)


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
    assert env.measured_plans()[-1].plan == env.plan
    env = tiny_env_factory(plan_info=True)
    _, infos = env.reset(seed=0)
    assert infos["layer_0"]["plan"] == env.plan.to_dict()


def test_render_before_reset_shows_the_unpruned_network(tiny_env_factory):
    text = tiny_env_factory().render()
    assert "not reset yet" in text and "step 0/3" in text and "layer_3" in text


def test_the_callers_model_keeps_its_mode_and_weights(tiny_env_factory):
    import copy

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
    assert "pruning_env/Tiny-v1" in ids and "pruning_env/VGG16-CIFAR10-v1" in ids
    assert "pruning_env/ResNet56-CIFAR100-v1" in ids and "pruning_env/AlexNet-CIFAR10-v1" in ids
    assert all(i.endswith(f"-v{VERSION}") for i in ids) and TINY_ID in ids
    import pettingzoo

    env = pettingzoo.make("parallel", "pruning_env/Tiny-v1", max_cycles=4)
    assert env.config.episode_length == 4
    assert pruning_env.make("pruning_env/Tiny-v1").config.episode_length == 3
    assert env.metadata["name"] == "filter_pruning_v1"
    with pytest.raises(ValueError, match="unknown env id.*Tiny-v1"):
        pruning_env.make("pruning_env/Nope-v1")


@pytest.mark.parametrize("old,new", [("pruning_env/Tiny-v0", "pruning_env/Tiny-v1"),
                                     ("pruning_env/VGG16-CIFAR10-v0", "pruning_env/VGG16-CIFAR10-v1"),
                                     ("pruning_env/ResNet56-CIFAR100-v0", "pruning_env/ResNet56-CIFAR100-v1")])
def test_a_v0_id_is_removed_with_an_error_naming_its_v1_id_and_what_changed(old, new):
    with pytest.raises(ValueError, match=f"{old!r} was removed: use {new!r}") as err:
        pruning_env.make(old)
    assert "default reward" in str(err.value) and "28 + K" in str(err.value) and "INFO_KEYS" in str(err.value)
    assert old not in pruning_env.list_envs()
    with pytest.raises(ValueError, match="was removed"):
        check_env_id(old)
    assert check_env_id(new) == new


def test_v0_ids_are_refused_by_pettingzoo_gymnasium_and_the_versioned_module():
    import gymnasium
    import pettingzoo

    with pytest.raises(Exception, match="v1") as err:  # PettingZoo's VersionNotFound names the version there is
        pettingzoo.make("parallel", "pruning_env/Tiny-v0")
    assert "v0" in str(err.value)
    with warnings.catch_warnings(), pytest.raises(gymnasium.error.Error, match="Tiny-Joint-v1"):
        warnings.simplefilter("ignore", DeprecationWarning)  # Gymnasium warns, then raises DeprecatedEnv
        gymnasium.make("pruning_env/Tiny-Joint-v0")
    for view in ("Joint", "Sequential", "SequentialDiscrete"):
        assert f"pruning_env/Tiny-{view}-v1" in gymnasium.registry
        assert f"pruning_env/Tiny-{view}-v0" not in gymnasium.registry
    sys.modules.pop("pruning_env.filter_pruning_v0", None)
    with pytest.raises(ImportError, match="use pruning_env.filter_pruning_v1"):
        importlib.import_module("pruning_env.filter_pruning_v0")


def test_the_version_history_is_documented():
    doc = FilterPruningEnv.__doc__
    history = doc[doc.index("Version History"):]
    assert "* v1" in history and "* v0" in history and "-v0`` ids are removed" in history
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Version history"):]
    assert "**v1** (current)" in section and "**v0** (removed)" in section


# The env's own surface beyond PettingZoo's ParallelEnv: each name documented in its "Surface" section.
SURFACE = {
    # settings and data
    "config", "splits", "device", "input_shape", "plan_info",
    # the unpruned network
    "base_model", "base_sensitivities", "layers", "layer_names", "base_macs", "base_params", "macs_model",
    "baseline_acc",
    "static_features", "calibration_batch",
    # the episode
    "plan", "current_step",
    # plans of this network
    "measure", "measured_plans", "plan_from_rates", "build_network", "measure_network",
    # accounting and the replica hook
    "num_evaluations", "timings", "measurement_source",
}


def test_the_surface_is_small_and_documented(tiny_env_factory):
    env = tiny_env_factory()
    base = {n for n in dir(ParallelEnv) if not n.startswith("_")}
    pettingzoo_api = {"possible_agents", "agents", "observation_spaces", "action_spaces", "state_space",
                      "render_mode", "metadata"}
    own = {n for n in dir(env) if not n.startswith("_")} - base - pettingzoo_api
    assert own == SURFACE
    doc = FilterPruningEnv.__doc__
    surface = doc[doc.index("Surface\n"):doc.index("Version History")]
    assert [n for n in sorted(SURFACE) if n not in surface] == []
    methods = {n for n in SURFACE if inspect.ismethod(getattr(env, n))}
    assert methods == {"measure", "measured_plans", "plan_from_rates", "build_network", "measure_network"}


@pytest.mark.parametrize("name,replacement", [
    ("evaluate_plan", "env.measure(plan)"), ("measurement", "env.measure(plan)"),
    ("pruned_model", "env.build_network(env.plan)"), ("widths", "env.plan.widths"),
    ("keep_count", "pruning_env.envs.plans.keep_count"), ("uniform_plan", "pruning_env.envs.plans.uniform_plan"),
    ("objective_of", "pruning_env.envs.plans.objective_of")])
def test_a_removed_name_raises_an_error_naming_its_replacement(tiny_env_factory, name, replacement):
    env = tiny_env_factory()
    with pytest.raises(AttributeError, match=f"{name} was removed in v1; use {re.escape(replacement)}"):
        getattr(env, name)
    with pytest.raises(AttributeError, match="has no attribute 'nosuch'"):
        env.nosuch  # noqa: B018 - other names: the usual error
    assert not hasattr(env, name)


def test_the_companion_helpers_match_the_env(tiny_env_factory):
    env = tiny_env_factory(exact_budget=False)
    env.reset(seed=0)
    env.step({a: 6 for a in env.agents})
    assert [plans.keep_count(env, n, 0.6) for n in env.layer_names] == list(env.plan.keep_counts().values())
    assert plans.keep_count(env, 0, 0.6) == plans.keep_count(env, env.layer_names[0], 0.6)
    assert plans.uniform_plan(env, 0.6) == env.plan  # one step at 0.6 everywhere from the unpruned network
    m = env.measure(env.plan)
    assert plans.objective_of(env, m.acc, m.macs, m.quality) == m.objective
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        plans.keep_count(env, "nope", 0.5)
    with pytest.raises(ValueError, match="out of range"):
        plans.keep_count(env, 9, 0.5)
    assert set(plans.__all__) == {"keep_count", "uniform_plan", "objective_of", "REMOVED_FROM_ENV", "reference_plans",
                                  "REFERENCES", "gradual_plan"}


def test_the_package_api_is_small_and_documented():
    doc = pruning_env.__doc__
    assert "Measurement" in pruning_env.__all__ and pruning_env.Measurement is Measurement
    assert [n for n in pruning_env.__all__ if n != "__version__" and f"`{n}`" not in doc] == []


@pytest.mark.cifar
def test_vgg16_cifar10_passes_the_pettingzoo_tests(cifar_vgg16):
    model, splits = cifar_vgg16

    def make():
        return make_benchmark_env("vgg16", "cifar10", model=model, splits=splits, device="cpu", eval_size=100)

    env = make()
    assert len(env.possible_agents) == 13
    # a few cycles cover the API's checks (episodes end after 3 steps); Tiny-v1 runs the long ones
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
    env = pettingzoo.make("parallel", "pruning_env/VGG16-CIFAR10-v1", model=model, splits=splits, eval_size=100)
    assert len(env.possible_agents) == 13


def test_every_registered_id_parses_to_the_network_and_data_it_was_registered_with(tiny_env_factory):
    import pettingzoo

    from pruning_env.envs.registry import parse_env_id

    ids = [i for i in pruning_env.list_envs() if "-Surrogate-" not in i]  # surrogates: no network (refused)
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
