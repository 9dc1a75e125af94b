"""benchmarks/search_curves.py: learning curves of search variants side by side (an explore_radius ablation)."""

import json

import numpy as np
import pytest

from benchmarks import marl, search_curves
from benchmarks.marl_report import best_so_far, curve_band


def _curve(*pairs):
    return [{"plans": p, "best": b} for p, b in pairs]


def test_best_so_far_steps_at_each_episode_and_holds_after_the_last():
    curve = _curve((3, 0.1), (6, 0.4), (9, 0.4), (12, 0.7))
    grid = np.asarray([1, 3, 5, 6, 11, 12, 40])
    y = best_so_far(curve, grid)
    assert np.isnan(y[0])  # before the first episode ended: nothing measured yet
    assert y[1:].tolist() == pytest.approx([0.1, 0.1, 0.4, 0.4, 0.7, 0.7], abs=0)
    # the band starts where every seed has a value and its mean never decreases
    grid, mean, lo, hi = curve_band([curve, _curve((5, 0.2), (8, 0.9))])
    assert grid[0] == 1 and grid[-1] == 12
    assert np.isnan(mean[:4]).all() and mean[4] == pytest.approx((0.1 + 0.2) / 2)
    valid = mean[~np.isnan(mean)]
    assert (np.diff(valid) >= 0).all() and hi[-1] == 0.9 and lo[-1] == 0.7


def _run(out, radius, seeds=("0", "1"), extra=()):
    argv = ["--env", "pruning_env/Tiny-v1", "--plans", "12", "--finetune-epochs", "0", "--seeds", *seeds,
            "--algos", "qmix", "random", "--out-dir", str(out), "--work-dir", str(out / "work"), "--no-progress",
            *extra]
    if radius:
        argv += ["--algo-config", json.dumps({"qmix": {"explore_radius": radius}})]
    assert marl.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_env_factory):
    root = tmp_path_factory.mktemp("curves")
    return _run(root / "uniform", 0), _run(root / "radius1", 1, seeds=("0",))


@pytest.mark.long  # an end-to-end run of the benchmark (.ci/run runs it)
def test_report_compares_an_ablation_on_real_runs(runs, tmp_path):
    uniform, radius1 = runs
    out = tmp_path / "exploration.md"
    argv = ["--runs", str(uniform), str(radius1), "--labels", "uniform", "radius 1", "--at", "3", "6", "500",
            "--out", str(out)]
    assert search_curves.main(argv) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["at"] == [3, 6, result["plans"]] and result["plans"] == 12  # counts past the budget are dropped
    rows = {(r["label"], r["algo"]): r for r in result["rows"]}
    assert set(rows) == {("uniform", "qmix"), ("uniform", "random"), ("radius 1", "qmix"), ("radius 1", "random")}
    ref, ablated = rows[("uniform", "qmix")], rows[("radius 1", "qmix")]
    assert ref["differs"] == [] and ablated["differs"] == ["algo_config"]
    assert ref["seeds"] == [0, 1] and ablated["seeds"] == [0]
    state = json.loads((uniform / "marl.json").read_text())
    for j, seed in enumerate(ref["seeds"]):  # the tabulated values are the recorded curves' best-so-far
        search = state["runs"][str(seed)]["search"]["qmix"]
        assert ref["final"][j] == pytest.approx(search["best"]["objective"])
        assert ref["best_at"]["12"][j] == ref["final"][j]
        assert ref["test_acc_before_ft"][j] == state["runs"][str(seed)]["finetune"]["qmix"]["test_acc_before_finetune"]
    assert ref["test_acc_after_ft"] == [None, None]  # --finetune-epochs 0: nothing to report after fine-tuning
    pd = ablated["paired_difference"]
    assert pd["seeds"] == 1 and pd["mean"] == pytest.approx(ablated["final"][0] - ref["final"][0])
    # random search does not read the QMIX setting: same seed, same plans, zero difference
    assert rows[("radius 1", "random")]["paired_difference"]["mean"] == 0.0
    md = out.read_text()
    assert "| radius 1 | QMIX | algo_config | 1 |" in md and "| uniform | QMIX | - | 2 |" in md
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.long  # an end-to-end run of the benchmark (.ci/run runs it)
def test_runs_measuring_another_objective_are_refused(runs, tmp_path, capsys):
    uniform, _ = runs
    other = _run(tmp_path / "acc", 0, seeds=("0",), extra=["--proxy", "acc"])
    assert search_curves.main(["--runs", str(uniform), str(other), "--out", str(tmp_path / "x.md")]) == 2
    assert "differs in proxy" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()


def test_missing_runs_and_mismatched_labels_are_refused(tmp_path, capsys):
    assert search_curves.main([]) == 2
    assert "--runs needs" in capsys.readouterr().err
    assert search_curves.main(["--runs", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        search_curves.main(["--runs", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "a"])
    assert "one name per run" in capsys.readouterr().err


@pytest.mark.long  # needs the recorded runs of the benchmark (.ci/run runs it)
def test_algorithms_no_run_searched_are_refused(runs, tmp_path, capsys):
    uniform, _ = runs
    assert search_curves.main(["--runs", str(uniform), "--algos", "amc", "--out", str(tmp_path / "x.md")]) == 2
    assert "--algos: no run searched with amc; they searched with qmix, random" in capsys.readouterr().err
    # one of them searched is not enough: the other would be left out silently
    assert search_curves.main(["--runs", str(uniform), "--algos", "qmix", "amc", "--out", str(tmp_path / "x.md")]) == 2
    assert "--algos: no run searched with amc" in capsys.readouterr().err
