"""The benchmark modules run end to end with the tiniest settings (synthetic data, no CIFAR needed)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import common, criteria_report
from benchmarks import criteria as criteria_bench
from benchmarks import env_step as env_step_bench
from benchmarks import latency as latency_bench
from benchmarks import surgery_speed as surgery_bench

REPO = Path(__file__).resolve().parents[1]

# (module, its config class, the flags of its command lines on record, which must keep working)
BENCHMARKS = {
    "criteria": (criteria_bench, criteria_bench.CriteriaBenchConfig,
                 ["--nets", "--width", "--rates", "--criteria", "--seeds", "--all-seeds", "--dataset", "--data-dir",
                  "--baseline-epochs", "--baseline-seed", "--train-missing", "--no-train-missing", "--calib-size",
                  "--calib-seed", "--bn-recal-batches", "--finetune-epochs", "--finetune-limit", "--finetune-lr",
                  "--finetune-optimizer", "--eval-limit", "--device", "--threads", "--out", "--scores-cache",
                  "--resume", "--no-resume", "--report-only", "--progress", "--no-progress"]),
    "env_step": (env_step_bench, env_step_bench.EnvStepConfig,
                 ["--nets", "--steps", "--data-dir", "--no-naive", "--threads", "--out"]),
    "latency": (latency_bench, latency_bench.LatencyConfig,
                ["--nets", "--rates", "--criterion", "--batch-sizes", "--repeats", "--warmup", "--threads", "--seed",
                 "--out", "--progress", "--no-progress"]),
    "surgery_speed": (surgery_bench, surgery_bench.SurgerySpeedConfig,
                      ["--nets", "--rate", "--repeats", "--threads", "--seed", "--out", "--no-write"]),
}


def _last_json(text: str) -> dict:
    """The final line of a benchmark's stdout: one JSON object."""
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _restore_threads():
    """The scripts set torch's thread count (--threads); give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_help_documents_every_flag(name):
    module, cls, recorded = BENCHMARKS[name]
    parser = common.config_parser(cls, name, module.__doc__)
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and not action.help.startswith("(default"), action.option_strings
    missing = [f for f in recorded if f not in flags]
    assert not missing, missing
    assert parser.prog == f"python -m benchmarks.{name}"
    if any(f.name == "resume" for f in dataclasses.fields(cls)):
        assert cls().resume is False  # one style: a benchmark resumes only when asked to


def test_criteria_benchmark_smoke(tmp_path, capsys):
    bench = criteria_bench
    out = tmp_path / "criteria.md"
    args = ["--dataset", "synthetic", "--nets", "vgg11", "--width", "0.125", "--rates", "0.5",
            "--criteria", "dsfp-low-fisher", "l1", "random", "--seeds", "0", "1", "--baseline-epochs", "1",
            "--finetune-epochs", "1", "--finetune-limit", "64", "--eval-limit", "64", "--bn-recal-batches", "1",
            "--threads", "1", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert bench.main(args) == 0
    captured = capsys.readouterr()
    assert _last_json(captured.out) == {"report": str(out), "json": str(out.with_suffix(".json")), "rows": 4,
                                        "rows_run": 4}
    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["rows"]
    assert sorted((r["variant"], r["seed"]) for r in rows) == [("dsfp-low-fisher", 0), ("l1", 0), ("random", 0),
                                                               ("random", 1)]
    for r in rows:
        assert r["rate"] == 0.5 and 0.5 < r["macs_reduction"] < 1 and 0.5 < r["params_reduction"] < 1
        for stage in ("pruned", "bn", "ft"):
            assert 0 <= r[f"test_{stage}"] <= 100 and r[f"retention_{stage}"] is not None
        assert r["finetune_images"] == 64
    assert data["baselines"]["vgg11"]["trained_by_benchmark"] is True
    assert data["runs"][0]["command"].startswith("python -m benchmarks.criteria --dataset synthetic")
    md = out.read_text()
    for text in ("## Baselines", "## vgg11", "| dsfp-low-fisher | 50% |", "| random | 50% |", "± ",
                 "## Conclusion", "DSFP vs baselines", "Commit:", "Machine:", "Wall time:"):
        assert text in md, text
    assert out.with_suffix(".scores.pt").is_file()

    # Resume (when asked to): nothing is recomputed, and an added criterion only adds its own rows.
    assert bench.main([*args, "--resume"]) == 0
    captured = capsys.readouterr()
    assert "0 rows to run (4 already" in captured.err
    assert _last_json(captured.out)["rows_run"] == 0
    args2 = [a if a != "l1" else "dsfp-high-fisher" for a in args]
    assert bench.main([*args2, "--resume"]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["rows"]) == 5
    assert "DSFP direction: " in out.read_text()

    # Another setup in the same file is refused instead of mixed in.
    assert bench.main([*args, "--resume", "--bn-recal-batches", "2"]) == 2

    # Without --resume (the default) the run starts over.
    capsys.readouterr()
    assert bench.main(args) == 0
    assert "4 rows to run (0 already" in capsys.readouterr().err
    assert len(json.loads(out.with_suffix(".json").read_text())["rows"]) == 4


def test_criteria_report_only_rebuilds_the_report(tmp_path, capsys):
    """--report-only reads the JSON alone, and a stored setup's recipe is named as it was."""
    data = json.loads((REPO / "benchmarks" / "results" / "criteria_ft3.json").read_text())
    (tmp_path / "r.json").write_text(json.dumps(data))
    assert criteria_bench.main(["--report-only", "--out", str(tmp_path / "r.md")]) == 0
    assert _last_json(capsys.readouterr().out)["rows"] == len(data["rows"])
    md = (tmp_path / "r.md").read_text()
    assert "Command: `python -m benchmarks.criteria " in md
    assert ("fine-tuning: 3 epoch(s) of knowledge distillation from the unpruned network (T = 4, alpha 0.5 -> 0.1, "
            "sgd lr 0.01 cosine) on all training images") in md
    assert "uniform per-layer rate (`plan_uniform`, min 1 filter kept); BN recalibration on 10 training batches " \
           "of 128;" in md


