"""benchmarks/reward_fidelity.py on Tiny-v1: plans at the budget, the report's schema, resume without re-measuring."""

import json
import shutil

import pytest

from benchmarks import reward_fidelity

ARGS = ["--env", "pruning_env/Tiny-v1", "--targets", "0.5", "0.35", "--plans-per-target", "4", "--search-plans", "6",
        "--search-top", "1", "--truth-epochs", "1", "--truth-train-limit", "256", "--kd-steps", "1", "2",
        "--eval-sizes", "64", "128", "--bn-batches", "1", "2", "--noise-plans", "1", "--bootstrap", "100",
        "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    argv = [*ARGS, "--out-dir", str(root), "--work-dir", str(root / "work")]
    assert reward_fidelity.main(argv) == 0
    return root, argv, json.loads((root / "reward_fidelity.json").read_text())


@pytest.mark.long  # an end-to-end run of the benchmark (.ci/run runs it)
def test_every_plan_meets_its_target_and_the_profiles_differ(run):
    _, _, result = run
    records = result["records"]
    for target in (0.5, 0.35):
        recs = [r for r in records if r["target"] == target]
        assert len(recs) == 4
        assert all(target - 0.12 < r["macs_ratio"] <= target + 1e-9 for r in recs)  # Tiny: 8-16 filters a layer
        assert recs[0]["name"] == "uniform"
        assert len({json.dumps(r["plan"], sort_keys=True) for r in recs}) == 4
    assert sum("1" in r["truth"] for r in records) == 2  # one second-seed truth per target


@pytest.mark.long  # an end-to-end run of the benchmark (.ci/run runs it)
def test_report_schema_and_correlations(run):
    root, _, result = run
    assert result["default"] == "bn1_kl@256"  # Tiny-v1's env: 1 BN batch, 256 reward images, the KL proxy
    names = {p["name"] for p in result["proxies"]}
    assert {"bn1_acc@64", "bn2_kl@128", "bn2_ce@64", "kd1_acc@64", "kd2_kl@64"} <= names
    for p in result["proxies"]:
        assert {"name", "target", "kendall_tau", "spearman", "seconds_per_plan"} <= set(p)
        assert -1.0 <= p["kendall_tau"] <= 1.0 and p["seconds_per_plan"] > 0
    assert "validation accuracy" in result["truth"]
    # the rank correlation is the one of the recorded values (lower KL = better)
    recs = [r for r in result["records"] if r["target"] == 0.5]
    from scipy import stats
    truth = [r["truth"]["0"]["val_acc"] for r in recs]
    kl = [-r["proxies"]["bn2_kl@128"]["value"] for r in recs]
    row = next(p for p in result["proxies"] if p["name"] == "bn2_kl@128" and p["target"] == 0.5)
    assert row["kendall_tau"] == pytest.approx(stats.kendalltau(kl, truth).statistic)
    text = (root / "reward_fidelity.md").read_text()
    assert "MACs target 0.35" in text and "Kendall tau" in text


@pytest.mark.long  # an end-to-end run of the benchmark (.ci/run runs it)
def test_rerun_needs_resume_and_resume_measures_nothing_again(run, capsys):
    root, argv, result = run
    assert reward_fidelity.main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert reward_fidelity.main([*argv, "--resume"]) == 0
    again = json.loads((root / "reward_fidelity.json").read_text())
    assert again["records"] == result["records"]  # the same measurements (timings included): nothing re-run
    one = root / "one"
    assert reward_fidelity.main([*argv, "--report-only", "--targets", "0.35", "--out-dir", str(one)]) == 0
    only = json.loads((one / "reward_fidelity.json").read_text())
    assert only["records"] == [r for r in result["records"] if r["target"] == 0.35]
    assert reward_fidelity.main([*argv, "--resume", "--truth-epochs", "2"]) == 2
    assert "truth_epochs" in capsys.readouterr().err


@pytest.mark.long  # an end-to-end run of the benchmark (.ci/run runs it)
def test_resume_with_more_proxies_measures_only_those(run, tmp_path):
    root, _, result = run
    work = tmp_path / "work"
    shutil.copytree(root / "work", work)
    more = [*ARGS, "--kd-steps", "1", "2", "3", "--out-dir", str(tmp_path), "--work-dir", str(work), "--resume"]
    assert reward_fidelity.main(more) == 0
    grown = json.loads((tmp_path / "reward_fidelity.json").read_text())["records"]
    assert len(grown) == len(result["records"])
    for old, new in zip(result["records"], grown, strict=True):
        assert new["truth"] == old["truth"]  # no truth re-run
        assert {k: new["proxies"][k] for k in old["proxies"]} == old["proxies"]  # the measured proxies kept
        assert set(new["proxies"]) - set(old["proxies"]) == {"kd3_acc@64", "kd3_kl@64"}
    assert {"kd3_acc@64"} <= {p["name"] for p in json.loads((tmp_path / "reward_fidelity.json").read_text())
                              ["proxies"]}
    # an added KD proxy equals the one a run measuring it from the start gets (seeded steps, constant lr)
    fresh = tmp_path / "fresh"
    few = [*ARGS, "--targets", "0.5", "--noise-plans", "0", "--kd-steps", "3",
           "--out-dir", str(fresh), "--work-dir", str(fresh / "work")]
    assert reward_fidelity.main(few) == 0
    recs = json.loads((fresh / "reward_fidelity.json").read_text())["records"]
    pairs = [(rec, same) for rec in recs for same in grown if same["plan"] == rec["plan"]]
    assert len(pairs) == 4  # the same plans
    for rec, same in pairs:
        for name in ("kd3_acc@64", "kd3_kl@64"):
            assert same["proxies"][name]["value"] == pytest.approx(rec["proxies"][name]["value"], abs=1e-6)
    # the proxy set is not a setting that refuses a resume; the truth's are
    assert reward_fidelity.main([*more, "--bn-batches", "1"]) == 0
