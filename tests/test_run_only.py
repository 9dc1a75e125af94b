"""Run-only settings: marked once on the option, every resume check and results key derived from the marks.

(The derived lists were checked once against the eight hand-kept lists they replace: see the commit that removed
them. What is kept here are the properties every derived list must have.)
"""

import dataclasses
import json

import pytest
import torch

from benchmarks import marl as bench_marl
from benchmarks import paper_scale, reward_fidelity, scale_out
from pruning_env.cli import marl as cli_marl
from pruning_env.cli import prune as cli_prune
from pruning_env.core.config import (
    config_mismatch,
    flat_dict,
    flat_names,
    nested,
    option,
    run_only_names,
    without_run_only,
)
from pruning_env.search.parallel import WorkersConfig
from pruning_env.training import finetune as finetune_mod
from pruning_env.training import train as train_mod

COMMANDS = [cli_marl.RunConfig, cli_prune.PruneConfig, train_mod.TrainConfig, finetune_mod.FinetuneConfig,
            bench_marl.BenchConfig, reward_fidelity.FidelityConfig, paper_scale.PaperScaleConfig,
            scale_out.ScaleOutConfig]
# Where and how a run executes, in every command that has such a setting (leaf field names).
WHERE_AND_HOW = {"device", "progress", "resume", "overwrite", "data_dir", "out", "out_dir", "logdir", "work_dir",
                 "threads", "preset", "device_data", "channels_last"}


@dataclasses.dataclass
class _Inner:
    a: int = option(1, "run-only everywhere", run_only=True)
    b: int = option(2, "set by the command nesting this", run_only="nested")
    c: int = option(3, "a result")


@dataclasses.dataclass
class _Outer:
    inner: _Inner = nested(_Inner, prefix="in")
    d: int = option(4, "run-only", run_only=True)
    e: int = option(5, "'nested' at the top is not run-only", run_only="nested")


def test_run_only_names_follow_the_marks():
    assert run_only_names(_Outer) == {"in_a", "in_b", "d"}
    assert run_only_names(_Inner) == {"a"}  # alone, the nested-only mark defines the results
    assert without_run_only(_Outer, {**flat_dict(_Outer()), "gone": 0}) == {"in_c": 3, "e": 5, "gone": 0}

    @dataclasses.dataclass
    class Bad:
        x: int = option(0, "a typo'd mark", run_only="yes")

    with pytest.raises(TypeError, match="Bad.x: run_only must be True, False or 'nested'"):
        run_only_names(Bad)


def _changed(settings, name):
    return {**settings, name: ["a value no setting has"]}


@pytest.mark.parametrize("cls", COMMANDS, ids=lambda c: c.__name__)
def test_resume_checks_ignore_exactly_the_run_only_settings(cls):
    run_only = run_only_names(cls)
    assert run_only <= set(flat_names(cls))
    saved = flat_dict(cls())
    for name in saved:
        diff = config_mismatch(_changed(saved, name), saved, cls)
        assert (diff == {}) is (name in run_only), name
        key = without_run_only(cls, saved)
        assert (name in key) is (name not in run_only), name


@pytest.mark.parametrize("cls", COMMANDS, ids=lambda c: c.__name__)
def test_where_and_how_a_run_executes_is_run_only_in_every_command(cls):
    run_only = run_only_names(cls)
    for name, path in flat_names(cls).items():
        if path[-1] in WHERE_AND_HOW:
            assert name in run_only, f"{cls.__name__}: {name} says where or how the run executes"
    for f in dataclasses.fields(cls):  # the parallel workers never change a result
        if f.metadata.get("nested") is WorkersConfig:
            assert set(flat_names(WorkersConfig)) <= run_only
    for cls_, name in ((cli_marl.RunConfig, "checkpoint"), (cli_marl.RunConfig, "latency_repeats"),
                       (cli_prune.PruneConfig, "latency_repeats"), (cli_prune.PruneConfig, "trust_pickle")):
        assert name in run_only_names(cls_)


def test_train_marl_resume_refuses_exactly_the_other_settings(tmp_path):
    cfg = cli_marl.RunConfig()
    saved = flat_dict(cfg)
    state_file = tmp_path / "train_state.pt"
    for name in saved:
        torch.save({"algorithm": {}, "episodes": 0, "points": [], "best": None,
                    "run_config": _changed(saved, name)}, state_file)
        if name in run_only_names(cli_marl.RunConfig):
            cli_marl._load_state(cfg, state_file)
        else:
            with pytest.raises(ValueError, match="other settings"):
                cli_marl._load_state(cfg, state_file)


def test_train_resume_compares_exactly_the_recipe():
    cfg = train_mod.TrainConfig()
    saved = dataclasses.asdict(cfg)
    for name in saved:
        diff = train_mod.recipe_mismatch(cfg, _changed(saved, name))
        assert (diff == {}) is (name in run_only_names(train_mod.TrainConfig)), name


def test_benchmark_results_keys_leave_out_exactly_the_run_only_settings():
    for cfg, keys in ((bench_marl.BenchConfig(), lambda c: {k for d in bench_marl._keys(c) for k in d}),
                      (paper_scale.PaperScaleConfig(), lambda c: set(c.setup()))):
        assert keys(cfg) == set(flat_dict(cfg)) - run_only_names(type(cfg)), type(cfg).__name__
    fidelity = reward_fidelity.FidelityConfig()
    key = reward_fidelity._settings_key(fidelity)
    assert not key.keys() & run_only_names(reward_fidelity.FidelityConfig)
    assert set(flat_dict(fidelity)) - run_only_names(reward_fidelity.FidelityConfig) - set(
        reward_fidelity._PROXY_SET) <= key.keys()


def test_a_setting_marked_run_only_later_keeps_stored_results_resumable(tmp_path):
    cfg = dataclasses.replace(bench_marl.BenchConfig(), resume=True)
    search, ft, _ = bench_marl._keys(cfg)
    path = tmp_path / "marl.json"  # written when finetune_device_data was still part of the key
    path.write_text(json.dumps({"benchmark": "marl", "search_config": {**search, "workers": 1},
                                "finetune_config": {**ft, "finetune_device_data": True}, "runs": {}}))
    state, finetunes_resume, _ = bench_marl._load_state(path, cfg)
    assert finetunes_resume and state["search_config"]["workers"] == 1
