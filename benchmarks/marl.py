"""QMIX against the other searches and a practitioner's baseline, at the same budget and matched MACs.

Every algorithm (QMIX, VDN, IQL, AMC-style DDPG, random search, DSFP-uniform) searches the SAME pruning env
configuration (a fresh env per algorithm, same seed) with the SAME budget, in the one search loop of the package
(:class:`pruning_env.search.Search`): training episodes run until the search has measured ``--plans`` distinct plans
(greedy evaluations count too; the unpruned network does not). An episode is never cut, so an algorithm may end up to
``episode_length - 1`` plans over the budget; the exact figure is reported. An algorithm that measures no new plan for
``--stall-episodes`` episodes in a row stops early (DSFP-uniform: one plan per grid rate), marked "exhausted".

The reward is the env's (default ``budget`` with ``--macs-target 0.5`` and ``--exact-budget``):
every step's joint action is projected onto the MACs target (:mod:`pruning_env.engine.budget`),
so every plan any algorithm measures sits at or just below the target and the methods compare
at matched MACs; the objective is the env's proxy (default: KL to the unpruned network's outputs
after BN re-estimation; see ``benchmarks/results/reward_fidelity.md``). With
``--no-exact-budget`` the budget is a soft penalty (``--budget-penalty`` per unit of MACs ratio
above the target): best plans may then sit above the target, which the report flags; it also
compares, at strictly matched MACs, the best validation accuracy of all plans at or under it.

One run is one MACs target. Several targets: one run per target, each into its own
``--out-dir``, then ``python -m benchmarks.marl_report --runs DIR DIR`` writes the combined
``marl.md`` / ``marl.json`` (with the flat ``rows`` of every target) into benchmarks/results.

Outputs in ``--out-dir``:

* ``marl_curves.png``: best-so-far validation objective vs plans evaluated, one line per
  algorithm (mean over seeds, band = min..max);
* ``marl_pareto.png``: validation accuracy ratio vs MACs ratio of EVERY plan each algorithm
  measured (all seeds pooled) and its Pareto front; stars = best plans, X = Torch-Pruning;
* ``marl.md`` / ``marl.json``: search results per algorithm and seed; then the best plan of
  each algorithm (by validation objective) after IDENTICAL finalization
  (:func:`pruning_env.training.finalize.finalize`: BN re-estimated as the env does, knowledge
  distillation from the unpruned network for ``--finetune-epochs``), next to Torch-Pruning's
  global L1-magnitude pruning of the same convs down to the same MACs, finalized the same way.
  TEST accuracy before/after fine-tuning, validation objective, MACs and params ratios, wall
  time; and a summary paragraph written from the numbers.

The final selection (:mod:`pruning_env.training.selection`, ``--selection-*``), the same for every search:
each method and seed is finalized in every mode of ``--selections``:

* ``none``: the search's best plan fine-tuned (above; Torch-Pruning's network is compared as it is, in this mode
  only);
* ``own``: successive halving of short KD fine-tunes over the method's own ``--selection-k`` best distinct plans,
  judged on VALIDATION accuracy, the winner's fine-tune continued to the full budget;
* ``own+reference``: the same over those plans plus the reference plans at the same MACs budget
  (:func:`pruning_env.envs.plans.reference_plans`: ``uniform``, ``gradual`` and ``global``, the same for every
  method).

The flat ``rows`` of ``marl.json`` hold one entry per (target, method, seed, selection) with the winner's source
(``search`` or a reference's name; ``torch-pruning`` for its network). Long runs may be staged: e.g.
``--selections none`` first, then ``--selections own own+reference --resume`` into the same folders.

Resumable with ``--resume``: every finished search, fine-tune and selection is written
to ``marl.json`` at once and skipped on a rerun with the same settings; an interrupted
fine-tune continues from its per-epoch checkpoint under ``--work-dir``, an interrupted selection from its stage
state there (``seed<s>/<method>-<selection>/``). Changing only ``--selection-*`` keeps the searches and the
``none`` fine-tunes; a run recorded with other reference plans keeps all but its ``own+reference`` selections.

    python -m benchmarks.marl --data-dir /path/to/data --macs-target 0.3   # VGG-16 w0.25, CIFAR-10, 3 seeds
    python -m benchmarks.marl --seeds 0 --plans 300 --finetune-epochs 2 --finetune-train-limit 10000
    python -m benchmarks.marl --env pruning_env/Tiny-v1 --plans 12 --finetune-epochs 1 \
        --algos qmix random dsfp-uniform --out-dir /tmp/marl                  # smoke, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

import agents
import pruning_env
from benchmarks.common import hold_outputs, require_torch_pruning
from benchmarks.marl_report import ALGOS, SELECTIONS, STATE_FILE, TP_NAME, plots, result_rows, summary, write_report
from benchmarks.torch_pruning_baseline import torch_pruning_model
from pruning_env.cli.options import add_config_args, config_from_args, print_json
from pruning_env.core import checkpoint as ckpt
from pruning_env.core.config import (
    check_settings,
    flat_dict,
    nested,
    option,
    resolve_device,
    seed_everything,
    without_run_only,
)
from pruning_env.core.data import load_splits
from pruning_env.core.evaluation import evaluate
from pruning_env.core.provenance import git_commit, machine_description
from pruning_env.engine.flops import count
from pruning_env.engine.global_prune import GLOBAL_STEPS
from pruning_env.engine.plan import PruningPlan
from pruning_env.envs.config import EnvConfig, changed_settings, config_dict
from pruning_env.envs.env import FilterPruningEnv
from pruning_env.envs.plans import objective_of, reference_plans
from pruning_env.envs.registry import NETWORK_NAMES, TINY_ID, check_env_id, make_benchmark_env, parse_env_id
from pruning_env.search import Search, SearchConfig, algorithm_env, algorithm_overrides, check_algo_config
from pruning_env.search.parallel import PlanEvaluator, WorkersConfig, ray_session, scale_out
from pruning_env.training.finalize import finalize
from pruning_env.training.finetune import FinetuneConfig
from pruning_env.training.selection import (
    MACS_SLACK,
    REFERENCE_SOURCES,
    SelectionConfig,
    select_and_finalize,
    selection_budget,
    selection_candidates,
)
from pruning_env.training.teacher import TeacherCache
from pruning_env.training.train import default_checkpoint_path

ROOT = Path(__file__).resolve().parents[1]
_FINETUNE_KEYS = ("tp_target", "tp_steps")


@dataclass
class BenchConfig:
    """Every flag of benchmarks/marl.py (the CLI is generated from these fields)."""

    net: str = option("vgg16", "network to prune (with --dataset, --width; ignored with --env)",
                      choices=sorted(NETWORK_NAMES))
    dataset: str = option("cifar10", "data set of the baseline: cifar10 or cifar100")
    width: float = option(0.25, "channel width of the baseline")
    env: str | None = option(None, "a registered env id instead of --net/--dataset, e.g. pruning_env/Tiny-v1 (smoke)")
    checkpoint: str | None = option(None, "trained baseline checkpoint (default: the cached "
                                    "<net>-<dataset>-w<width>-e<baseline-epochs>-s0.pt; never trained here)")
    baseline_epochs: int = option(30, "epochs of the cached baseline to look up")
    data_dir: str | None = option(None, "data directory (default: $PRUNING_ENV_DATA, else the cache)", run_only=True)
    algos: list[str] = option(list(ALGOS), "algorithms to compare (registered names)", run_only=True)
    seeds: list[int] = option([0, 1, 2], "seeds; every algorithm runs once per seed", run_only=True)
    problem: EnvConfig = nested(EnvConfig, "the pruning env every algorithm searches")
    search: SearchConfig = nested(SearchConfig, "the budget of every search")
    finetune: FinetuneConfig = nested(FinetuneConfig, "identical fine-tuning of every best plan and of "
                                      "Torch-Pruning's network (2 epochs here)", prefix="finetune",
                                      default=FinetuneConfig(epochs=2))
    selection: SelectionConfig = nested(SelectionConfig, "the final selection of the own and own+reference modes "
                                        "(the same for every method)", prefix="selection")
    selections: list[str] | None = option(None, "selection modes to run: none (the search's best plan), own (the "
                                          "selection over the method's own best plans), own+reference (those plus "
                                          "the reference plans at the budget); default: all three, or none "
                                          "alone with --finetune-epochs 0 (a search-only run)", run_only=True)
    parallel: WorkersConfig = nested(WorkersConfig, "parallel plan measurement on Ray (--workers, --ray-address)")
    tp_target: str = option("target", "Torch-Pruning prunes until its MACs ratio <= that of the QMIX best plan of "
                            "the same seed (qmix; falls back to --macs-target without QMIX) or --macs-target "
                            "(target)", choices=["qmix", "target"])
    tp_steps: int = option(GLOBAL_STEPS, "Torch-Pruning iterative steps from 0 to the largest rate (finer = closer "
                           "MACs; the global reference plan's too)", min=1)
    device: str = option("auto", "device of the env, the agents and the fine-tuning: auto, cpu, cuda", run_only=True)
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)", run_only=True)
    out_dir: str = option(str(ROOT / "benchmarks" / "results"), "folder of marl.md, marl.json and the plots",
                          run_only=True)
    work_dir: str = option("runs/bench_marl", "folder of fine-tuning checkpoints (for resuming)", run_only=True)
    resume: bool = option(False, "reuse finished searches / fine-tunes recorded in marl.json (same settings)",
                          run_only=True)
    progress: bool = option(True, "show progress bars", run_only=True)


# ----------------------------------------------------------------------------- set-up


def _check(cfg: BenchConfig) -> BenchConfig:
    """Validate every flag before any work starts (raises ValueError)."""
    check_settings(cfg)  # the declared ranges, also of a config built in code (the CLI checks them too)
    unknown = [a for a in cfg.algos if a not in agents.list_algorithms()]
    if unknown:
        raise ValueError(f"unknown algorithm(s) {unknown}; choose from {', '.join(agents.list_algorithms())}")
    if len(set(cfg.algos)) != len(cfg.algos) or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError("--algos and --seeds must not repeat")
    check_algo_config(cfg.search, {a: agents.get_algorithm(a) for a in cfg.algos}, cfg.problem.episode_length)
    require_torch_pruning("the Torch-Pruning row of every seed (global L1 pruning to the same MACs)")
    cfg.finetune.check()
    cfg.parallel.check()
    if cfg.selections is None:  # the selection judges plans by fine-tuning them: none without fine-tuning
        cfg = dataclasses.replace(cfg, selections=list(SELECTIONS) if cfg.finetune.epochs > 0 else ["none"])
    bad = [m for m in cfg.selections if m not in SELECTIONS]
    if bad or not cfg.selections or len(set(cfg.selections)) != len(cfg.selections):
        raise ValueError(f"--selections must list distinct modes among {', '.join(SELECTIONS)}, got "
                         f"{' '.join(cfg.selections) or 'none at all'}")
    if not (cfg.selection.enabled and cfg.selection.references):
        raise ValueError("benchmarks.marl chooses the selection modes with --selections (none, own, own+reference); "
                         "--no-selection and --no-selection-references are train_marl.py's flags")
    if set(cfg.selections) - {"none"} and cfg.finetune.epochs == 0:
        raise ValueError("the selection modes own and own+reference judge plans by fine-tuning them: give "
                         "--finetune-epochs >= 1, or --selections none for a search-only run")
    if cfg.env is not None:
        pruning_env.register_all()
        check_env_id(cfg.env)  # unknown, or a removed -v0 id (named with its -v1 id)
    elif cfg.dataset not in ("cifar10", "cifar100"):
        raise ValueError(f"--dataset must be cifar10 or cifar100, got {cfg.dataset!r} (or pass --env)")
    resolve_device(cfg.device)
    if cfg.env != TINY_ID:
        cfg = dataclasses.replace(cfg, checkpoint=str(_baseline_path(cfg)))
    return cfg


def _net_dataset(cfg: BenchConfig) -> tuple[str, str]:
    if cfg.env is None:
        return cfg.net, cfg.dataset
    parts = parse_env_id(cfg.env)
    return parts.net, parts.dataset


def _baseline_path(cfg: BenchConfig) -> Path:
    """The trained baseline: --checkpoint, else the FINISHED cached one (a benchmark never trains it)."""
    if cfg.checkpoint:
        path = Path(cfg.checkpoint).expanduser()
        if not path.is_file():
            raise ValueError(f"--checkpoint {path} does not exist")
        return path.resolve()
    net, dataset = _net_dataset(cfg)
    path = default_checkpoint_path(net, dataset, cfg.width, cfg.baseline_epochs)
    if not path.is_file():
        raise ValueError(f"no trained baseline at {path}; train it first (python -m pruning_env.train --net {net} "
                         f"--dataset {dataset} --width {cfg.width:g} --epochs {cfg.baseline_epochs}) or pass "
                         "--checkpoint")
    try:
        metrics = ckpt.load(path).metrics
    except ckpt.CheckpointError as exc:
        raise ValueError(str(exc)) from None
    if "test_acc" not in metrics:
        raise ValueError(f"the baseline {path} is not finished training yet (no test_acc recorded); wait for it "
                         "or pass --checkpoint")
    return path


class Context:
    """Data loaded once per process and shared by the fresh envs (splits) and the fine-tuning (base env)."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self._splits = None
        self._env: FilterPruningEnv | None = None
        self._teacher: TeacherCache | None = None
        self._references: dict[float, dict[str, PruningPlan]] = {}
        # One set of plan-measuring workers (--workers > 1) for every search of the run: the envs share the problem,
        # so its store serves them all and no search waits for new workers (each env still counts its own plans).
        self.evaluator: PlanEvaluator | None = None

    @property
    def teacher_cache(self) -> TeacherCache:
        """The KD teacher's outputs, shared by the fine-tunes of one seed (they replay the same batches)."""
        if self._teacher is None:
            self._teacher = TeacherCache(self.env.base_model)
        return self._teacher

    def references(self, macs_ratio: float) -> dict[str, PruningPlan]:
        """The reference plans at a MACs budget (computed once per budget: every method gets the same)."""
        if macs_ratio not in self._references:
            self._references[macs_ratio] = reference_plans(self.env, macs_ratio, global_steps=self.cfg.tp_steps)
        return self._references[macs_ratio]

    def make_env(self) -> FilterPruningEnv:
        """A fresh env of the benchmark's problem (its plan cache empty)."""
        cfg = self.cfg
        settings = changed_settings(cfg.problem)
        # big enough that no measured plan is ever evicted (a re-measure would cost time twice)
        settings["cache_size"] = max(cfg.problem.cache_size, 4 * cfg.search.plans)
        if cfg.env == TINY_ID:
            env = pruning_env.make(TINY_ID, **settings)
        else:
            net, dataset = _net_dataset(cfg)
            if self._splits is None:
                self._splits = load_splits(dataset, cfg.data_dir)
            env = make_benchmark_env(net, dataset, width=cfg.width, checkpoint=cfg.checkpoint, splits=self._splits,
                                     device=str(self.device), **settings)
        if self._env is None:
            self._env = env
        return env

    @property
    def env(self) -> FilterPruningEnv:
        """Some env of the problem (for its base model, splits, layers and config)."""
        return self._env if self._env is not None else self.make_env()


