"""The final selection stage (pruning_env.training.selection): candidates at the budget, successive halving on
validation accuracy, the winner's fine-tune continued, determinism, resume, and train_marl's default (Tiny-v1)."""

from __future__ import annotations

import json

import pytest
import torch

import agents
import pruning_env.cli.marl as train_marl
import pruning_env.training.finetune as finetune_mod
from pruning_env.engine.plan import PruningPlan, narrow_plan
from pruning_env.envs.plans import gradual_plan, reference_plans
from pruning_env.search import Search, SearchConfig
from pruning_env.training.finalize import finalize
from pruning_env.training.finetune import FinetuneConfig
from pruning_env.training.selection import (
    MACS_SLACK,
    SOURCES,
    Candidate,
    SelectionConfig,
    select,
    select_and_finalize,
    selection_candidates,
)


@pytest.fixture(scope="module")
def env():
    from pruning_env.envs.registry import make_tiny_env

    e = make_tiny_env()
    e.reset(seed=0)
    return e


def _ft(epochs: int = 3, seed: int = 0) -> FinetuneConfig:
    return FinetuneConfig(epochs=epochs, batch_size=64, lr=0.02, device="cpu", progress=False, seed=seed)


def _damaged(env) -> PruningPlan:
    """A plan far under the budget that keeps ONE filter of every layer but the last (and the least useful
    by L1): a network that cannot recover, the known loser."""
    keep = {}
    for lay in env.layers:
        w = env.base_model.get_submodule(lay.name).weight.detach().abs().sum(dim=(1, 2, 3))
        keep[lay.name] = list(range(lay.out_channels)) if lay.name == env.layer_names[-1] else \
            [int(w.argmin())]
    return PruningPlan(keep, {lay.name: lay.out_channels for lay in env.layers})


def _candidates(env) -> list[Candidate]:
    refs = reference_plans(env)
    return [Candidate(_damaged(env), "search", 1.0), Candidate(refs["uniform"], "uniform"),
            Candidate(refs["global"], "global")]


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_known_best_candidate_wins_and_the_damaged_one_is_halved_away(env, tmp_path):
    cands = _candidates(env)
    record = select(env.base_model, env.splits, cands, SelectionConfig(rung_epochs=1), _ft(),
                    out_dir=tmp_path, bn=env.config.bn, layers=env.layers)
    scores = {c["index"]: c["scores"] for c in record["candidates"]}
    assert record["rungs"][0]["candidates"] == [0, 1, 2]
    assert 0 not in record["rungs"][0]["kept"]  # the damaged plan (listed first, objective 1.0) goes at rung 1
    assert scores[0]["1"] < min(scores[1]["1"], scores[2]["1"])
    assert record["winner"] in (1, 2) and record["winner_source"] == cands[record["winner"]].source
    last = record["rungs"][-1]
    assert record["winner"] == max(last["candidates"], key=lambda i: (scores[i][last["epochs"]], -i))
    # 3 candidates at rung 1 (1 epoch each), 2 at rung 2 (1 more each): one left, its fine-tune goes on later
    assert [r["epochs"] for r in record["rungs"]] == ["1", "2"] and record["cost_epochs"] == 3 + 2
    assert json.loads((tmp_path / "selection.json").read_text())["winner"] == record["winner"]


