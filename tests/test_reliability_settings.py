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