# ----------------------------------------------------------------------------- search


def run_search(cfg: BenchConfig, ctx: Context, name: str, seed: int) -> dict[str, Any]:
    """One algorithm, one seed, one fresh env, ``cfg.search.plans`` measured plans."""
    seed_everything(seed)
    t_env = time.perf_counter()
    env = ctx.make_env()
    env_seconds = time.perf_counter() - t_env
    cls = agents.get_algorithm(name)
    overrides = algorithm_overrides(cls, name, cfg.search, env.config.episode_length)
    algo = agents.make_algorithm(name, algorithm_env(cls, env), seed=seed, device=ctx.device, **overrides)
    search = Search(algo, env, cfg.search, progress=cfg.progress, desc=f"seed {seed} {name}",
                    keep_top=cfg.selection.k)
    ctx.evaluator = scale_out(search, cfg.parallel, ctx.evaluator)  # None with --workers 1
    search.run()
    # points: every plan measured, in the order they were found; curve: one entry per episode
    # top: the k best distinct final plans (the selection's own candidates)
    return {"algorithm": name, "seed": seed, **search.result(), "top": search.top, "keep_top": search.keep_top,
            "env_setup_seconds": round(env_seconds, 2),
            "config_overrides": overrides, "baseline_val_acc": env.baseline_acc}


