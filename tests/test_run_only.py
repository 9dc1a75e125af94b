"""Run-only settings: marked once on the option, every resume check and results key derived from the marks."""

import pytest

from benchmarks import marl as bench_marl
from benchmarks import paper_scale, reward_fidelity, scale_out
from pruning_env.cli import marl as cli_marl
from pruning_env.cli import prune as cli_prune
from pruning_env.core.config import run_only_names
from pruning_env.training import finetune as finetune_mod
from pruning_env.training import train as train_mod

# The hand-kept lists the marks replace (as they were before the marks).
OLD = {
    cli_marl.RunConfig: {"device", "progress", "logdir", "resume", "overwrite", "preset", "data_dir", "checkpoint",
                         "latency_repeats", "workers", "ray_address", "worker_threads", "lookahead"},
    cli_prune.PruneConfig: {"checkpoint", "out", "plan", "data_dir", "device", "progress", "resume", "overwrite",
                            "trust_pickle", "latency_repeats"},
    train_mod.TrainConfig: {"data_dir", "device", "out", "resume", "overwrite", "progress", "channels_last",
                            "device_data"},
    bench_marl.BenchConfig: {"algos", "seeds", "device", "threads", "out_dir", "work_dir", "resume", "progress",
                             "data_dir", "finetune_seed", "finetune_device", "finetune_progress", "workers",
                             "ray_address", "worker_threads", "lookahead"},
    reward_fidelity.FidelityConfig: {"device", "threads", "out_dir", "work_dir", "resume", "report_only", "progress",
                                     "data_dir", "bootstrap", "targets", "truth_device", "truth_progress"},
    paper_scale.PaperScaleConfig: {"device", "out", "work_dir", "resume", "dry_run", "dry_steps", "dry_calib",
                                   "progress", "smoke", "data_dir", "finetune_seed", "finetune_device",
                                   "finetune_progress"},
    finetune_mod.FinetuneConfig: {"device", "progress", "device_data", "channels_last"},
    scale_out.ScaleOutConfig: {"out_dir", "resume", "machines", "search_plans", "lookahead", "ray_address"},
}
# Where the old lists disagreed with each other about the same nested setting (the fine-tune's), or forgot one:
# the names the marks add. Each is set by the command itself (seed, device, progress: cli=False, overwritten
# from the command's own settings) or says how the fine-tune runs, as FinetuneConfig's own resume check said.
_FT = {"seed", "device", "progress", "channels_last", "device_data"}
ADDED = {
    cli_marl.RunConfig: {f"finetune_{n}" for n in _FT},
    cli_prune.PruneConfig: {f"finetune_{n}" for n in _FT},
    bench_marl.BenchConfig: {"finetune_channels_last", "finetune_device_data"},
    paper_scale.PaperScaleConfig: {"finetune_channels_last", "finetune_device_data"},
    reward_fidelity.FidelityConfig: {"truth_seed", "truth_channels_last", "truth_device_data"},
    scale_out.ScaleOutConfig: {"data_dir"},
}


@pytest.mark.parametrize("cls", list(OLD), ids=lambda c: c.__name__)
def test_derived_lists_are_the_old_hand_lists(cls):
    derived = run_only_names(cls)
    assert set(OLD[cls]) - derived == set(), "a setting the old list had is no longer run-only"
    assert derived - set(OLD[cls]) == ADDED.get(cls, set())
