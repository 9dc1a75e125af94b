"""``python -m benchmarks.paper_scale`` (issue 17): the dry-run projection and the whole pipeline with --smoke on
the CPU, its resume, and bad settings refused before any work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import exit_status

from benchmarks import paper_scale

STAGES = ("baseline", "criteria", "search", "finals")


@pytest.mark.long  # an end-to-end run of the benchmark (.ci/run runs it)
def test_dry_run_then_smoke_run_then_resume(tmp_path, capsys):
    out = tmp_path / "ps.md"
    common = ["--smoke", "--device", "cpu", "--out", str(out), "--work-dir", str(tmp_path / "work"), "--no-progress"]
    assert paper_scale.main([*common, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["dry_run"] and set(summary["projected_s"]) == set(STAGES)
    assert all(v > 0 for v in summary["projected_s"].values())
    for stage in STAGES:
        assert f"projected  {stage}" in printed, stage
    assert "projected total:" in printed and not out.exists()  # a dry run writes only its projection

    assert paper_scale.main(common) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    n_rows = len(paper_scale.DEFAULT_CRITERIA) * len(paper_scale.SMOKE["uniform_rates"])
    assert len(data["rows"]) == n_rows
    assert set(data["searches"]) == set(data["finals"]) == {"qmix", "dsfp-uniform", "amc"}
    assert set(data["timings"]) == set(STAGES) and data["projection"] == pytest.approx(summary["projected_s"],
                                                                                         abs=0.05)
    report = out.read_text()
    assert f"{paper_scale.PAPER_RETENTION} %" in report and "| dsfp-low-exact | 70% |" in report
    assert "| qmix |" in report and "| finals |" in report

    capsys.readouterr()
    assert paper_scale.main([*common, "--resume"]) == 0  # everything is there: nothing runs again
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["rows"] == data["rows"] and again["finals"] == data["finals"]
    assert len(again["runs"]) == 2


@pytest.mark.parametrize("flags,message", [
    (["--algos", "nope"], "unknown algorithm"),
    (["--criteria", "dsfp-sideways-exact"], "dsfp-<"),
    (["--uniform-rates", "1.5"], "uniform-rates"),
    *([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available")]),
])
def test_bad_settings_fail_before_any_work(tmp_path, flags, message, capsys):
    code = exit_status(paper_scale.main, ["--smoke", "--out", str(tmp_path / "x.md"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not list(tmp_path.iterdir())


def test_the_defaults_are_the_paper_setting_and_smoke_only_fills_what_is_not_typed():
    cfg = paper_scale.parse_config([])
    assert (cfg.net, cfg.width, cfg.dataset, cfg.baseline_epochs) == ("vgg16", 1.0, "cifar10", 30)
    assert cfg.uniform_rates == (0.5, 0.6, 0.7) and cfg.algos == ("qmix", "dsfp-uniform", "amc")
    assert cfg.problem.macs_target == 0.3 and not cfg.resume and not cfg.dry_run
    smoke = paper_scale.parse_config(["--smoke", "--plans", "9"])
    assert smoke.dataset == "synthetic" and smoke.search.plans == 9 and smoke.width == paper_scale.SMOKE["width"]
