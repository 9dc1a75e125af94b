"""benchmarks/marl.py end to end on Tiny-v1 with a tiny budget: outputs, one row per (method, selection), resume."""

import json
from pathlib import Path

import pytest

from benchmarks import marl as marl_module
from pruning_env.training.selection import SOURCES

ALGOS = ["qmix", "random", "dsfp-uniform"]
SELECTIONS = ("none", "own", "own+reference")
ROW_KEYS = {"target", "method", "seed", "selection", "macs_ratio", "val_objective", "test_acc_before_ft",
            "test_acc_after_ft", "winner_source"}


@pytest.fixture(scope="module")
def marl():
    return marl_module


def _argv(out: Path) -> list[str]:
    return ["--env", "pruning_env/Tiny-v1", "--plans", "12", "--finetune-epochs", "1", "--seeds", "0",
            "--algos", *ALGOS, "--out-dir", str(out), "--work-dir", str(out / "work"), "--no-progress"]


@pytest.mark.long  # an end-to-end run of the benchmark (.ci/run runs it)
def test_smoke_writes_every_output_and_resumes(marl, tmp_path, tiny_env_factory, monkeypatch):
    out = tmp_path / "marl"
    # staged: the searches and their best plans first, then the selections of the same run with --resume
    assert marl.main([*_argv(out), "--selections", "none"]) == 0
    first = json.loads((out / "marl.json").read_text())
    assert {r["selection"] for r in first["rows"]} == {"none"} and "selection" not in first["runs"]["0"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("a recorded search or fine-tune was run again")

    with monkeypatch.context() as m:
        m.setattr(marl, "run_search", must_not_run)
        m.setattr(marl, "run_finetune", must_not_run)
        assert marl.main([*_argv(out), "--resume"]) == 0  # default --selections: all three
    for name in ("marl.md", "marl.json", "marl_curves.png", "marl_pareto.png"):
        assert (out / name).stat().st_size > 0, name

    state = json.loads((out / "marl.json").read_text())
    run = state["runs"]["0"]
    assert sorted(run["search"]) == sorted(ALGOS)
    assert sorted(run["finetune"]) == sorted([*ALGOS, "torch-pruning"])
    for name, search in run["search"].items():
        # the same budget for everyone: at least 12 plans unless the algorithm ran out of new plans, and never
        # more than one episode (episode_length - 1 = 2 plans) over it
        assert search["plans_used"] <= 12 + 2, name
        assert search["plans_used"] >= 12 or search["exhausted"], name
        assert len(search["points"]) == search["plans_used"], name
        bests = [c["best"] for c in search["curve"]]
        assert bests == sorted(bests) and bests[-1] == search["best"]["objective"], name
    for name, ft in run["finetune"].items():
        assert 0.0 < ft["macs_ratio"] < 1.0 and 0.0 <= ft["test_acc"] <= 100.0, name
        assert 0.0 <= ft["test_acc_before_finetune"] <= 100.0, name
        if name != "torch-pruning":  # re-measuring the best plan gives what the search saw
            assert ft["val_objective"] == pytest.approx(ft["search_val_objective"]), name
    tp = run["finetune"]["torch-pruning"]
    assert tp["macs_ratio"] <= 0.5 + 1e-9  # pruned down to the MACs target (--tp-target target)
    assert tp["other_layers_pruned"] == []
    assert run["search"] == first["runs"]["0"]["search"] and run["finetune"] == first["runs"]["0"]["finetune"]
    # the flat rows: one per (target, method, seed, selection), every final network at the exact budget;
    # Torch-Pruning's network is compared as it is (selection "none" only)
    keys = sorted((r["method"], r["selection"]) for r in state["rows"])
    assert keys == sorted([*((a, m) for a in ALGOS for m in SELECTIONS), ("torch-pruning", "none")])
    for row in state["rows"]:
        assert set(row) == ROW_KEYS, row
        assert row["target"] == 0.5 and row["seed"] == 0 and row["macs_ratio"] <= 0.5 + 0.005, row
        expected = {"none": {"torch-pruning"} if row["method"] == "torch-pruning" else {"search"},
                    "own": {"search"}, "own+reference": set(SOURCES)}[row["selection"]]
        assert row["winner_source"] in expected, row
    for mode in ("own", "own+reference"):
        for name in ALGOS:
            sel = run["selection"][mode][name]
            sources = [c["source"] for c in sel["candidates"]]
            # own: only the method's own best distinct plans (at most k = 6, all at the budget)
            own = run["search"][name]["top"]
            assert sources.count("search") == min(6, len(own)), (mode, name)
            assert all(c["macs_ratio"] <= 0.5 + 0.005 for c in sel["candidates"]), (mode, name)
            if mode == "own":
                assert set(sources) == {"search"}, name
            else:  # the references are added unless they repeat one of the method's plans
                assert set(sources) <= set(SOURCES), name
            assert sel["candidates"][sel["winner"]]["source"] == sel["winner_source"]
    # every method got the same references: qmix's list shows both (its plans repeat neither here)
    assert {"uniform", "global"} <= {c["source"] for c in run["selection"]["own+reference"]["qmix"]["candidates"]}

    md = (out / "marl.md").read_text()
    for label in ("QMIX", "random search", "DSFP-uniform", "Torch-Pruning global L1"):
        rows = [line for line in md.splitlines() if line.startswith(f"| {label} |")]
        assert rows, label
    assert "## Summary" in md and "QMIX" in state["summary"] and "Command: `python -m benchmarks.marl" in md
    table = md.split("## Final selection")[1].split("## Per seed")[0]
    qmix_line = next(line for line in table.splitlines() if line.startswith("| QMIX |"))
    assert qmix_line.count("(n=1)") == 3 and "search 1" in qmix_line

    # A rerun with --resume and the same settings reuses everything recorded and changes nothing.
    monkeypatch.setattr(marl, "run_search", must_not_run)
    monkeypatch.setattr(marl, "run_finetune", must_not_run)
    monkeypatch.setattr(marl, "run_selection", must_not_run)
    assert marl.main([*_argv(out), "--resume"]) == 0
    assert json.loads((out / "marl.json").read_text())["runs"] == state["runs"]


def test_missing_torch_pruning_is_named_before_any_work(marl, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch_pruning" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        marl.main(_argv(tmp_path / "marl"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Torch-Pruning" in err and '-e ".[bench]"' in err and "Traceback" not in err
    assert not (tmp_path / "marl").exists()  # nothing searched, nothing written


def test_other_settings_refuse_to_mix_with_recorded_results(marl, tmp_path):
    out = tmp_path / "marl"
    out.mkdir()
    (out / "marl.json").write_text(json.dumps({"search_config": {"plans": 1}, "finetune_config": {}, "runs": {}}))
    with pytest.raises(SystemExit) as exc:
        marl.main([*_argv(out), "--resume"])
    assert exc.value.code == 2


@pytest.mark.long  # an end-to-end run of the benchmark (.ci/run runs it)
def test_two_targets_share_a_work_dir_and_combine_into_one_report(marl, tmp_path, tiny_env_factory):
    from benchmarks import marl_report

    work, outs = tmp_path / "work", {}
    for t in ("0.5", "0.3"):
        outs[t] = tmp_path / f"target-{t}"
        argv = ["--env", "pruning_env/Tiny-v1", "--plans", "6", "--finetune-epochs", "1", "--seeds", "0",
                "--algos", "qmix", "dsfp-uniform", "--macs-target", t, "--selections", "none",
                "--out-dir", str(outs[t]), "--work-dir", str(work), "--no-progress"]
        assert marl.main(argv) == 0
    assert {p.parent.parent.name for p in work.rglob("*-finetune.pt")} == {"target-0.5", "target-0.3"}
    combined = tmp_path / "combined"
    assert marl_report.main(["--runs", str(outs["0.3"]), str(outs["0.5"]), "--out-dir", str(combined)]) == 0
    result = json.loads((combined / "marl.json").read_text())
    keys = {(r["target"], r["method"], r["seed"]) for r in result["rows"]}
    assert keys == {(t, m, s) for t in (0.5, 0.3) for m in ("qmix", "dsfp-uniform", "torch-pruning") for s in (0,)}
    assert all(r["macs_ratio"] <= r["target"] + 0.005 for r in result["rows"])
    assert [h["target"] for h in result["headline"]] == pytest.approx([0.5, 0.3], abs=0)
    assert all(h["seeds"] == 1 for h in result["headline"])
    for h in result["headline"]:  # the paired difference is QMIX's mean minus DSFP-uniform's
        assert h["difference"] == pytest.approx(h["qmix"] - h["dsfp_uniform"])
        assert h["difference_std"] is None  # one seed: no spread to report
        qmix = [r["test_acc_after_ft"] for r in result["rows"] if r["target"] == h["target"] and r["method"] == "qmix"]
        assert h["qmix"] == pytest.approx(sum(qmix) / len(qmix))
    md = (combined / "marl.md").read_text()
    assert "## MACs target 0.5" in md and "## MACs target 0.3" in md and "| 0.3 | 1 |" in md
    assert "within 0.01 of target" in md  # where the searches measured their plans
    for t in ("0.5", "0.3"):
        assert (combined / f"marl_curves-{t}.png").stat().st_size > 0
        assert f"marl_curves-{t}.png" in md
    # the hand-written notes under the marker survive regenerating the report
    from benchmarks.common import NOTES_MARKER

    (combined / "marl.md").write_text(md + f"\n{NOTES_MARKER}\n\n## Reading (hand-written)\n\nkept.\n")
    assert marl_report.main(["--runs", str(outs["0.3"]), str(outs["0.5"]), "--out-dir", str(combined)]) == 0
    again = (combined / "marl.md").read_text()
    assert again.count(NOTES_MARKER) == 1 and again.endswith("## Reading (hand-written)\n\nkept.\n")
    assert again.startswith(md.rstrip("\n"))
    # bad input: a folder without a finished run, or two runs of one target
    assert marl_report.main(["--runs", str(tmp_path / "nothing"), "--out-dir", str(combined)]) == 2
    assert marl_report.main(["--runs", str(outs["0.5"]), str(outs["0.5"]), "--out-dir", str(combined)]) == 2


def test_combining_refuses_runs_of_other_settings(tmp_path):
    from benchmarks.marl_report import write_targets_report

    a = {"search_config": {"macs_target": 0.5, "plans": 6}, "finetune_config": {"finetune_epochs": 1}, "runs": {}}
    b = {**a, "search_config": {"macs_target": 0.3, "plans": 12}}
    with pytest.raises(ValueError, match=r"more than the MACs target \(plans\)"):
        write_targets_report([a, b], tmp_path, "cmd", "commit")
    c = {**a, "search_config": {"macs_target": 0.5000001, "plans": 6}}  # prints as the same target
    with pytest.raises(ValueError, match="same MACs target"):
        write_targets_report([a, c], tmp_path, "cmd", "commit")
    with pytest.raises(ValueError, match="no runs"):
        write_targets_report([], tmp_path, "cmd", "commit")


@pytest.mark.parametrize("flags, message", [
    (["--selections", "best"], "--selections must list distinct modes"),
    (["--selections", "own", "own"], "--selections must list distinct modes"),
    (["--no-selection"], "chooses the selection modes with --selections"),
    (["--selections", "own", "--finetune-epochs", "0"], "--finetune-epochs >= 1, or --selections none"),
])
def test_bad_selection_flags_are_refused_before_any_work(marl, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        marl.main([*_argv(tmp_path / "marl"), *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "marl").exists()


def test_committed_results_combine_with_and_without_their_selection_modes(tmp_path, monkeypatch):
    """benchmarks/results/marl.json combines again to its rows; the same states recorded before the selection
    modes (no ``selection`` in a run, rows without the key) count as "none"."""
    import copy

    from benchmarks import marl_report

    committed = json.loads((Path(marl_report.__file__).parent / "results" / "marl.json").read_text())
    monkeypatch.setattr(marl_report, "plots", lambda *a, **k: None)  # the figures are not this test's business
    states = list(committed["targets"].values())
    result = marl_report.write_targets_report(copy.deepcopy(states), tmp_path / "now", "cmd", "commit")
    assert all(set(r) == ROW_KEYS for r in result["rows"])
    assert {r["selection"] for r in result["rows"]} == {"none", "own", "own+reference"}
    key = ("target", "method", "seed", "selection")
    assert {tuple(r[k] for k in key): r for r in result["rows"]} == {tuple(r[k] for k in key): r
                                                                     for r in committed["rows"]}  # values too
    assert all(r["macs_ratio"] <= r["target"] + 0.005 for r in result["rows"])

    for state in states:  # as recorded before the selection modes
        for run in state["runs"].values():
            run.pop("selection", None)
    result = marl_report.write_targets_report(states, tmp_path / "old", "cmd", "commit")
    assert result["rows"] and all(set(r) == ROW_KEYS for r in result["rows"])
    assert {r["selection"] for r in result["rows"]} == {"none"}
    assert {r["winner_source"] for r in result["rows"] if r["method"] == "torch-pruning"} == {"torch-pruning"}
    assert {r["winner_source"] for r in result["rows"] if r["method"] != "torch-pruning"} == {"search"}
    old_rows = [{k: v for k, v in r.items() if k != "selection"} for r in result["rows"]]  # stored without the key
    assert {marl_report.row_selection(r) for r in old_rows} == {"none"}
    assert "## Final selection" not in (tmp_path / "old" / "marl.md").read_text()  # no selection recorded: no table


def test_selection_settings_are_keyed_apart_from_searches_and_fine_tunes(marl, tmp_path):
    """Changing --selection-* keeps the (hours of) searches and "none" fine-tunes; only the selections restart."""
    import dataclasses

    cfg = dataclasses.replace(marl.BenchConfig(), resume=True)
    search, ft, sel = marl._keys(cfg)
    assert sel and all(k.startswith("selection_") for k in sel) and not (sel.keys() & (search.keys() | ft.keys()))
    path = tmp_path / "marl.json"
    runs = {"0": {"search": {"qmix": {"x": 1}}, "finetune": {"qmix": {"y": 2}}, "selection": {"own": {"qmix": {}}}}}
    # recorded before the selection modes: no selection settings, no selections; everything else resumes
    path.write_text(json.dumps({"benchmark": "marl", "search_config": search, "finetune_config": ft,
                                "runs": {"0": {k: v for k, v in runs["0"].items() if k != "selection"}}}))
    state, ft_resume, sel_resume = marl._load_state(path, cfg)
    assert ft_resume and sel_resume and state["selection_config"] == sel
    path.write_text(json.dumps({"benchmark": "marl", "search_config": search, "finetune_config": ft,
                                "selection_config": sel, "runs": runs}))
    other = dataclasses.replace(cfg, selection=dataclasses.replace(cfg.selection, k=3))
    state, ft_resume, sel_resume = marl._load_state(path, other)
    assert ft_resume and not sel_resume
    assert state["runs"]["0"]["search"] == {"qmix": {"x": 1}} and state["runs"]["0"]["finetune"] == {"qmix": {"y": 2}}
    assert state["runs"]["0"]["selection"] == {} and state["selection_config"]["selection_k"] == 3


def test_a_run_recorded_with_other_reference_plans_redoes_only_its_own_reference_selections(marl, tmp_path):
    """A run of the two-reference era (uniform + global, no "reference_sources") keeps its searches, fine-tunes and
    own selections; its own+reference selections and their stage folders go (their candidates changed)."""
    import dataclasses

    cfg = dataclasses.replace(marl.BenchConfig(), resume=True, work_dir=str(tmp_path / "work"))
    search, ft, sel = marl._keys(cfg)
    stage = marl.finetune_dir(cfg.work_dir, cfg.problem.macs_target) / "seed0" / "qmix-own+reference"
    stage.mkdir(parents=True)
    (stage / "selection.json").write_text("{}")
    own = marl.finetune_dir(cfg.work_dir, cfg.problem.macs_target) / "seed0" / "qmix-own"
    own.mkdir()
    runs = {"0": {"search": {"qmix": {"x": 1}}, "finetune": {"qmix": {"y": 2}},
                  "selection": {"own": {"qmix": {"z": 3}}, "own+reference": {"qmix": {"w": 4}}}}}
    path = tmp_path / "marl.json"
    path.write_text(json.dumps({"benchmark": "marl", "search_config": search, "finetune_config": ft,
                                "selection_config": sel, "runs": runs}))
    state, ft_resume, sel_resume = marl._load_state(path, cfg)
    assert ft_resume and sel_resume and state["reference_sources"] == ["uniform", "gradual", "global"]
    assert state["runs"]["0"]["selection"] == {"own": {"qmix": {"z": 3}}}
    assert state["runs"]["0"]["finetune"] == {"qmix": {"y": 2}} and not stage.exists() and own.is_dir()
    marl._save_state(path, state)  # recorded with today's references: nothing more is discarded
    state["runs"]["0"]["selection"]["own+reference"] = {"qmix": {"w": 5}}
    marl._save_state(path, state)
    assert marl._load_state(path, cfg)[0]["runs"]["0"]["selection"]["own+reference"] == {"qmix": {"w": 5}}


def test_an_interrupted_selection_continues_its_stage_on_resume(marl, tmp_path, tiny_env_factory, monkeypatch):
    from pruning_env.training import selection as selection_module

    out = tmp_path / "marl"
    argv = ["--env", "pruning_env/Tiny-v1", "--plans", "6", "--finetune-epochs", "1", "--seeds", "0", "--algos",
            "qmix", "--selections", "own", "--out-dir", str(out), "--work-dir", str(out / "work"), "--no-progress"]
    real, calls = selection_module.finetune, []

    def interrupted(*args, **kwargs):  # Ctrl-C during the second candidate's first rung
        calls.append(kwargs["stop_after"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(selection_module, "finetune", interrupted)
    assert marl.main(argv) == 130
    stage = out / "work" / "target-0.5" / "seed0" / "qmix-own" / "selection.json"
    saved = json.loads(stage.read_text())
    assert [bool(c["scores"]) for c in saved["candidates"]][:2] == [True, False]  # the first candidate's rung kept
    first_score = saved["candidates"][0]["scores"]
    calls.clear()
    monkeypatch.setattr(selection_module, "finetune", lambda *a, **k: (calls.append(k["stop_after"]), real(*a, **k))[1])
    assert marl.main([*argv, "--resume"]) == 0
    done = json.loads(stage.read_text())
    assert done["winner"] is not None and done["candidates"][0]["scores"]["0.25"] == first_score["0.25"]
    n = len(done["candidates"])
    # the first candidate's first rung was not redone: n - 1 first rungs, then the later rungs
    assert calls.count(0.25) == n - 1
    rows = json.loads((out / "marl.json").read_text())["rows"]
    assert [(r["method"], r["selection"]) for r in rows if r["method"] == "qmix"] == [("qmix", "own")]


def test_default_selections_are_all_modes_or_none_alone_without_fine_tuning(marl):
    import dataclasses

    cfg = dataclasses.replace(marl.BenchConfig(), env="pruning_env/Tiny-v1")
    assert marl._check(cfg).selections == list(SELECTIONS)
    search_only = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, epochs=0))
    assert marl._check(search_only).selections == ["none"]  # a search-only run (e.g. benchmarks.search_curves)