def test_every_candidate_is_at_the_budget(env, tmp_path):
    """The search's top plans and both references are at the env's MACs target; one above it is refused before
    any fine-tuning."""
    algo = agents.make_algorithm("random", env, seed=0)
    search = Search(algo, env, SearchConfig(plans=12, eval_every=4), progress=False, keep_top=4)
    search.run()
    assert 1 <= len(search.top) <= 4
    assert search.top[0]["objective"] == search.best["objective"]
    assert [t["objective"] for t in search.top] == sorted((t["objective"] for t in search.top), reverse=True)
    assert len({PruningPlan.from_dict(t["plan"]).key() for t in search.top}) == len(search.top)
    state = search.state_dict()  # the top plans are part of the resumable state; an older state knows its best
    again = Search(agents.make_algorithm("random", env, seed=0), env, SearchConfig(plans=12, eval_every=4),
                   progress=False, keep_top=4)
    again.load_state_dict(state)
    assert again.top == search.top
    again.load_state_dict({k: v for k, v in state.items() if k != "top"})
    assert again.top == [search.best]
    cands = selection_candidates(search.top, reference_plans(env), k=4)
    assert {c.source for c in cands} >= {"search", "uniform", "global"}
    target = env.config.budget_target
    for c in cands:
        assert env.macs_model.predict_plan(c.plan)[0] / env.base_macs <= target + MACS_SLACK, c.source
    # the uniform reference is the env's own exact-budget rule applied to one shared rate
    assert reference_plans(env)["uniform"] == env.plan_from_rates([0.0] * len(env.layer_names))
    for ratio in (0.3, 0.7):  # the references follow any budget given
        for source, plan in reference_plans(env, ratio).items():
            assert env.macs_model.predict_plan(plan)[0] / env.base_macs <= ratio, source
    over = {"plan": PruningPlan.full(env.layers).to_dict(), "objective": 9.0, "macs_ratio": 1.0}  # a soft budget's
    kept = selection_candidates([over, *search.top], None, k=4, max_macs_ratio=target + MACS_SLACK)
    assert [c.plan for c in kept] == [c.plan for c in cands if c.source == "search"]
    full = Candidate(PruningPlan.full(env.layers), "search", 0.0)
    with pytest.raises(ValueError, match="above the MACs budget"):
        select(env.base_model, env.splits, [*cands, full], SelectionConfig(), _ft(), out_dir=tmp_path,
               max_macs_ratio=target + MACS_SLACK)
    assert not (tmp_path / "selection.json").exists()


def test_the_gradual_reference_prunes_the_uniform_counts_in_the_episodes_steps(env):
    """``gradual``: the uniform plan's keep counts reached in ``episode_length`` equal steps, the transition's
    scores re-measured on each intermediate network (by hand here); one step is the single-shot uniform plan."""
    from pruning_env.envs.registry import make_tiny_env

    refs = reference_plans(env, 0.3)
    uniform, gradual = refs["uniform"], refs["gradual"]
    steps = env.config.episode_length
    assert steps >= 2 and gradual.keep_counts() == uniform.keep_counts()
    assert env.macs_model.predict_plan(gradual)[0] / env.base_macs <= 0.3
    final = uniform.keep_counts()
    plan = PruningPlan.full(env.layers)
    for s in range(1, steps + 1):
        counts = {n: max(final[n], round(plan.widths[n] - s / steps * (plan.widths[n] - final[n])))
                  for n in env.layer_names}
        assert all(counts[n] < plan.widths[n] for n in env.layer_names if final[n] < plan.widths[n] - steps)
        plan = narrow_plan(plan, env.measure(plan).scores, counts)
    assert plan == gradual
    assert gradual != uniform  # re-scored between the steps, other filters go (the point of the reference)
    assert gradual_plan(env, final, 1) == uniform
    static_refs = reference_plans(make_tiny_env(dynamic=False), 0.3)  # dynamic=False: the same counts too
    assert static_refs["gradual"].keep_counts() == static_refs["uniform"].keep_counts()
    with pytest.raises(ValueError, match="steps must be >= 1"):
        gradual_plan(env, final, 0)
    with pytest.raises(ValueError, match="no entry for layers"):
        gradual_plan(env, {}, 2)
    # the candidates list a plan once: a gradual plan that repeats the uniform one does not enter
    same = {"uniform": uniform, "gradual": uniform, "global": refs["global"]}
    assert [c.source for c in selection_candidates([], same, k=4)] == ["uniform", "global"]


def test_the_global_reference_is_the_engines_torch_pruning_plan(env):
    from pruning_env.engine.global_prune import iterative_global_plan

    for ratio in (0.3, 0.7):
        expected = iterative_global_plan(env.base_model, env.layers, env.macs_model, ratio * env.base_macs,
                                         max_rate=max(env.config.rates), min_keep=env.config.rule.min_keep)
        assert reference_plans(env, ratio)["global"] == expected