def test_criteria_config_keeps_the_stored_setups():
    """The recorded command lines still give the setups stored with their results (so --resume accepts them)."""
    import shlex

    for name in ("criteria.json", "criteria_ft3.json"):
        data = json.loads((REPO / "benchmarks" / "results" / name).read_text())
        for run in data["runs"]:
            cfg = criteria_bench.parse_config(shlex.split(run["command"])[3:])
            assert cfg.setup() == data["setup"], name
    # --finetune-limit 0 still means all training images; a changed recipe is part of the setup.
    cfg = criteria_bench.parse_config(["--finetune-limit", "0", "--temperature", "2", "--round-to", "4"])
    assert cfg.finetune.train_limit is None and cfg.finetune.temperature == 2.0 and cfg.rule.round_to == 4
    setup = cfg.setup()
    assert setup["finetune_limit"] == 0 and setup["finetune_temperature"] == 2.0 and setup["round_to"] == 4
    with pytest.raises(SystemExit):
        criteria_bench.parse_config(["--rates", "1.5"])


def test_score_bank_matches_criteria_score():
    """The cached-component DSFP fusion is exactly what pruning_env.criteria.score computes."""
    from pruning_env import criteria
    from pruning_env.core.models import build

    bench = criteria_bench
    torch.manual_seed(0)
    model = build("tiny", num_classes=4, width=1.0).eval()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    bank = bench.ScoreBank(model, names, x, y, {}, "k", lambda: None)
    for variant in ("dsfp-low-exact", "dsfp-low-fisher", "dsfp-high-fisher", "taylor", "kl", "kl-fisher", "l1",
                    "random"):
        v = bench.parse_variant(variant)
        opts = {"direction": v.direction} if v.direction else {}
        if v.kl:
            opts["kl"] = v.kl
        if v.criterion == "random":
            opts["seed"] = 3
        ref = criteria.score(model, x, y, v.criterion, layers=names, **opts)
        got, _ = bank.scores(v, seed=3)
        assert set(got) == set(ref)
        for n in names:
            torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0)
    with pytest.raises(ValueError):
        bench.parse_variant("dsfp-sideways-exact")


