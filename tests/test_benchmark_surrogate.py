"""benchmarks.surrogate_data and benchmarks.surrogate_validation end to end on Tiny-v1 (tiny budgets)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from benchmarks import surrogate_data, surrogate_validation
from pruning_env.envs.surrogate import SurrogateData, SurrogateModel, SurrogatePruningEnv

pytestmark = pytest.mark.long  # end-to-end runs of the benchmarks (.ci/run runs them)

DATA_ARGS = ["--env", "pruning_env/Tiny-v1", "--targets", "0.5", "0.3", "--plans", "60", "--allocations", "6",
             "--search-algos", "random", "qmix", "--search-seeds", "0", "--search-plans", "9", "--no-progress"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("surrogate")
    out, work = root / "Tiny.npz", root / "work"
    assert surrogate_data.main([*DATA_ARGS, "--out", str(out), "--work-dir", str(work)]) == 0
    return out, work


def test_the_data_set_has_every_source_and_resumes(made, capsys):
    out, work = made
    data = SurrogateData.load(out)
    names = {data.meta["sources"][i] for i in np.unique(data.source)}
    assert {"uniform", "profile", "allocation", "search:random", "search:qmix"} <= names
    assert len(data) >= 60 and len({tuple(k) for k in data.keep.tolist()}) == len(data)
    assert set(np.unique(data.target)) == {0.5, 0.3}
    # a plan measured for a 0.5 budget's final step sits at or below it
    finals = data.source == data.meta["sources"].index("allocation")
    assert (data.macs[finals & (data.target == 0.5)] <= 0.5 * data.meta["base"]["macs"]).all()
    # every unit is on disk: a resumed run measures nothing and writes the same data
    before = {p.name: p.stat().st_mtime_ns for p in work.glob("*.npz")}
    again = out.with_name("again.npz")
    assert surrogate_data.main([*DATA_ARGS, "--out", str(again), "--work-dir", str(work), "--resume"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("*.npz")} == before
    assert np.array_equal(SurrogateData.load(again).keep, data.keep)
    assert surrogate_data.main([*DATA_ARGS, "--out", str(again), "--work-dir", str(work)]) == 2  # no --resume
    assert "--resume" in capsys.readouterr().err
    SurrogatePruningEnv(out).reset(seed=0)  # the data set makes an env


def test_finished_units_make_a_data_set_and_a_larger_plans_continues(made, tmp_path, capsys):
    _, work = made
    part = tmp_path / "work"
    shutil.copytree(work, part)
    for p in part.glob("search_qmix*.npz"):  # as if interrupted before the QMIX searches
        p.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in part.glob("*.npz")}
    partial = tmp_path / "partial.npz"
    assert surrogate_data.main([*DATA_ARGS, "--out", str(partial), "--work-dir", str(part), "--finished-only"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in part.glob("*.npz")} == before  # nothing measured
    data = SurrogateData.load(partial)
    assert {data.meta["sources"][i] for i in np.unique(data.source)} == {"uniform", "profile", "allocation",
                                                                          "search:random"}
    more = [a if a != "60" else "90" for a in DATA_ARGS]
    bigger = tmp_path / "bigger.npz"
    assert surrogate_data.main([*more, "--out", str(bigger), "--work-dir", str(part), "--resume"]) == 0
    assert len(SurrogateData.load(bigger)) >= 90
    empty = tmp_path / "empty"
    assert surrogate_data.main([*DATA_ARGS, "--out", str(partial), "--work-dir", str(empty), "--finished-only"]) == 2
    assert "no finished unit" in capsys.readouterr().err


def test_validation_writes_the_acceptance_fields(made, tmp_path):
    out, _ = made
    args = ["--env", "pruning_env/Tiny-v1", "--data", str(out), "--targets", "0.5", "--algos", "random", "qmix",
            "--seeds", "2", "3", "--search-plans", "9", "--speed-steps", "12", "--heldout-fraction", "0.3",
            "--vector-envs", "16", "--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "work"), "--no-progress"]
    assert surrogate_validation.main(args) == 0
    r = json.loads((tmp_path / "surrogate.json").read_text())
    assert set(r["steps_per_s"]) == {"surrogate", "real", "surrogate_vector"} and min(r["steps_per_s"].values()) > 0
    assert r["vector_envs"] == 16 and "SurrogateVectorEnv" in (tmp_path / "surrogate.md").read_text()
    seeds = sorted({int(x) for x in SurrogateData.load(out).seed if x >= 0})
    assert {h["set"] for h in r["heldout"]} == {"random held-out", "search seeds absent from the data",
                                                *(f"search seed {s} left out of the fit" for s in seeds)}
    assert all({"target", "kendall_tau", "r2", "plans"} <= set(h) for h in r["heldout"])
    assert sorted(r["ranking"]["real"]) == sorted(r["ranking"]["surrogate"]) == ["qmix", "random"]
    assert -1.0 <= r["ranking"]["kendall_tau"] <= 1.0 and r["command"] and r["commit"] and r["machine"]
    top = r["top_plans"]  # where the model fails: its fidelity among the best plans within the budget
    assert [p["top_fraction"] for p in top] == list(surrogate_validation.TOP_FRACTIONS)
    assert [p["plans"] for p in top] == sorted((p["plans"] for p in top), reverse=True) and top[-1]["plans"] >= 3
    assert all(-1 <= p["kendall_tau"] <= 1 and p["mae"] >= abs(p["bias"]) and 0 <= p["overlap"] <= 1 for p in top)
    assert top[0]["overlap"] == 1.0  # all plans: the model's top is the measured top
    assert "Where the model fails" in (tmp_path / "surrogate.md").read_text()
    curve = r["top_curve"]  # the same plans' tau as the data grows
    assert [c["train_plans"] for c in curve] == sorted(c["train_plans"] for c in curve)
    assert curve[-1]["train_plans"] == len(SurrogateData.load(out))
    assert all(set(c["kendall_tau"]) == {"1", "0.25", "0.1"} for c in curve)
    assert "training plans | all | best 25 %" in (tmp_path / "surrogate.md").read_text()
    assert "steps/s" in (tmp_path / "surrogate.md").read_text()
    cap = r["capacity"]  # the capacity study: one row per --capacity-leaves, tau per target and per left-out seed
    assert [c["num_leaves"] for c in cap] == [31, 127, 255]
    assert all(set(c["random_heldout"]) == {"0.5"} and -1 <= c["random_heldout"]["0.5"] <= 1 for c in cap)
    assert all(c["search_seed_left_out"]["sets"] == len(seeds) for c in cap)
    assert "| 127 |" in (tmp_path / "surrogate.md").read_text()
    assert surrogate_validation.main([*args[:-5], "--seeds", "0", "--out-dir", str(tmp_path / "x"),
                                      "--work-dir", str(tmp_path / "w2"), "--no-progress"]) == 2  # a data seed
    quick = tmp_path / "quick"  # held-out sets and speed only: no search on either env
    assert surrogate_validation.main([*args[:-5], "--no-searches", "--out-dir", str(quick), "--work-dir",
                                      str(tmp_path / "w3"), "--no-progress"]) == 0
    q = json.loads((quick / "surrogate.json").read_text())
    assert q["ranking"] is None and min(q["steps_per_s"].values()) > 0
    assert {h["set"] for h in q["heldout"]} == {h["set"] for h in r["heldout"]} - {"search seeds absent from the data"}
    assert "Not run (`--no-searches`)." in (quick / "surrogate.md").read_text()
    split = tmp_path / "split"  # held-out sets at two targets, the searches at one
    both = [a for a in args[:-5] if a != "0.5"]
    both[both.index("--targets") + 1:both.index("--targets") + 1] = ["0.5", "0.3"]
    assert surrogate_validation.main([*both, "--search-targets", "0.3", "--out-dir", str(split), "--work-dir",
                                      str(tmp_path / "w4"), "--no-progress"]) == 0
    s = json.loads((split / "surrogate.json").read_text())
    assert {h["target"] for h in s["heldout"] if h["set"] == "random held-out"} == {0.5, 0.3}
    assert {h["target"] for h in s["heldout"] if h["set"] == "search seeds absent from the data"} == {0.3}
    assert sorted(s["ranking"]["real"]) == ["qmix", "random"]
    assert {p.stem.rsplit("-t", 1)[1] for p in (tmp_path / "w4").glob("*-t*.json")} == {"0.3"}
    # --resume with one more seed: the finished searches are read back, only the new seed's run
    work = tmp_path / "work"
    before = {p.name: p.stat().st_mtime_ns for p in work.glob("*-s*.json")}
    more = [*args[:-5], "--out-dir", str(tmp_path / "more"), "--work-dir", str(work), "--resume", "--no-progress"]
    more[more.index("--seeds") + 1:more.index("--seeds") + 3] = ["2", "3", "4"]
    assert surrogate_validation.main(more) == 0
    after = {p.name: p.stat().st_mtime_ns for p in work.glob("*-s*.json")}
    assert {n: after[n] for n in before} == before and set(after) - set(before) == {"qmix-s4-t0.5.json",
                                                                                     "random-s4-t0.5.json"}
    assert json.loads((tmp_path / "more" / "surrogate.json").read_text())["ranking"]["real"]
    stale = work / "qmix-s2-t0.5.json"  # a unit whose surrogate side ran on another model: run again, real kept
    rec = json.loads(stale.read_text())
    rec["surrogate"].update(model="another model", best_objective=-1.0)
    stale.write_text(json.dumps(rec))
    assert surrogate_validation.main(more) == 0
    again = json.loads(stale.read_text())
    assert again["real"] == rec["real"] and again["surrogate"]["best_objective"] != -1.0
    assert again["surrogate"]["model"] == SurrogateModel.load_or_fit(SurrogateData.load(out)).digest()
    other = [*more[:more.index("--search-plans") + 1], "12", *more[more.index("--search-plans") + 2:]]
    assert surrogate_validation.main(other) == 2  # another search budget: not the finished searches' settings
