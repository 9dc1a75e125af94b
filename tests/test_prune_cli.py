"""The one-shot pruning CLI (python -m pruning_env.prune) on a tiny synthetic-data checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pruning_env.cli.prune import main
from pruning_env.core import checkpoint as ckpt
from pruning_env.core.models import channel_spec
from pruning_env.engine.plan import PruningPlan
from pruning_env.training.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A VGG-11 (width 0.125) trained for 3 epochs on the synthetic data set."""
    path = tmp_path_factory.mktemp("base") / "base.pt"
    train(TrainConfig(dataset="synthetic", net="vgg11", width=0.125, epochs=3, batch_size=64, lr=0.05,
                      out=str(path), progress=False, device="cpu"))
    return path


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr().out.strip().splitlines()
    return code, out


def test_dsfp_pruning_with_kd_finetuning_writes_checkpoint_and_report(base, tmp_path, capsys):
    out = tmp_path / "pruned.pt"
    code, lines = _run(capsys, "--checkpoint", base, "--criterion", "dsfp", "--direction", "high", "--kl", "fisher",
                       "--rate", "0.7", "--finetune-epochs", "2", "--kd", "--bn-recal-batches", "4",
                       "--latency-repeats", "2", "--device", "cpu", "--out", out, "--no-progress")
    assert code == 0
    last = json.loads(lines[-1])
    assert {"macs_reduction", "params_reduction", "test_acc", "baseline_test_acc", "retention", "criterion",
            "direction"} <= set(last)
    assert last["criterion"] == "dsfp" and last["direction"] == "high" and last["kl"] == "fisher"
    assert 0.8 < last["macs_reduction"] < 1 and 0.8 < last["params_reduction"] < 1
    assert last["retention"] == pytest.approx(last["test_acc"] / last["baseline_test_acc"])
    report = json.loads(out.with_suffix(".json").read_text())
    stages = report["accuracy"]
    assert all(stages[s] is not None for s in ("after_pruning", "after_bn_recal", "after_finetune"))
    assert report["test_acc"] == stages["after_finetune"]["test"]
    assert set(report["latency_ms"]["pruned"]) == {"batch_1", "batch_64"}
    assert report["finetune"]["epochs"] == 2
    loaded = ckpt.load(out)  # loads by itself
    plan = PruningPlan.from_dict(loaded.plan)
    assert list(channel_spec(loaded.model).convs) == [plan.keep_count(n) for n in plan.layers]
    assert loaded.extra["criterion"] == "dsfp" and loaded.extra["direction"] == "high"
    assert loaded.extra["kl"] == "fisher" and loaded.metrics["test_acc"] == last["test_acc"]
    assert loaded.dataset == "synthetic"


def test_saved_plan_and_data_free_criterion(base, tmp_path, capsys):
    out = tmp_path / "l1.pt"
    code, lines = _run(capsys, "--checkpoint", base, "--criterion", "l1", "--rate", "0.5", "--round-to", "4",
                       "--bn-recal-batches", "0", "--latency-repeats", "0", "--device", "cpu", "--out", out,
                       "--no-progress")
    assert code == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["accuracy"]["after_bn_recal"] is None and report["latency_ms"]["pruned"] is None
    assert all(v["kept"] % 4 == 0 for v in report["layers"].values())
    plan = PruningPlan.from_dict(ckpt.load(out).plan)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(plan.to_json())
    code, lines = _run(capsys, "--checkpoint", base, "--plan", plan_file, "--bn-recal-batches", "0",
                       "--latency-repeats", "0", "--device", "cpu", "--out", tmp_path / "again.pt", "--no-progress")
    assert code == 0 and json.loads(lines[-1])["macs_reduction"] == report["macs_reduction"]
    assert PruningPlan.from_dict(ckpt.load(tmp_path / "again.pt").plan) == plan


@pytest.mark.parametrize("args, message", [
    (["--criterion", "dsfp", "--direction", "low", "--rate", "1.0"], "rate"),
    (["--criterion", "dsfp", "--direction", "sideways"], "invalid choice"),
    (["--criterion", "l1", "--direction", "high"], "dsfp only"),
    (["--criterion", "l1", "--net", "resnet20"], "not a resnet20"),
])
def test_bad_input_exits_2_with_a_message(base, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(base), "--out", str(tmp_path / "x.pt"), "--no-progress", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_checkpoint_unknown_criterion_and_unfitting_plan(base, tmp_path, capsys):
    for args, message in [
        (["--checkpoint", str(tmp_path / "nope.pt"), "--criterion", "l1"], "does not exist"),
        (["--checkpoint", str(base), "--criterion", "magic"], "invalid choice"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main([*args, "--out", str(tmp_path / "x.pt")])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    bad_plan = tmp_path / "bad.json"
    bad_plan.write_text(PruningPlan({"features.0": [0, 1]}, {"features.0": 64}).to_json())  # made for width 1.0
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(base), "--plan", str(bad_plan), "--out", str(tmp_path / "x.pt"), "--no-progress"])
    assert exc.value.code == 2 and "made for 64 filters" in capsys.readouterr().err


def test_cli_process_reports_errors_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pruning_env.prune", "--checkpoint", str(tmp_path / "missing.pt"),
                           "--criterion", "l1", "--out", str(tmp_path / "x.pt")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