# ----------------------------------------------------------------------------- fine-tuning


def run_finetune(cfg: BenchConfig, ctx: Context, name: str, seed: int, search: dict[str, Any] | None,
                 tp_target: float | None, baseline: dict[str, Any]) -> dict[str, Any]:
    """Prune (best plan, or Torch-Pruning), then finalize exactly like every other network: BN as the env, KD, test."""
    env, device = ctx.env, ctx.device
    base, splits = env.base_model, env.splits
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    plan, model = None, None
    if name == TP_NAME:
        assert tp_target is not None
        model, extra = torch_pruning_model(base, env, tp_target, cfg.tp_steps)
        model.to(device)
    else:
        assert search is not None
        plan = PruningPlan.from_dict(search["best"]["plan"])
        extra["keep"] = plan.keep_counts()

    def val_like_env(m: nn.Module) -> dict[str, float]:  # the reward's measurement, exactly as the env's of a plan
        return env.measure_network(m).to_dict()

    out = finetune_dir(cfg.work_dir, cfg.problem.macs_target) / f"seed{seed}" / f"{name}-finetune.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    ft_cfg = dataclasses.replace(cfg.finetune, seed=seed, device=str(device), progress=cfg.progress)
    _, result = finalize(base, splits, plan=plan, model=model, bn=env.config.bn, finetune_cfg=ft_cfg,
                         layers=env.layers, out=out, resume=cfg.resume, probe=val_like_env,
                         teacher_cache=ctx.teacher_cache,
                         meta={"algorithm": name, "benchmark": "marl"})
    val_acc_before, quality = result["probe"]["acc"], result["probe"]["quality"]
    acc_ratio = val_acc_before / max(env.baseline_acc, 1e-9)
    before = result["accuracy"]["after_bn_recal"] or result["accuracy"]["after_pruning"]
    ft = result["finetune"] or {}
    return {
        "algorithm": name, "seed": seed,
        "val_objective": objective_of(env, val_acc_before, result["macs"], quality=quality),
        "search_val_objective": search["best"]["objective"] if search else None,
        "val_acc_ratio": acc_ratio,
        "macs_ratio": result["macs"] / baseline["macs"], "params_ratio": result["params"] / baseline["params"],
        "macs": result["macs"], "params": result["params"],
        "test_acc_before_finetune": before["test"], "test_acc": result["test_acc"],
        "retention": result["test_acc"] / baseline["test_acc"] if baseline["test_acc"] > 0 else None,
        "val_acc_after_finetune": ft.get("val_acc"), "finetune_best_epoch": ft.get("best_epoch"),
        "seconds": round(time.perf_counter() - t0, 2), **extra,
    }


