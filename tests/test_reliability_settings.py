"""Issue 14, case 4 (settings): every numeric flag of every CLI and every config field is validated
(finite, in range) before any work, and the message names the flag."""

import dataclasses
import math
import typing

import pytest

from pruning_env.cli import marl, prune
from pruning_env.cli import train as train_cli
from pruning_env.core.config import SettingError, flat_names, with_overrides
from pruning_env.envs.config import EnvConfig
from pruning_env.search import SearchConfig
from pruning_env.training.finetune import FinetuneConfig
from pruning_env.training.train import TrainConfig

CLIS = {"train": (train_cli.main, TrainConfig), "prune": (prune.main, prune.PruneConfig),
        "marl": (marl.main, marl.RunConfig)}


def _leaf_fields(cls):
    """{flat name: (field, annotation)} of every leaf setting that has a flag."""
    out = {}
    for flat, path in flat_names(cls).items():
        owner = cls
        for part in path[:-1]:
            owner = next(f for f in dataclasses.fields(owner) if f.name == part).metadata["nested"]
        f = next(f for f in dataclasses.fields(owner) if f.name == path[-1])
        out[flat] = (f, typing.get_type_hints(owner)[f.name], owner)
    return out


def _numeric(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    base = args[0]
    if typing.get_origin(base) in (tuple, list):
        base = typing.get_args(base)[0]
    return base if base in (int, float) and base is not bool else None


def _numeric_flags():
    for cli, (_, cls) in CLIS.items():
        for flat, (f, tp, _owner) in _leaf_fields(cls).items():
            if _numeric(tp) is not None and f.metadata.get("cli") is not False:
                yield cli, flat


NUMERIC = list(_numeric_flags())


def test_every_numeric_setting_declares_a_range():
    for cls in (TrainConfig, prune.PruneConfig, marl.RunConfig):
        for f, tp, owner in _leaf_fields(cls).values():
            if _numeric(tp) is not None:
                assert "min" in f.metadata or "max" in f.metadata, f"{owner.__name__}.{f.name} has no range"


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
@pytest.mark.parametrize("cli,flat", NUMERIC, ids=[f"{c}:{n}" for c, n in NUMERIC])
def test_every_numeric_flag_rejects_nan_inf_and_negative(cli, flat, value, tmp_path, capsys, monkeypatch):
    main, _ = CLIS[cli]
    monkeypatch.chdir(tmp_path)
    flag = "--" + flat.replace("_", "-")
    with pytest.raises(SystemExit) as exc:
        main([flag, value, "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # failed before any work


@pytest.mark.parametrize("cls,name,value", [
    (FinetuneConfig, "lr", math.nan), (FinetuneConfig, "temperature", math.inf), (FinetuneConfig, "alpha_end", 1.5),
    (TrainConfig, "lr", -0.1), (TrainConfig, "momentum", math.nan), (TrainConfig, "batch_size", 0),
    (TrainConfig, "width", 0.0), (TrainConfig, "epochs", 2.5), (EnvConfig, "lam", math.nan),
    (EnvConfig, "budget_penalty", -math.inf), (EnvConfig, "macs_target", 1.5), (SearchConfig, "plans", 0),
])
def test_library_configs_reject_bad_values_at_construction(cls, name, value):
    with pytest.raises(SettingError, match=f"--{name.replace('_', '-')}: {name} must be"):
        cls(**{name: value})


def test_nested_settings_are_named_by_their_composed_flag():
    with pytest.raises(SettingError, match="--finetune-lr: finetune_lr must be > 0, got nan"):
        with_overrides(prune.PruneConfig(), finetune_lr=math.nan)
    with pytest.raises(ValueError, match="--rates"):
        with_overrides(marl.RunConfig(), rates=(0.1, math.nan))
    with pytest.raises(SettingError, match="--net: net must be one of"):
        TrainConfig(net="vgg17")


def test_train_batch_size_zero_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["--batch-size", "0", "--dataset", "synthetic"])
    assert exc.value.code == 2 and "--batch-size" in capsys.readouterr().err


def test_algo_config_numbers_must_be_finite():
    with pytest.raises(ValueError, match="--algo-config: qmix.lr must be a finite number"):
        SearchConfig(algo_config='{"qmix": {"lr": NaN}}')


# Issue 25, section 1, cases 2 and 3: --algo-config (and every dict setting) refuses what it would ignore or what
# would fail deep inside, before any work, naming the setting.

import json  # noqa: E402

import agents  # noqa: E402
from benchmarks import marl as marl_bench  # noqa: E402

MARL = ["--env", "pruning_env/Tiny-v1", "--preset", "smoke", "--plans", "6", "--latency-repeats", "0",
        "--no-progress", "--device", "cpu"]


def _marl_refuses(capsys, monkeypatch, tmp_path, algo, table):
    monkeypatch.setattr(marl, "make_env", lambda cfg: pytest.fail("work started"))
    with pytest.raises(SystemExit) as exc:
        marl.main([*MARL, "--algo", algo, "--logdir", str(tmp_path / "r"), "--algo-config", json.dumps(table)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()
    return err.splitlines()[-1]


@pytest.mark.parametrize("algo,table", [("qmix", {"qmixx": {"lr": 0.1}}), ("vdn", {"qmix": {"lr": 0.1}}),
                                        ("qmix", {"qmix": {}, "amc": {"tau": 0.1}})])
def test_an_algo_config_entry_for_an_algorithm_not_run_is_refused(capsys, monkeypatch, tmp_path, algo, table):
    err = _marl_refuses(capsys, monkeypatch, tmp_path, algo, table)
    unused = next(k for k in table if k != algo)
    assert f"--algo-config: {unused!r} is not an algorithm this run runs" in err and err.endswith(algo)


def test_an_unknown_algo_config_setting_lists_the_valid_ones(capsys, monkeypatch, tmp_path):
    err = _marl_refuses(capsys, monkeypatch, tmp_path, "qmix", {"qmix": {"nosuch": 1}})
    assert "--algo-config: qmix has no setting nosuch" in err and "lr" in err and "eps_end" in err


@pytest.mark.parametrize("algo,key,value,reason", [
    ("qmix", "lr", -1, "qmix.lr must be > 0, got -1"),
    ("vdn", "eps_end", 1.5, "vdn.eps_end must be in [0, 1], got 1.5"),
    ("qmix", "hidden_dim", 2.5, "qmix.hidden_dim must be >= 1, got 2.5"),
    ("qmix", "double_q", "no", "qmix.double_q must be true or false, got 'no'"),
    ("qmix", "optimizer", "sgd", "qmix.optimizer must be one of adam, rmsprop, got 'sgd'"),
    ("qmix", "mixer", "max", "qmix.mixer must be one of none, qmix, vdn"),
    ("qmix", "mixer_kwargs", {"width": 3}, "qmix: mixer_kwargs {'width': 3} do not fit the mixer 'qmix'"),
    ("amc", "actor_lr", 0, "amc.actor_lr must be > 0, got 0"),
    ("amc", "actor_hidden", [300, 0], "amc.actor_hidden must be >= 1, got 0"),
    ("random", "replay_best_in_evaluate", 1, "random.replay_best_in_evaluate must be true or false, got 1"),
])
def test_algo_config_values_are_checked_by_the_fields_limits(capsys, monkeypatch, tmp_path, algo, key, value, reason):
    err = _marl_refuses(capsys, monkeypatch, tmp_path, algo, {algo: {key: value}})
    assert err.startswith(f"error: --algo-config: {reason}"), err


@pytest.mark.parametrize("name", agents.list_algorithms())
def test_every_numeric_or_choice_setting_of_every_algorithm_declares_its_limits(name):
    config_cls = agents.get_algorithm(name).config_cls
    hints = typing.get_type_hints(config_cls)
    choices = [f.name for f in dataclasses.fields(config_cls)
               if typing.get_origin(hints[f.name]) is typing.Literal and "choices" not in f.metadata]
    ranges = [f.name for f in dataclasses.fields(config_cls)
              if _numeric(hints[f.name]) is not None and not {"min", "max"} & set(f.metadata)]
    assert choices == [] and ranges == []


def test_the_defaults_of_every_algorithm_pass_their_own_limits():
    from pruning_env.core.config import check_settings

    for name in agents.list_algorithms():
        cls = agents.get_algorithm(name)
        check_settings(cls.default_config())
        cls.check_config(cls.default_config())


def test_the_benchmark_refuses_an_algo_config_of_an_algorithm_it_does_not_compare(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        marl_bench.main(["--env", "pruning_env/Tiny-v1", "--algos", "qmix", "random", "--out-dir", str(tmp_path),
                         "--algo-config", '{"amc": {"tau": 0.1}}'])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "'amc' is not an algorithm this run runs" in err and "qmix, random" in err


@pytest.mark.parametrize("make,named", [(lambda: TrainConfig(progress="no"), "--progress: progress must be true"),
                                        (lambda: EnvConfig(exact_budget=1), "--exact-budget"),
                                        (lambda: TrainConfig(device=0), "--device: device must be a string")])
def test_bool_and_string_settings_must_have_their_type(make, named):
    with pytest.raises(SettingError, match=named):
        make()