def test_latency_benchmark_smoke(tmp_path, capsys):
    bench = latency_bench
    out = tmp_path / "latency.md"
    assert bench.main(["--nets", "vgg11:0.125", "--rates", "0", "0.5", "--repeats", "2", "--warmup", "1",
                       "--batch-sizes", "1", "2", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    md = out.read_text()
    for col in ("net", "width", "rate", "MACs ratio", "params ratio", "latency b1 ms", "speed-up b1",
                "latency b2 ms", "speed-up b2"):
        assert f"| {col} |" in md or f"| {col}" in md, col
    assert "| vgg11 | 0.125 | 0% | 1.000 | 1.000 |" in md
    assert "| vgg11 | 0.125 | 50% |" in md
    assert "Command: `python -m benchmarks.latency --nets vgg11:0.125" in md
    stored = json.loads(out.with_suffix(".json").read_text())
    rows = stored["rows"]
    assert [r["rate"] for r in rows] == pytest.approx([0.0, 0.5], abs=0)
    assert rows[1]["macs_ratio"] < 0.5 and rows[1]["ms_b1"] > 0
    assert stored["args"]["batch_sizes"] == [1, 2] and stored["args"]["round_to"] == 1
    assert out.with_suffix(".png").is_file()
    assert _last_json(capsys.readouterr().out)["rows"] == rows


def test_env_step_benchmark_smoke(tmp_path, capsys):
    naive = [] if _has_torch_pruning() else ["--no-naive"]
    out = tmp_path / "env_step.md"
    assert env_step_bench.main(["--nets", "tiny", "--steps", "2", "--threads", "1", "--out", str(out), *naive]) == 0
    md = out.read_text()
    assert "Command: `python -m benchmarks.env_step --nets tiny" in md and "| tiny | trained (Tiny-v1 cache) |" in md
    (row,) = _last_json(capsys.readouterr().out)["rows"]
    for suffix in ("", "_recal"):  # both measured side by side in one run
        assert row[f"step_ms{suffix}"] > 0 and row[f"steps_per_s{suffix}"] > 0 and row[f"ratio_bare{suffix}"] > 0
        for k in ("scoring", "surgery", "bn_recal", "evaluation", "other"):
            assert 0 <= row[f"{k}{suffix}"] <= 1, (k, suffix)
    assert row["scoring"] > 0 and row["evaluation"] > 0 and row["bn_recal_recal"] > 0
    if not naive:
        assert row["naive_ms"] > 0 and row["ratio_naive"] > 0
    # The env is read through its public surface only.
    source = (REPO / "benchmarks" / "env_step.py").read_text()
    assert not re.search(r"\benv\._", source)


def test_surgery_speed_runs_as_a_module(tmp_path):
    """``python -m benchmarks.surgery_speed`` from the repository root, ending with one JSON line."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.surgery_speed", "--nets", "vgg11:0.125", "--repeats", "1",
                           "--no-write"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = _last_json(proc.stdout)
    assert result["report"] is None
    (row,) = result["rows"]
    assert row["net"] == "vgg11 w0.125" and row["layers"] > 0 and 0.5 < row["macs_reduction"] < 1
    if _has_torch_pruning():
        assert row["max_abs_diff"] < 1e-4


def _has_torch_pruning() -> bool:
    return importlib.util.find_spec("torch_pruning") is not None


def test_baseline_recipe_description_names_every_augmentation():
    from pruning_env.training.train import TrainConfig

    describe = criteria_report.describe_training
    now = describe(dataclasses.asdict(TrainConfig(aug_copies=2, ema_decay=0.999, cutout=8)))
    assert "crop (padding 4) + flip + Cutout 8, 2 augmented copies per image, weight EMA 0.999, seed 0" in now
    legacy = {"epochs": 30, "lr": 0.1, "schedule": "onecycle", "batch_size": 128, "weight_decay": 5e-4,
              "label_smoothing": 0.1, "seed": 0, "val_fraction": 0.1}  # a checkpoint from before these options
    assert describe(legacy).endswith("label smoothing 0.1, crop (padding 4) + flip, seed 0, val split 0.1")
    assert describe(None) == "unknown recipe"