def run_selection(cfg: BenchConfig, ctx: Context, name: str, seed: int, search: dict[str, Any], mode: str,
                  baseline: dict[str, Any]) -> dict[str, Any]:
    """The final selection of one method and seed in ``mode`` (``own`` or ``own+reference``), then the winner's
    fine-tune continued to the full budget and tested, as :func:`run_finetune` tests the search's best plan.

    The own candidates are the search's recorded ``top`` plans (a search recorded before they were kept knows its
    best plan only); the references are the same for every method (:meth:`Context.references`)."""
    env, device = ctx.env, ctx.device
    t0 = time.perf_counter()
    budget = selection_budget(cfg.problem.reward, cfg.problem.macs_target, search["best"]["macs_ratio"])
    top = search.get("top") or [search["best"]]
    if search.get("keep_top", 1) < cfg.selection.k:
        print(f"marl: seed {seed} {name}: the recorded search kept {len(top)} best plans, fewer than "
              f"--selection-k {cfg.selection.k}: its selection has only those (rerun the search without --resume "
              "for more)", file=sys.stderr)
    refs = ctx.references(budget) if mode == "own+reference" else None
    limit = budget + MACS_SLACK
    candidates = selection_candidates(top, refs, cfg.selection.k, max_macs_ratio=limit)
    out = finetune_dir(cfg.work_dir, cfg.problem.macs_target) / f"seed{seed}" / f"{name}-{mode}"
    ft_cfg = dataclasses.replace(cfg.finetune, seed=seed, device=str(device), progress=cfg.progress)
    _, result = select_and_finalize(env.base_model, env.splits, candidates, cfg.selection, ft_cfg, out_dir=out,
                                    bn=env.config.bn, layers=env.layers, resume=cfg.resume, max_macs_ratio=limit,
                                    teacher_cache=ctx.teacher_cache, shared_dir=out.parent / "candidates",
                                    meta={"algorithm": name, "benchmark": "marl", "selection": mode})
    record = result["selection"]
    plan = candidates[record["winner"]].plan
    measured = env.measure(plan)  # the winner's validation objective before fine-tuning, as the search sees a plan
    before = result["accuracy"]["after_bn_recal"] or result["accuracy"]["after_pruning"]
    ft = result["finetune"] or {}
    return {
        "algorithm": name, "seed": seed, "selection": mode, "winner": record["winner"],
        "winner_source": record["winner_source"],
        "candidates": [{k: c[k] for k in ("index", "source", "search_objective", "macs_ratio", "scores")}
                       for c in record["candidates"]],
        "rungs": record["rungs"], "cost_epochs": record["cost_epochs"],
        "val_objective": measured.objective,
        "macs_ratio": result["macs"] / baseline["macs"], "params_ratio": result["params"] / baseline["params"],
        "macs": result["macs"], "params": result["params"],
        "test_acc_before_finetune": before["test"], "test_acc": result["test_acc"],
        "retention": result["test_acc"] / baseline["test_acc"] if baseline["test_acc"] > 0 else None,
        "val_acc_after_finetune": ft.get("val_acc"), "seconds": round(time.perf_counter() - t0, 2),
        "keep": plan.keep_counts(),
    }