def test_same_seed_same_winner_and_the_winner_continues_its_own_fine_tune(env, tmp_path):
    cands = _candidates(env)
    runs = []
    for name in ("a", "b"):
        model, report = select_and_finalize(env.base_model, env.splits, cands, SelectionConfig(), _ft(),
                                            out_dir=tmp_path / name, bn=env.config.bn, layers=env.layers)
        runs.append((report, _weights(model)))
    (ra, wa), (rb, wb) = runs
    strip = lambda r: {k: v for k, v in r.items() if k != "checkpoint"}
    assert strip(ra["selection"]) == strip(rb["selection"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["epochs"] for r in ra["selection"]["rungs"]] == ["0.25", "0.5"]  # rungs of a quarter epoch
    # the winner's rungs were continued, not restarted: the same network as one uninterrupted fine-tune
    winner = cands[ra["selection"]["winner"]]
    plain, plain_report = finalize(env.base_model, env.splits, plan=winner.plan, bn=env.config.bn,
                                   finetune_cfg=_ft(), layers=env.layers)
    per_epoch = lambda r: [(h["train_loss"], h["val_acc"]) for h in r["finetune"]["history"]]
    assert per_epoch(ra) == per_epoch(plain_report)
    assert all(torch.equal(wa[k], v) for k, v in _weights(plain).items())
    assert ra["finetune"]["epochs"] == 3 and len(ra["finetune"]["history"]) == 3


@pytest.mark.long  # three selection stages end to end (.ci/run runs it)
def test_stages_sharing_candidates_take_their_rungs_instead_of_fine_tuning_again(env, tmp_path, monkeypatch):
    """Two stages of one budget (e.g. `own` then `own+reference`) with a shared folder: the second fine-tunes only
    what the first did not measure, and gets the same scores, winner and network as a stage alone."""
    import pruning_env.training.selection as selection_mod

    cands = _candidates(env)
    args = dict(bn=env.config.bn, layers=env.layers)
    alone_model, alone = select_and_finalize(env.base_model, env.splits, cands, SelectionConfig(), _ft(),
                                             out_dir=tmp_path / "alone", **args)
    real, calls = selection_mod.finetune, []

    def counted(*a, **k):
        calls.append((k["plan"], k["stop_after"]))
        return real(*a, **k)

    monkeypatch.setattr(selection_mod, "finetune", counted)
    shared = tmp_path / "shared"
    _, first = select_and_finalize(env.base_model, env.splits, cands[1:], SelectionConfig(), _ft(),
                                   out_dir=tmp_path / "first", shared_dir=shared, **args)
    assert len(calls) == 2 and first["selection"].get("shared_epochs", 0) == 0  # one rung: 2 -> 1
    calls.clear()
    model, second = select_and_finalize(env.base_model, env.splits, cands, SelectionConfig(), _ft(),
                                        out_dir=tmp_path / "second", shared_dir=shared, **args)
    # rung 1: only the candidate the first stage lacked is fine-tuned (it is halved away); rung 2 (the first
    # stage had none) continues the other two from their shared rung-1 states
    assert calls == [(cands[0].plan.to_dict(), 0.25), *((c.plan.to_dict(), 0.5) for c in cands[1:])]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("checkpoint", "shared_epochs")}
    assert strip(second["selection"]) == strip(alone["selection"])
    assert second["selection"]["shared_epochs"] == 0.5 and alone["selection"]["cost_epochs"] == 0.25 * (3 + 2)
    assert all(torch.equal(v, alone_model.state_dict()[k]) for k, v in model.state_dict().items())
    # the first stage's winner went on in its own copy: the shared state stayed at its last rung
    winner = first["selection"]["winner"]
    assert first["selection"]["checkpoint"] == str(tmp_path / "first" / f"candidate_{winner}.pt")
    assert [c["scores"]["0.25"] for c in first["selection"]["candidates"]] == \
        [c["scores"]["0.25"] for c in alone["selection"]["candidates"][1:]]


