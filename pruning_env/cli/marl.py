"""Learn a per-layer pruning policy with multi-agent RL, prune, fine-tune, report (``python train_marl.py``).

    python train_marl.py --net vgg16                      # preset "cpu" without a GPU, "paper" with one
    python train_marl.py --env pruning_env/Tiny-v1 --preset smoke --algo qmix

Steps: (1) load the trained baseline (``--checkpoint``, else the cache, else train
it), (2) search with the algorithm on the pruning env (:class:`pruning_env.search.Search`:
a budget of ``--plans`` measured plans, greedy evaluations every ``--eval-every``
episodes, TensorBoard logs under ``--logdir`` with plans measured as the x axis),
keeping the best plans by the VALIDATION objective and the accuracy-vs-MACs Pareto
front of every plan measured, (3) select and finalize a plan: by default the final selection
(:mod:`pruning_env.training.selection`, ``--selection-*``: the ``--selection-k`` best distinct plans
of the search plus the reference plans at the same MACs budget (uniform, gradual uniform, Torch-Pruning-style
global), short KD fine-tunes with
successive halving judged on VALIDATION accuracy, the winner's fine-tune continued to the full budget;
``--no-selection``: the search's best plan), through
:func:`pruning_env.training.finalize.finalize` (surgery, BN re-estimated as the env
does, fine-tuning with knowledge distillation from the unpruned network by default)
and (4) report on the TEST split: accuracy, retention, MACs / params and their
reductions, CPU latency. Outputs under ``--logdir``: report.json, report.md,
pareto.png, learning_curve.png, pruned_model.pt, plan.json, train_state.pt (for
--resume), selection/ (the selection's state: selection.json, one fine-tuning checkpoint per
candidate) and TensorBoard events.

Every setting of the env (:class:`pruning_env.EnvConfig`), of the search
(:class:`pruning_env.search.SearchConfig`) and of the fine-tuning
(:class:`pruning_env.training.finetune.FinetuneConfig`, flags ``--finetune-*``) is a
flag; agent hyper-parameters are set with ``--algo-config '{"qmix": {"lr": 0.0005}}'``.
A preset (``--preset``) fills the budget-like settings it names; a flag you type wins.

The search is checkpointed after every finished episode (agents, optimiser, replay
buffer, RNG states, best plan, every point measured), so after Ctrl-C or a kill
``--resume`` continues exactly where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import agents
import pruning_env
from pruning_env.cli.options import add_config_args, config_from_args, print_json
from pruning_env.core import checkpoint as ckpt
from pruning_env.core.config import (
    check_settings,
    config_mismatch,
    flat_dict,
    mismatch_message,
    nested,
    option,
    resolve_device,
    seed_everything,
    with_overrides,
)
from pruning_env.core.data import DataError, data_dir, dataset_info
from pruning_env.core.models import build, list_models
from pruning_env.engine.budget import check_reachable
from pruning_env.engine.graph import prunable_layers
from pruning_env.engine.macs import MacsModel
from pruning_env.engine.plan import PruningPlan
from pruning_env.envs.config import EnvConfig, changed_settings
from pruning_env.envs.env import FilterPruningEnv
from pruning_env.envs.plans import reference_plans
from pruning_env.envs.registry import TINY_ID, check_env_id, make_benchmark_env, parse_env_id
from pruning_env.search import Search, SearchConfig, algorithm_env, algorithm_overrides, check_algo_config, pareto_front
from pruning_env.search.parallel import WorkersConfig, ray_session, scale_out
from pruning_env.training.finalize import finalize, latency
from pruning_env.training.finetune import FinetuneConfig
from pruning_env.training.selection import (
    MACS_SLACK,
    SelectionConfig,
    markdown_table,
    select_and_finalize,
    selection_budget,
    selection_candidates,
)
from pruning_env.training.selection import check_finetune as check_selection_finetune

__all__ = ["PRESETS", "RunConfig", "main", "make_env", "make_search", "resolve"]

PRESETS: dict[str, dict[str, Any]] = {
    # seconds: for tests and a first look (use with --env pruning_env/Tiny-v1)
    "smoke": dict(plans=24, eval_every=4, finetune_epochs=1, latency_repeats=3, width=0.125, eval_size=200,
                  calib_size=64, baseline_epochs=1, selection_k=2),
    # a machine without a GPU: VGG-16 at width 0.25, about an hour with a cached baseline
    "cpu": dict(plans=1200, eval_every=20, finetune_epochs=8, latency_repeats=30, width=0.25, eval_size=1000,
                calib_size=128, baseline_epochs=30),
    # GPU scale: full width
    "paper": dict(plans=3000, eval_every=50, finetune_epochs=60, latency_repeats=50, width=1.0, eval_size=5000,
                  eval_batch_size=2500, calib_size=128, baseline_epochs=200),
}
STATE_FILE = "train_state.pt"


@dataclass
class RunConfig:
    """Everything train_marl.py does (settings marked "preset" come from --preset unless given)."""

    net: str = option("vgg16", "network to prune", choices=list_models())
    dataset: str = option("cifar10", "data set: cifar10, cifar100 or an image-folder name")
    data_dir: str | None = option(None, "data directory (default: $PRUNING_ENV_DATA, else the cache)", run_only=True)
    width: float = option(0.25, "channel width of the baseline (preset: smoke 0.125, cpu 0.25, paper 1)",
                          min=0, min_exclusive=True)
    env: str | None = option(None, "a registered env id (e.g. pruning_env/Tiny-v1) instead of --net/--dataset")
    algo: str = option("qmix", "algorithm: qmix, vdn, iql, amc, random, dsfp-uniform or module:name "
                       "(a module registering an agents.Algorithm subclass, see agents/base.py)")
    problem: EnvConfig = nested(EnvConfig, "the pruning env (every setting of pruning_env.EnvConfig)")
    search: SearchConfig = nested(SearchConfig, "the search's budget (preset: plans smoke 24, cpu 1200, paper 3000; "
                                  "eval_every 4 / 20 / 50)")
    finetune: FinetuneConfig = nested(FinetuneConfig, "fine-tuning of the best plan (preset: epochs smoke 1, cpu 8, "
                                      "paper 60)", prefix="finetune")
    selection: SelectionConfig = nested(SelectionConfig, "the final selection among the search's best plans and "
                                        "the reference plans (preset: k smoke 2)", prefix="selection")
    parallel: WorkersConfig = nested(WorkersConfig, "parallel plan measurement on Ray (--workers, --ray-address)")
    seed: int = option(0, "seed of everything (env, agents, fine-tuning)", min=0)
    device: str = option("auto", "auto (CUDA if present), cpu, cuda, cuda:N: env, agents and fine-tuning",
                         run_only=True)
    logdir: str = option("runs/marl", "output folder: TensorBoard logs, report, plots, pruned model", run_only=True)
    checkpoint: str | None = option(None, "trained baseline checkpoint (default: cache, else train it)", run_only=True)
    baseline_epochs: int = option(30, "epochs of the cached/trained baseline (preset: smoke 1, cpu 30, paper 200)",
                                 min=1)
    resume: bool = option(False, "continue the search saved in --logdir (same settings only)", run_only=True)
    overwrite: bool = option(False, "replace an earlier run in --logdir (without it an earlier run is refused)",
                             run_only=True)
    preset: str | None = option(None, "smoke, cpu or paper (default: paper with a GPU, cpu without)",
                                choices=list(PRESETS), run_only=True)
    latency_repeats: int = option(30, "timed forward passes per latency measurement (0: skip; preset: 3 / 30 / 50)",
                                 min=0, run_only=True)
    progress: bool = option(True, "show progress bars", run_only=True)

    def __post_init__(self) -> None:
        check_settings(self)


def _preset_name(preset: str | None) -> str:
    return preset or ("paper" if torch.cuda.is_available() else "cpu")


def resolve(cfg: RunConfig) -> RunConfig:
    """Check every setting before any work starts (raises ``ValueError`` with the flag to fix)."""
    if cfg.algo not in agents.list_algorithms() and ":" not in cfg.algo:
        raise ValueError(f"unknown algorithm {cfg.algo!r}; choose one of {', '.join(agents.list_algorithms())}")
    try:
        algorithm = agents.get_algorithm(cfg.algo)  # imports a module:name plug-in, so a typo fails now
    except ImportError as exc:
        raise ValueError(f"--algo {cfg.algo}: cannot import its module ({exc}); check the module name and that "
                         "its folder is on PYTHONPATH (or run from the folder holding it)") from None
    except TypeError as exc:  # e.g. a plug-in class that breaks the Algorithm contract (agents/base.py)
        raise ValueError(f"--algo {cfg.algo}: {exc}") from None
    check_algo_config(cfg.search, {cfg.algo: algorithm}, cfg.problem.episode_length)
    if cfg.env is not None:
        check_env_id(cfg.env)  # unknown, or a removed -v0 id (named with its -v1 id)
    if cfg.env is None and cfg.dataset not in ("cifar10", "cifar100"):
        root = data_dir(cfg.data_dir)
        if not ((root / cfg.dataset / "train").is_dir() or (root / "train").is_dir()):
            raise ValueError(f"unknown data set {cfg.dataset!r}: not cifar10/cifar100 and no image folder "
                             f"{root / cfg.dataset}/train/<class>/ (set --data-dir or PRUNING_ENV_DATA)")
    cfg.finetune.check()
    if cfg.selection.enabled:
        check_selection_finetune(cfg.finetune)
    cfg.parallel.check()
    baseline = _check_checkpoint(cfg) if cfg.checkpoint else None
    problem = cfg.problem
    if problem.budget_target is not None:  # before a baseline is trained: on the baseline or an untrained copy
        model, input_shape = (baseline.model, baseline.input_shape) if baseline is not None else _untrained(cfg)
        macs = MacsModel.from_model(model, input_shape, layers=prunable_layers(model, input_shape))
        check_reachable(macs, problem.rule, max(problem.rates), problem.budget_target)
    resolve_device(cfg.device)
    return cfg


def _check_checkpoint(cfg: RunConfig) -> ckpt.Checkpoint:
    """--checkpoint must hold the network the run prunes (--net, or the --env's); returns it."""
    net = _net_of(cfg)
    try:
        return ckpt.load(cfg.checkpoint, expect_arch=net)  # type: ignore[arg-type]
    except ckpt.CheckpointError as exc:
        flag = "--net" if cfg.env is None else "--env"
        raise ValueError(f"--checkpoint: {exc} (the network {flag} asks for); pass the checkpoint of a {net} "
                         f"or the {flag} it was trained as") from None


def _net_of(cfg: RunConfig) -> str:
    return cfg.net if cfg.env is None else parse_env_id(cfg.env).net


def _untrained(cfg: RunConfig) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    """An untrained copy of the network the run prunes, with the data set's classes, and the data's image shape."""
    dataset = cfg.dataset if cfg.env is None else parse_env_id(cfg.env).dataset
    try:
        info = dataset_info(dataset, cfg.data_dir)
    except DataError as exc:
        raise ValueError(f"--dataset {dataset}: {exc}") from None
    net = _net_of(cfg)
    model = build(net, num_classes=info.num_classes, in_channels=info.input_shape[0],
                  width=1.0 if net == "tiny" else cfg.width)
    return model, info.input_shape


def make_env(cfg: RunConfig) -> FilterPruningEnv:
    """The pruning env of this run (registered id or net/dataset with its baseline)."""
    settings = changed_settings(cfg.problem)
    if cfg.env is not None:
        if cfg.env != TINY_ID:
            settings.update(device=cfg.device, width=cfg.width, baseline_epochs=cfg.baseline_epochs,
                            data_dir=cfg.data_dir)
            if cfg.checkpoint:
                settings["checkpoint"] = cfg.checkpoint
        return pruning_env.make(cfg.env, **settings)
    return make_benchmark_env(cfg.net, cfg.dataset, width=cfg.width, checkpoint=cfg.checkpoint,
                              data_dir=cfg.data_dir, baseline_epochs=cfg.baseline_epochs, device=cfg.device,
                              **settings)


def make_search(cfg: RunConfig, env: FilterPruningEnv, writer: Any = None) -> Search:
    """The algorithm (on the view its ``env_api`` asks for, with the budget's hints) inside a :class:`Search`."""
    cls = agents.get_algorithm(cfg.algo)
    over = algorithm_overrides(cls, cfg.algo, cfg.search, cfg.problem.episode_length)
    algo = agents.make_algorithm(cfg.algo, algorithm_env(cls, env), seed=cfg.seed,
                                 device=resolve_device(cfg.device), **over)
    return Search(algo, env, cfg.search, writer=writer, progress=cfg.progress, desc=f"{cfg.algo} search",
                  keep_top=cfg.selection.k)


def _markdown_table(d: dict[str, Any]) -> str:
    return "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in d.items())


def _plots(search: Search, algo: str, logdir: Path, baseline_acc: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = search.points
    ax.scatter([p["macs_ratio"] for p in pts], [p["acc_ratio"] for p in pts], s=8, alpha=0.4, label="plans evaluated")
    front = pareto_front(pts)
    ax.plot([p["macs_ratio"] for p in front], [p["acc_ratio"] for p in front], "r.-", label="Pareto front")
    if search.best:
        ax.plot([search.best["macs_ratio"]], [search.best["acc_ratio"]], "k*", ms=12, label="best (objective)")
    ax.set_xlabel("MACs ratio (pruned / unpruned)")
    ax.set_ylabel(f"validation accuracy ratio (base {baseline_acc:.1f} %)")
    ax.set_title(f"{algo}: accuracy vs MACs (before fine-tuning)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(logdir / "pareto.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    train = [c for c in search.curve if c["source"] == "train"]
    greedy = [c for c in search.curve if c["source"] == "greedy"]
    xs = [c["plans"] for c in train]
    obj = np.asarray([c["objective"] for c in train])
    ax.plot(xs, obj, alpha=0.3, label="training episode objective")
    if len(obj) >= 5:
        k = max(5, len(obj) // 20)
        ax.plot(xs[k - 1:], np.convolve(obj, np.ones(k) / k, mode="valid"), label=f"moving mean ({k})")
    if greedy:
        ax.plot([g["plans"] for g in greedy], [g["objective"] for g in greedy], "o-", label="greedy evaluation")
    ax.plot([c["plans"] for c in search.curve], [c["best"] for c in search.curve], "k--", lw=1, label="best so far")
    ax.set_xlabel("plans measured")
    ax.set_ylabel("final objective (validation)")
    ax.set_title(f"{algo}: learning curve")
    ax.legend()
    fig.tight_layout()
    fig.savefig(logdir / "learning_curve.png", dpi=110)
    plt.close(fig)


def finish(cfg: RunConfig, env: FilterPruningEnv, search: Search, logdir: Path, writer: Any = None) -> dict[str, Any]:
    """Select (by default) and finalize a plan (surgery, BN as the env, fine-tuning), test it, write the report."""
    assert search.best is not None
    device = resolve_device(cfg.device)
    base, splits, shape = env.base_model, env.splits, env.input_shape
    ft_cfg = dataclasses.replace(cfg.finetune, seed=cfg.seed, device=str(device), progress=cfg.progress)
    if cfg.selection.enabled:
        budget = selection_budget(cfg.problem.reward, cfg.problem.macs_target, search.best["macs_ratio"])
        refs = reference_plans(env, budget) if cfg.selection.references else None
        candidates = selection_candidates(search.top, refs, cfg.selection.k, max_macs_ratio=budget + MACS_SLACK)
        limit = budget + MACS_SLACK
        pruned, result = select_and_finalize(base, splits, candidates, cfg.selection, ft_cfg,
                                             out_dir=logdir / "selection", bn=env.config.bn, layers=env.layers,
                                             resume=cfg.resume, max_macs_ratio=limit, writer=writer,
                                             meta={"algorithm": cfg.algo})
        plan = candidates[result["selection"]["winner"]].plan
    else:
        plan = PruningPlan.from_dict(search.best["plan"])
        pruned, result = finalize(base, splits, plan=plan, bn=env.config.bn, finetune_cfg=ft_cfg, layers=env.layers,
                                  out=logdir / "finetune.pt", resume=cfg.resume, meta={"algorithm": cfg.algo})
    stages = result["accuracy"]
    before = (stages["after_bn_recal"] or stages["after_pruning"])["test"]
    lat_pruned = latency(pruned, shape, cfg.latency_repeats) or {}
    lat_base = latency(base, shape, cfg.latency_repeats) or {}
    lat = {f"latency_ms_b{b}": lat_pruned.get(f"batch_{b}") for b in (1, 64)}
    lat.update({f"baseline_latency_ms_b{b}": lat_base.get(f"batch_{b}") for b in (1, 64)})
    ft = result["finetune"] or {}
    report = {
        "algorithm": cfg.algo,
        "network": getattr(base, "arch", type(base).__name__),
        "dataset": splits.name,
        "test_acc": result["test_acc"],
        "val_acc": result["val_acc"],
        "test_acc_before_finetune": before,
        "baseline_test_acc": result["baseline"]["test"],
        "retention": result["retention"],
        **{k: result[k] for k in ("macs", "baseline_macs", "macs_reduction", "params", "baseline_params",
                                  "params_reduction")},
        **lat,
        "search": {"episodes": search.episodes, "plans_evaluated": search.plans_used,
                   "greedy_evaluations": search.greedy_evaluations,
                   "best_val_objective": search.best["objective"], "best_val_acc_ratio": search.best["acc_ratio"],
                   "best_macs_ratio": search.best["macs_ratio"], "reward": cfg.problem.reward,
                   "macs_target": cfg.problem.macs_target, "lam": cfg.problem.lam},
        "finetune": {"epochs": cfg.finetune.epochs, "kd": cfg.finetune.kd,
                     **{k: v for k, v in ft.items() if k in ("val_acc", "initial_val_acc", "best_epoch", "seconds")}},
        "selection": _selection_summary(result.get("selection")),
        "keep_ratios": plan.keep_ratios(),
        "plan": plan.to_dict(),
        "config": flat_dict(cfg),
    }
    ckpt.atomic_write_text(logdir / "plan.json", plan.to_json())
    ckpt.save(logdir / "pruned_model.pt", pruned, input_shape=shape, dataset=splits.name, classes=splits.classes,
              metrics={"test_acc": result["test_acc"], "val_acc": result["val_acc"]}, plan=plan.to_dict(),
              extra={"algorithm": cfg.algo, "criterion": cfg.problem.scoring.criterion,
                     "direction": cfg.problem.scoring.direction})
    ckpt.atomic_write_text(logdir / "report.json", json.dumps(report, indent=2, default=str))
    _plots(search, cfg.algo, logdir, env.baseline_acc)
    fmt = lambda v, d: "-" if v is None else f"{v:.{d}f}"  # latency is None with --latency-repeats 0
    rows = [("test accuracy (%)", f"{report['baseline_test_acc']:.2f}", f"{report['test_acc']:.2f}"),
            ("retention", "1.000", f"{report['retention']:.4f}"),
            ("MACs (M)", f"{report['baseline_macs'] / 1e6:.2f}", f"{report['macs'] / 1e6:.2f}"),
            ("params (M)", f"{report['baseline_params'] / 1e6:.3f}", f"{report['params'] / 1e6:.3f}"),
            ("CPU latency b1 (ms)", fmt(lat["baseline_latency_ms_b1"], 2), fmt(lat["latency_ms_b1"], 2)),
            ("CPU latency b64 (ms)", fmt(lat["baseline_latency_ms_b64"], 2), fmt(lat["latency_ms_b64"], 2))]
    md = [f"# {cfg.algo} on {report['network']} / {splits.name}", "",
          f"MACs reduction {100 * report['macs_reduction']:.1f} %, params reduction "
          f"{100 * report['params_reduction']:.1f} %; test accuracy before fine-tuning {before:.2f} %.", "",
          "| | baseline | pruned |", "|---|---|---|", *[f"| {a} | {b} | {c} |" for a, b, c in rows], "",
          f"Search: {search.episodes} episodes, {search.plans_used} plans measured; best validation objective "
          f"{search.best['objective']:.4f} (acc ratio {search.best['acc_ratio']:.4f}, MACs ratio "
          f"{search.best['macs_ratio']:.4f}).", "",
          "Kept filters per layer: " + ", ".join(f"{n} {len(k)}/{plan.widths[n]}" for n, k in plan.keep.items()),
          "", *_selection_markdown(result.get("selection")),
          "![Pareto](pareto.png) ![learning curve](learning_curve.png)", ""]
    ckpt.atomic_write_text(logdir / "report.md", "\n".join(md))
    return report


def _selection_summary(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The report's ``selection``: every candidate (source, search objective, MACs ratio, validation accuracy per
    rung), the rungs and the winner; ``None`` with --no-selection."""
    if record is None:
        return None
    cands = [{k: c[k] for k in ("index", "source", "search_objective", "macs_ratio", "scores")}
             for c in record["candidates"]]
    return {"winner": record["winner"], "winner_source": record["winner_source"], "candidates": cands,
            "rungs": record["rungs"], "cost_epochs": record["cost_epochs"]}


def _selection_markdown(record: dict[str, Any] | None) -> list[str]:
    if record is None:
        return ["Final selection: off (--no-selection): the search's best plan was finalized.", ""]
    return [f"## Final selection: winner #{record['winner']} ({record['winner_source']})", "",
            f"Validation accuracy (%) of each candidate after each rung of short KD fine-tuning; "
            f"{record['cost_epochs']} candidate fine-tuning epochs spent in the rungs.", "",
            markdown_table(record), ""]


def _config(argv: list[str] | None, parser: argparse.ArgumentParser) -> RunConfig:
    args = parser.parse_args(argv)
    preset = _preset_name(getattr(args, "preset", None))
    base = with_overrides(RunConfig(), preset=preset, **PRESETS[preset])
    return resolve(config_from_args(RunConfig, args, base=base))


# What a run writes into --logdir (an earlier run's outputs: refused without --resume or --overwrite).
_OUTPUTS = (STATE_FILE, "finetune.pt", "selection", "report.json", "report.md", "pareto.png", "learning_curve.png",
            "plan.json", "pruned_model.pt", "tb")


def _earlier_outputs(logdir: Path) -> list[str]:
    return [name for name in _OUTPUTS if (logdir / name).exists()] if logdir.is_dir() else []


def _check_logdir(cfg: RunConfig) -> None:
    """--logdir must not hold an earlier run unless --resume or --overwrite says what to do (checked under its lock:
    a run that just finished may have written it)."""
    logdir = Path(cfg.logdir)
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --logdir and --overwrite replaces it: give one of them")
    if cfg.resume and not (logdir / STATE_FILE).is_file():
        raise ValueError(f"--resume given but {logdir / STATE_FILE} does not exist")
    earlier = _earlier_outputs(logdir)
    if earlier and not cfg.resume and not cfg.overwrite:
        raise ValueError(f"--logdir {logdir} holds an earlier run ({', '.join(earlier)}); pass --resume to continue "
                         "it, --overwrite to replace it, or choose another --logdir")


def _clear_outputs(logdir: Path) -> None:
    for name in _earlier_outputs(logdir):
        path = logdir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _load_state(cfg: RunConfig, state_file: Path) -> dict[str, Any]:
    """The saved search of ``--resume``; refused when unreadable, foreign or made with other settings.

    Loaded with ``weights_only=True``: the state is tensors and plain values only (the search's and the
    algorithms' ``state_dict`` promise it), so a copied or altered file cannot run code here.
    """
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Weights only load failed" in str(exc):  # objects that are not tensors or plain values (code to run?)
            found = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln.upper()), "a pickled object")
            raise ValueError(f"--resume: {state_file} holds objects other than tensors and plain values ({found}), as "
                             "no train_marl state does: it was not loaded, since loading it could run code. Pass "
                             "--overwrite instead of --resume to start afresh") from None
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"--resume: cannot read {state_file} ({reason}): it is truncated or not a train_marl state. "
                         "Pass --overwrite instead of --resume to start the search afresh") from None
    if not isinstance(state, dict) or not {"algorithm", "episodes", "points", "best"} <= set(state):
        raise ValueError(f"--resume: {state_file} is not a train_marl search state; pass --overwrite instead of "
                         "--resume to start afresh, or choose another --logdir")
    saved = state.get("run_config")
    if saved is None:
        print(f"note: {state_file} predates recorded settings; cannot check that they match", file=sys.stderr)
    else:
        diff = config_mismatch(saved, flat_dict(cfg), RunConfig)
        if diff:
            raise ValueError(mismatch_message(str(state_file), diff,
                                              "pass --overwrite (instead of --resume) to start afresh"))
    return state


def _run(cfg: RunConfig, logdir: Path) -> dict[str, Any] | int:
    from torch.utils.tensorboard import SummaryWriter

    state_file = logdir / STATE_FILE
    if cfg.overwrite:
        _clear_outputs(logdir)
    state = _load_state(cfg, state_file) if cfg.resume else None
    seed_everything(cfg.seed)
    env = make_env(cfg)
    # Seeded again after the env: training an uncached baseline draws from the global RNG, and a run's
    # result must not depend on what the cache held.
    seed_everything(cfg.seed)
    digest = ckpt.weights_digest(env.base_model)
    if state is not None and state.get("baseline_digest", digest) != digest:  # states before the digest: unchecked
        raise ValueError(f"--resume: the search in {state_file} ran on another baseline (weights digest "
                         f"{state['baseline_digest']}, this one's is {digest}; e.g. the cached baseline was retrained "
                         "on another machine): pass its --checkpoint, or --overwrite to start afresh")
    writer = SummaryWriter(str(logdir / "tb"))
    search = make_search(cfg, env, writer)
    evaluator = scale_out(search, cfg.parallel)  # None with --workers 1: the search runs as it always did
    if state is not None:
        try:
            search.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"--resume: {state_file} does not fit this search ({type(exc).__name__}: {exc}); pass "
                             "--overwrite instead of --resume to start afresh") from None
        print(f"resuming the search after episode {search.episodes} ({search.plans_used} plans)", file=sys.stderr)
    else:
        writer.add_text("hparams", _markdown_table(flat_dict(cfg)), 0)
    save = lambda: ckpt.atomic_save({**search.state_dict(), "run_config": flat_dict(cfg), "baseline_digest": digest},
                                    state_file)
    try:
        # Saved after every finished episode: a Ctrl-C (or a kill) mid-episode resumes from there,
        # never from a half-updated learner.
        search.run(after_episode=save)
    except KeyboardInterrupt:
        print(f"\ninterrupted: search saved to {state_file}; rerun with --resume", file=sys.stderr)
        return 130
    if evaluator is not None:
        evaluator.close()  # frees the workers' CPUs for the fine-tuning
    save()
    try:
        return finish(cfg, env, search, logdir, writer)
    except KeyboardInterrupt:
        saved = logdir / "selection" if cfg.selection.enabled else logdir / "finetune.pt"
        done = "finished fine-tuning epochs are saved in " + str(saved) if saved.exists() \
            else "no fine-tuning epoch had finished"
        stage = " (the selection stage)" if cfg.selection.enabled else ""
        print(f"\ninterrupted during the final fine-tuning{stage}: the search is saved in {state_file}, {done}; "
              "rerun with --resume to continue", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train_marl.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, RunConfig)
    try:
        cfg = _config(argv, parser)
        if Path(cfg.logdir).exists() and not Path(cfg.logdir).is_dir():
            raise ValueError(f"--logdir {cfg.logdir} is a file; give a folder (it will hold the logs, report, model)")
    except (ValueError, TypeError) as exc:
        parser.exit(2, f"error: {exc}\n")
    given = argv if argv is not None else sys.argv[1:]
    print(f"train_marl: preset {cfg.preset!r}" + ("" if "--preset" in given else " (chosen automatically: "
          + ("CUDA found)" if torch.cuda.is_available() else "no GPU found)")), file=sys.stderr)
    print("settings: " + json.dumps(flat_dict(cfg)), file=sys.stderr)
    logdir = Path(cfg.logdir)
    created = not logdir.exists()
    try:
        # locked first: a run on the same --logdir is refused naming it; Ray (--workers > 1) before any work, so a
        # cluster that cannot be joined fails first; stopped at the end
        with ckpt.run_lock(logdir):
            _check_logdir(cfg)
            with ray_session(cfg.parallel):
                report = _run(cfg, logdir)
    except OSError as exc:
        parser.exit(2, f"error: --logdir {logdir}: {exc.strerror or exc}; choose a writable folder\n")
    except (ValueError, RuntimeError) as exc:
        if created:  # a refused run leaves no empty folder behind
            with contextlib.suppress(OSError):
                logdir.rmdir()
        parser.exit(2, f"error: {exc}\n")
    if isinstance(report, int):
        return report
    summary = {k: report[k] for k in ("algorithm", "test_acc", "baseline_test_acc", "retention", "macs_reduction",
                                      "params_reduction")}
    summary["logdir"] = str(logdir)
    print_json(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