# ----------------------------------------------------------------------------- bookkeeping


def finetune_dir(work_dir: str, macs_target: float) -> Path:
    """The fine-tuning checkpoints' folder of a run: one per MACs target (runs of several targets may share
    --work-dir, side by side too); the run holds its lock."""
    return Path(work_dir) / f"target-{macs_target:g}"


def _keys(cfg: BenchConfig) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The settings that define the searches' results, those that define the fine-tunes', and those that define
    the selections' (which depend on the fine-tunes' too)."""
    flat = without_run_only(BenchConfig, flat_dict(cfg))
    ft = {k: v for k, v in flat.items() if k.startswith("finetune_") or k in _FINETUNE_KEYS}
    sel = {k: v for k, v in flat.items() if k.startswith("selection_")}
    search = {k: v for k, v in flat.items() if k not in ft and k not in sel}
    return json.loads(json.dumps(search)), json.loads(json.dumps(ft)), json.loads(json.dumps(sel))


def _load_state(path: Path, cfg: BenchConfig) -> tuple[dict[str, Any], bool, bool]:
    """The recorded results to resume from (empty when starting over), whether fine-tunes may resume, and whether
    selections may (their stage states under --work-dir)."""
    search_cfg, ft_cfg, sel_cfg = _keys(cfg)
    digest = None if cfg.checkpoint is None else ckpt.weights_digest(ckpt.load(cfg.checkpoint).model)
    fresh = {"benchmark": "marl", "search_config": search_cfg, "finetune_config": ft_cfg,
             "selection_config": sel_cfg, "reference_sources": list(REFERENCE_SOURCES), "baseline_digest": digest,
             "runs": {}}
    if not (cfg.resume and path.is_file()):
        return fresh, False, False
    state = json.loads(path.read_text())
    recorded = state.setdefault("baseline_digest", digest)  # runs recorded before the digest: taken as this one
    if recorded != digest:
        raise ValueError(f"{path} holds results measured on another baseline (weights digest {recorded}; "
                         f"{cfg.checkpoint} is {digest}, e.g. retrained on another machine): resume only on the "
                         "same baseline (--checkpoint), or pass another --out-dir")
    old = without_run_only(BenchConfig, state.get("search_config", {}))
    if search_cfg != old:
        diff = sorted(k for k in set(search_cfg) | set(old) if search_cfg.get(k) != old.get(k))
        raise ValueError(f"{path} holds results of other search settings ({', '.join(diff)}); drop --resume to "
                         "start over or pass another --out-dir")
    # The reference set grew once (the gradual plan): runs recorded before it name none and had uniform + global.
    refs, state["reference_sources"] = state.get("reference_sources", ["uniform", "global"]), list(REFERENCE_SOURCES)
    if ft_cfg != without_run_only(BenchConfig, state.get("finetune_config", {})):
        # The searches stay valid; the fine-tunes (and their checkpoints) do not.
        print("marl: fine-tuning settings changed: recorded fine-tunes are discarded, searches kept", file=sys.stderr)
        for run in state["runs"].values():
            run["finetune"], run["selection"] = {}, {}
        state["finetune_config"], state["selection_config"] = ft_cfg, sel_cfg
        return state, False, False
    # A run recorded before the selection modes existed has no selection settings: it has no selection either.
    if state.setdefault("selection_config", sel_cfg) != sel_cfg:
        print("marl: selection settings changed: recorded selections are discarded, searches and fine-tunes kept",
              file=sys.stderr)
        for run in state["runs"].values():
            run["selection"] = {}
        state["selection_config"] = sel_cfg
        return state, True, False
    if refs != list(REFERENCE_SOURCES):
        print(f"marl: the reference plans changed ({', '.join(refs)} -> {', '.join(REFERENCE_SOURCES)}): recorded "
              "own+reference selections are discarded, the rest kept", file=sys.stderr)
        for seed, run in state["runs"].items():
            run.get("selection", {}).pop("own+reference", None)
            for stage in (finetune_dir(cfg.work_dir, cfg.problem.macs_target) / f"seed{seed}").glob("*-own+reference"):
                shutil.rmtree(stage)  # its candidates are no longer this run's: never continued
    return state, True, True


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating, torch.Tensor)):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _save_state(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: an interrupted write never loses what was recorded before."""
    ckpt.atomic_write_text(path, json.dumps(state, indent=1, default=_jsonable))


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.marl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, BenchConfig)
    args = parser.parse_args(argv)
    argv_list = list(argv) if argv is not None else sys.argv[1:]
    try:
        cfg = _check(config_from_args(BenchConfig, args))
    except (ValueError, TypeError) as exc:
        parser.exit(2, f"error: {exc}\n")
    out_dir = Path(cfg.out_dir)
    work = finetune_dir(cfg.work_dir, cfg.problem.macs_target)
    with hold_outputs("marl", files=[("--out-dir", out_dir / STATE_FILE)], folders=[("--work-dir", work)]):
        try:
            state, ft_resume, sel_resume = _load_state(out_dir / STATE_FILE, cfg)
        except (ValueError, TypeError) as exc:
            parser.exit(2, f"error: {exc}\n")
        return _main(cfg, argv_list, state, ft_resume, sel_resume)