def test_an_interrupted_stage_resumes_to_the_same_winner_and_weights(env, tmp_path, monkeypatch):
    cands = _candidates(env)
    args = dict(bn=env.config.bn, layers=env.layers)
    full_model, full = select_and_finalize(env.base_model, env.splits, cands, SelectionConfig(), _ft(),
                                           out_dir=tmp_path / "full", **args)
    real_evaluate, calls = finetune_mod.evaluate, {"n": 0}

    def evaluate(*a, **k):  # Ctrl-C at the 7th validation: rung 2's first fine-tune, its quarter epoch unsaved
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(finetune_mod, "evaluate", evaluate)
        with pytest.raises(KeyboardInterrupt):
            select_and_finalize(env.base_model, env.splits, cands, SelectionConfig(), _ft(),
                                out_dir=tmp_path / "cut", **args)
    saved = json.loads((tmp_path / "cut" / "selection.json").read_text())
    for path in (tmp_path / "cut").glob("candidate_*.pt"):  # tensors and plain values only: safe to load
        assert isinstance(torch.load(path, weights_only=True), dict)
    assert saved["winner"] is None and all("0.25" in c["scores"] for c in saved["candidates"])
    calls["n"] = -10**9  # count the validations of the resumed stage (never interrupting again)
    with monkeypatch.context() as patch:
        patch.setattr(finetune_mod, "evaluate", evaluate)
        model, resumed = select_and_finalize(env.base_model, env.splits, cands, SelectionConfig(), _ft(),
                                             out_dir=tmp_path / "cut", resume=True, **args)
    # continued, not redone: rung 2's two fine-tunes resume from rung 1 (one validation each at their pause), then
    # the winner's three epoch ends
    assert calls["n"] + 10**9 == 2 + 3
    assert resumed["selection"]["winner"] == full["selection"]["winner"]
    assert resumed["selection"]["candidates"] == full["selection"]["candidates"]
    assert resumed["selection"]["cost_epochs"] == full["selection"]["cost_epochs"]
    assert all(torch.equal(v, full_model.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="other candidates or settings"):  # another stage's state is refused
        select(env.base_model, env.splits, cands[:2], SelectionConfig(), _ft(), out_dir=tmp_path / "cut",
               resume=True, **args)


def test_train_marl_runs_the_selection_by_default_and_names_the_winner(tmp_path, tiny_env_factory):
    argv = ["--env", "pruning_env/Tiny-v1", "--preset", "smoke", "--logdir", str(tmp_path), "--no-progress"]
    assert train_marl.main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    sel = report["selection"]
    assert sel["winner_source"] in SOURCES and sel["winner_source"] == sel["candidates"][sel["winner"]]["source"]
    sources = [c["source"] for c in sel["candidates"]]
    assert sources.count("search") <= 2 and "uniform" in sources and "global" in sources  # smoke: k = 2
    assert report["macs_reduction"] >= 0.5 - MACS_SLACK
    assert f"winner #{sel['winner']} ({sel['winner_source']})" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "selection" / "selection.json").is_file()

    real_evaluate, calls = finetune_mod.evaluate, {"n": 0}

    def evaluate(*a, **k):  # Ctrl-C in the 3rd candidate's fine-tune (two candidates done)
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    cut = tmp_path / "cut"
    argv[argv.index("--logdir") + 1] = str(cut)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune_mod, "evaluate", evaluate)
        assert train_marl.main(argv) == 130
    assert not (cut / "report.json").exists()
    assert sum(bool(c["scores"]) for c in json.loads((cut / "selection" / "selection.json").read_text())
               ["candidates"]) == 2
    assert train_marl.main([*argv, "--resume"]) == 0
    resumed = json.loads((cut / "report.json").read_text())
    assert resumed["selection"] == sel and resumed["plan"] == report["plan"]
    assert resumed["test_acc"] == report["test_acc"]


@pytest.mark.long  # two train_marl runs end to end (.ci/run runs them)
@pytest.mark.parametrize("flags,budget", [(["--no-exact-budget"], 0.5), (["--reward", "linear"], None)])
def test_without_an_exact_budget_candidates_share_one_budget(tmp_path, tiny_env_factory, flags, budget):
    """A soft budget's search plans above the target and, without a target, plans of other MACs than the best
    one never enter: validation accuracy compares networks of one cost."""
    argv = ["--env", "pruning_env/Tiny-v1", "--preset", "smoke", "--no-progress", "--logdir", str(tmp_path), *flags]
    assert train_marl.main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    limit = (budget if budget is not None else report["search"]["best_macs_ratio"]) + MACS_SLACK
    assert {"uniform", "global"} <= {c["source"] for c in report["selection"]["candidates"]}
    assert all(c["macs_ratio"] <= limit for c in report["selection"]["candidates"])


def test_selection_needs_fine_tuning_and_can_be_turned_off(tmp_path, tiny_env_factory, capsys):
    argv = ["--env", "pruning_env/Tiny-v1", "--preset", "smoke", "--no-progress"]
    with pytest.raises(SystemExit):
        train_marl.main([*argv, "--logdir", str(tmp_path / "a"), "--finetune-epochs", "0"])
    assert "--no-selection" in capsys.readouterr().err
    assert train_marl.main([*argv, "--logdir", str(tmp_path / "b"), "--no-selection"]) == 0
    assert json.loads((tmp_path / "b" / "report.json").read_text())["selection"] is None