def _main(cfg: BenchConfig, argv_list: list[str], state: dict[str, Any], ft_resume: bool, sel_resume: bool) -> int:
    out_dir = Path(cfg.out_dir)
    json_path = out_dir / STATE_FILE
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    header = {"command": "python -m benchmarks.marl " + shlex.join(argv_list), "commit": git_commit(ROOT),
              "machine": machine_description(),
              "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    ctx = Context(cfg)
    # A fine-tune checkpoint may be continued only when its recorded settings still hold.
    cfg_ft = dataclasses.replace(cfg, resume=ft_resume)
    cfg_sel = dataclasses.replace(cfg, resume=sel_resume)  # a selection's stage state: only of the same settings
    reused = 0
    try:
        # 1. The searches: every algorithm, every seed, a fresh env each (Ray only while they run, --workers > 1).
        with ray_session(cfg.parallel):
            try:
                for seed in cfg.seeds:
                    run = state["runs"].setdefault(str(seed), {"search": {}, "finetune": {}})
                    for name in cfg.algos:
                        if name in run["search"]:
                            reused += 1
                            print(f"marl: seed {seed} {name}: search recorded in {json_path.name}, skipped",
                                  file=sys.stderr)
                            continue
                        run["search"][name] = run_search(cfg, ctx, name, seed)
                        _save_state(json_path, state)
            finally:
                if ctx.evaluator is not None:
                    ctx.evaluator.close()
                    ctx.evaluator = None
        # 2. The unpruned baseline, then identical finalization of every best plan and of Torch-Pruning's network.
        if "baseline" not in state:
            env = ctx.env
            s = env.splits
            rep = count(env.base_model, env.input_shape)
            state["baseline"] = {"test_acc": evaluate(env.base_model, s.test, mean=s.mean, std=s.std,
                                                      device=ctx.device),
                                 "val_acc": env.baseline_acc, "macs": rep.macs, "params": rep.params,
                                 "layers": env.layer_names, "env_config": config_dict(env.config)}
            _save_state(json_path, state)
        for seed in cfg.seeds:
            run = state["runs"][str(seed)]
            # selection "none": the searches' best plans (when asked for) and Torch-Pruning's network (always)
            for name in [*(cfg.algos if "none" in cfg.selections else []), TP_NAME]:  # TP last: QMIX's MACs
                if name in run["finetune"]:
                    reused += 1
                    continue
                target = None
                if name == TP_NAME:
                    qmix = run["finetune"].get("qmix")
                    target = qmix["macs_ratio"] if (cfg.tp_target == "qmix" and qmix) else cfg.problem.macs_target
                print(f"marl: seed {seed} {name}: fine-tuning", file=sys.stderr)
                run["finetune"][name] = run_finetune(cfg_ft, ctx, name, seed, run["search"].get(name), target,
                                                     state["baseline"])
                _save_state(json_path, state)
            for mode in [m for m in SELECTIONS if m != "none" and m in cfg.selections]:
                done = run.setdefault("selection", {}).setdefault(mode, {})
                for name in cfg.algos:
                    if name in done:
                        reused += 1
                        continue
                    print(f"marl: seed {seed} {name}: selection {mode}", file=sys.stderr)
                    done[name] = run_selection(cfg_sel, ctx, name, seed, run["search"][name], mode, state["baseline"])
                    _save_state(json_path, state)
    except KeyboardInterrupt:
        _save_state(json_path, state)
        print(f"\ninterrupted: finished parts are in {json_path}; rerun the same command with --resume to continue",
              file=sys.stderr)
        return 130

    wall = time.perf_counter() - t_start
    header["wall"] = f"{wall:.0f} s" + (f" ({reused} recorded parts reused from marl.json)" if reused else "")
    env_cfg = state["baseline"]["env_config"]
    net, dataset = ("tiny", "synthetic") if cfg.env == TINY_ID else _net_dataset(cfg)
    header["problem"] = (f"{cfg.env or net + f' width {cfg.width:g}'} on {dataset}"
                         + (f", baseline `{Path(cfg.checkpoint).name}`" if cfg.checkpoint else "")
                         + f"; env: criterion {env_cfg['criterion']} ({env_cfg['direction']}), "
                         f"{env_cfg['eval_size']} validation images per reward, {env_cfg['calib_size']} calibration "
                         f"images, BN re-estimated on {env_cfg['bn_recal_batches']} batches")
    flat = SimpleNamespace(**flat_dict(cfg))
    state["header"] = header
    state["rows"] = result_rows(state, cfg.problem.macs_target)
    state["summary"] = summary(state, flat)
    _save_state(json_path, state)
    plots(state, flat, out_dir)
    write_report(state, flat, out_dir, header)
    print(state["summary"], file=sys.stderr)
    print_json({"out_dir": str(out_dir), "wall_seconds": round(wall, 1), "reused": reused})
    return 0


if __name__ == "__main__":
    sys.exit(main())
