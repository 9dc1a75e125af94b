"""The papers' setting on one GPU: full-width VGG-16, the DSFP comparison and the MARL search, in one script.

Stages (each reuses the package's pipeline or another benchmark's pieces, never a copy):

1. **baseline**: VGG-16 at width 1 on CIFAR-10 with :func:`pruning_env.training.train.train`'s default
   recipe (one-cycle SGD, label smoothing, batch augmentation x2, Cutout, EMA) for ``--baseline-epochs``
   (30); the anchors' standard accuracy is 93.5-94 %. Cached at
   ``default_checkpoint_path(net, dataset, width, epochs, seed)`` and reused (or resumed) when there;
2. **criteria**: DSFP (``low`` and ``high`` ends of the fused score, exact KL) and L1, Taylor-FO, FPGM
   and random filters at the uniform rates ``--uniform-rates`` (0.5 / 0.6 / 0.7), each finalized with the
   SAME knowledge-distillation fine-tune (``--finetune-*``): the rows of :mod:`benchmarks.criteria`
   (``prepare_net`` / ``run_row``: score on one calibration batch, ``plan_uniform``, ``finalize``);
3. **search**: QMIX vs DSFP-uniform vs AMC-style DDPG (``--algos``) on the pruning env at the MACs target
   ``--macs-target`` (0.3, the env's budget reward; the exact MACs budget of the reward issue applies once
   it is merged, as that issue makes it the budget reward's default), the same plan budget ``--plans``
   each, then each best plan finalized with the same KD fine-tune: the searches and fine-tunes of
   :mod:`benchmarks.marl` (``run_search`` / ``run_finetune``).

Writes ``--out`` (``benchmarks/results/paper_scale.md``): the baseline against the 93.5-94 % target,
retention (final / baseline test accuracy) of every row next to the DSFP paper's 98.23 % at 70 %, the
searches at the MACs target, and the time every stage took (next to the dry-run's projection when one was
made with the same ``--out``). Progress is saved after every row, search and fine-tune to the ``.json``
beside ``--out``; ``--resume`` keeps what is there (same settings) and skips it, without it the run
starts over. Fine-tuning checkpoints go to ``--work-dir``.

Budget: the defaults are sized for about 10 minutes on one H200-class GPU by ESTIMATE (no GPU was
available when they were chosen; ``--dry-run`` measures them, run it first): the baseline about half
(30 epochs of 2 x 45,000 augmented images of a 313 M-MAC network in bf16, roughly 170 TFLOP per epoch),
the 18 criteria rows and the 3 final fine-tunes most of the rest (2 KD epochs on the whole training
split each, on networks of 9-25 % of the MACs), the three searches the remainder (300 plans each: BN
re-estimation, a 5,000-image reward evaluation and DSFP's grad/Taylor pass per plan, plus the exact KL
of the unpruned network once per env). If the projection is over budget, lower ``--finetune-epochs``
or ``--plans`` first: the baseline's 30 epochs are what is expected to reach the standard accuracy. ``--dry-run``
times a few steps of every stage with the real settings and prints the projected total before any
long work; on a CPU it runs too (at full width that takes many minutes: ``--smoke --dry-run`` takes
seconds).

    python -m benchmarks.paper_scale --dry-run                 # the projection (GPU: about a minute, estimated)
    python -m benchmarks.paper_scale                           # the run (writes benchmarks/results/paper_scale.md)
    python -m benchmarks.paper_scale --resume                  # continue an interrupted run
    python -m benchmarks.paper_scale --smoke --out /tmp/ps.md  # the whole pipeline on CPU in seconds
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import agents
from benchmarks import criteria as criteria_bench
from benchmarks import marl as marl_bench
from benchmarks.common import (
    atomic_write_text,
    command_line,
    commit,
    config_parser,
    hold_outputs,
    log,
    machine,
    results_path,
    write_markdown,
)
from pruning_env.cli.options import config_from_args, print_json
from pruning_env.core import checkpoint as ckpt
from pruning_env.core.config import (
    flat_dict,
    nested,
    option,
    resolve_device,
    seed_everything,
    with_overrides,
    without_run_only,
)
from pruning_env.core.data import CalibrationConfig
from pruning_env.core.models import list_models
from pruning_env.envs.config import EnvConfig
from pruning_env.search import SearchConfig, check_algo_config
from pruning_env.training.finetune import FinetuneConfig
from pruning_env.training.train import TrainConfig, default_checkpoint_path, recipe_mismatch, train

__all__ = ["PAPER_RETENTION", "SMOKE", "PaperScaleConfig", "main", "parse_config"]

PAPER_RETENTION = 98.23
"""The DSFP paper's retention at a 70 % pruning rate (percent; after up to 700 epochs of fine-tuning)."""
BASELINE_TARGET = (93.5, 94.0)
"""The standard accuracy of VGG-16-BN on CIFAR-10 (percent; the anchors' reference numbers)."""
JSON_FORMAT = "pruning_env.bench.paper_scale/1"
DEFAULT_CRITERIA = ("dsfp-low-exact", "dsfp-high-exact", "l1", "taylor_fo", "fpgm", "random")

SMOKE: dict[str, Any] = dict(dataset="synthetic", width=0.125, baseline_epochs=1, uniform_rates=(0.5, 0.7),
                             eval_size=64, calib_size=16,
                             bn_recal_batches=1, plans=6, eval_every=2, finetune_epochs=1, finetune_train_limit=128,
                             dry_steps=1, dry_calib=4, out="runs/paper_scale_smoke/paper_scale.md",
                             work_dir="runs/paper_scale_smoke")
"""What ``--smoke`` sets (a flag you type wins): the whole pipeline on the seeded synthetic data in seconds, its
outputs under ``runs/`` (never over the real results in ``benchmarks/results``)."""


@dataclass
class PaperScaleConfig:
    """Every flag of ``python -m benchmarks.paper_scale`` (the command line is generated from these fields)."""

    net: str = option("vgg16", "architecture (the papers': vgg16)", choices=list_models())
    width: float = option(1.0, "channel width multiplier (1: the papers' full width)", min=0, min_exclusive=True)
    dataset: str = option("cifar10", "cifar10, cifar100 or synthetic (the in-process toy data of --smoke)")
    data_dir: str | None = option(None, "folder holding the data set (none: $PRUNING_ENV_DATA, else the cache)",
                                  run_only=True)
    baseline_epochs: int = option(30, "baseline training epochs (pruning_env.train's default recipe)", min=1)
    seed: int = option(0, "seed of the baseline, the rows, the searches and every fine-tune", min=0)
    criteria: tuple[str, ...] = option(DEFAULT_CRITERIA, "criterion variants of the uniform-rate rows (see "
                                       "benchmarks.criteria: dsfp-<low|high>-<kl mode>, l1, taylor_fo, fpgm, random)")
    uniform_rates: tuple[float, ...] = option((0.5, 0.6, 0.7), "uniform per-layer pruning rates of the rows",
                                              min=0, max=1, max_exclusive=True)
    algos: tuple[str, ...] = option(("qmix", "dsfp-uniform", "amc"), "searches at the MACs target")
    problem: EnvConfig = nested(EnvConfig, "the pruning env of the searches; its scoring batch, rate rule and BN "
                                "re-estimation also serve the rows (MACs target 0.3 and 5,000 validation images "
                                "per reward in batches of 2,500 here)",
                                default=EnvConfig(macs_target=0.3, eval_size=5000, eval_batch_size=2500))
    search: SearchConfig = nested(SearchConfig, "the plan budget of every search (300 plans, as benchmarks.marl)")
    finetune: FinetuneConfig = nested(FinetuneConfig, "the one KD fine-tune of every row and every best plan "
                                      "(2 epochs here)", prefix="finetune", default=FinetuneConfig(epochs=2))
    device: str = option("auto", "auto (CUDA if present, else CPU), cpu, cuda, cuda:N", run_only=True)
    out: str | None = option(None, "Markdown report (none: benchmarks/results/paper_scale.md); progress in the "
                             ".json beside it, the dry-run's projection in .dryrun.json", run_only=True)
    work_dir: str = option("runs/paper_scale", "folder of the fine-tuning checkpoints (for --resume)", run_only=True)
    resume: bool = option(False, "keep the finished rows, searches and fine-tunes in the .json (same settings)",
                          run_only=True)
    dry_run: bool = option(False, "time a few steps of every stage, print the projected total, and stop", run_only=True)
    dry_steps: int = option(3, "dry run: training / fine-tuning steps timed per measurement", min=1, run_only=True)
    dry_calib: int = option(16, "dry run: calibration images the scoring is timed on (scaled to --calib-size)",
                            min=1, run_only=True)
    smoke: bool = option(False, "tiny settings on synthetic data (CPU, seconds): " + ", ".join(
        f"{k}={v}" for k, v in SMOKE.items()), run_only=True)
    progress: bool = option(True, "progress bars", run_only=True)

    def __post_init__(self) -> None:
        self.finetune.check()
        for name in self.criteria:
            criteria_bench.parse_variant(name)  # raises naming the valid variants
        if not self.uniform_rates or not self.criteria:
            raise ValueError("--uniform-rates and --criteria need at least one entry each")

    def setup(self) -> dict[str, Any]:
        """The settings that define the results (a resume must have the same)."""
        return json.loads(json.dumps(without_run_only(PaperScaleConfig, flat_dict(self))))


def parse_config(argv: list[str] | None = None) -> PaperScaleConfig:
    """The config of a command line (``--smoke`` fills :data:`SMOKE` first); bad settings exit with usage."""
    parser = config_parser(PaperScaleConfig, "paper_scale", __doc__)
    args = parser.parse_args(argv)
    try:
        base = with_overrides(PaperScaleConfig(), **SMOKE) if getattr(args, "smoke", False) else None
        cfg = config_from_args(PaperScaleConfig, args, base=base)
        unknown = [a for a in cfg.algos if a not in agents.list_algorithms()]
        if unknown:
            raise ValueError(f"unknown algorithm(s) {unknown}; choose from {', '.join(agents.list_algorithms())}")
        check_algo_config(cfg.search, {a: agents.get_algorithm(a) for a in cfg.algos}, cfg.problem.episode_length)
        resolve_device(cfg.device)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
        raise
    return cfg


# ----------------------------------------------------------------------------- the stages


def train_config(cfg: PaperScaleConfig, device: torch.device, path: Path) -> TrainConfig:
    """The baseline's training run: pruning_env.train's default recipe at this net, width and epochs."""
    return TrainConfig(net=cfg.net, dataset=cfg.dataset, data_dir=cfg.data_dir, width=cfg.width,
                       epochs=cfg.baseline_epochs, seed=cfg.seed, device=str(device), out=str(path),
                       progress=cfg.progress)


def ensure_baseline(cfg: PaperScaleConfig, device: torch.device) -> tuple[Path, dict[str, Any]]:
    """Stage 1: the trained baseline (reused when finished with this recipe, resumed with --resume, else trained)."""
    path = default_checkpoint_path(cfg.net, cfg.dataset, cfg.width, cfg.baseline_epochs, seed=cfg.seed)
    tcfg = train_config(cfg, device, path)
    if path.is_file():
        loaded = ckpt.load(path, expect_arch=cfg.net)
        diff = recipe_mismatch(tcfg, loaded.train_config or {})
        if diff:
            raise ValueError(f"{path} holds a baseline trained with another recipe ({diff}, as (there, here)); "
                             "move it away to train this one")
        if "test_acc" in loaded.metrics:
            log(f"baseline: reusing {path} (test accuracy {loaded.metrics['test_acc']:.2f} %)")
            return path, {"reused": True, "test_acc": loaded.metrics["test_acc"]}
        if not cfg.resume:
            raise ValueError(f"{path} holds an unfinished baseline training: pass --resume to continue it, or "
                             "delete it to start afresh")
        tcfg = dataclasses.replace(tcfg, resume=True)
    log(f"baseline: training {cfg.net} width {cfg.width:g} for {cfg.baseline_epochs} epochs into {path}")
    summary = train(tcfg)
    return path, {"reused": False, **{k: summary[k] for k in ("test_acc", "test_acc_flip_tta", "val_acc",
                                                              "seconds")}}


def criteria_config(cfg: PaperScaleConfig) -> criteria_bench.CriteriaBenchConfig:
    """The rows' settings in :mod:`benchmarks.criteria`'s terms (scoring batch, rule and BN from the env's)."""
    p = cfg.problem
    return criteria_bench.CriteriaBenchConfig(
        nets=(cfg.net,), width=cfg.width, uniform_rates=cfg.uniform_rates, criteria=cfg.criteria, seeds=(cfg.seed,),
        dataset=cfg.dataset, data_dir=cfg.data_dir, baseline_epochs=(str(cfg.baseline_epochs),),
        baseline_seed=cfg.seed, train_missing=False, calibration=CalibrationConfig(p.scoring.calib_size),
        rule=p.rule, bn=p.bn, finetune=cfg.finetune, device=cfg.device, progress=False)


def marl_config(cfg: PaperScaleConfig, checkpoint: Path) -> marl_bench.BenchConfig:
    """The searches' settings in :mod:`benchmarks.marl`'s terms."""
    return marl_bench.BenchConfig(
        net=cfg.net, dataset=cfg.dataset, width=cfg.width, checkpoint=str(checkpoint), data_dir=cfg.data_dir,
        algos=list(cfg.algos), seeds=[cfg.seed], problem=cfg.problem, search=cfg.search, finetune=cfg.finetune,
        device=cfg.device, work_dir=cfg.work_dir, resume=cfg.resume, progress=cfg.progress)


def _search_summary(result: dict[str, Any]) -> dict[str, Any]:
    """What the report keeps of a search (not every point: at width 1 a plan lists thousands of filters)."""
    best = result["best"] or {}
    keep = {k: best.get(k) for k in ("objective", "acc_ratio", "macs_ratio", "acc")}
    return {"algorithm": result["algorithm"], "plans_used": result["plans_used"], "episodes": result["episodes"],
            "exhausted": result["exhausted"], "seconds": result["seconds"], "best": {**keep, "plan": best.get("plan")},
            "env_setup_seconds": result["env_setup_seconds"]}


# ----------------------------------------------------------------------------- report


def _pct(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def write_report(data: dict[str, Any], path: Path) -> None:
    """The Markdown report of ``data`` (the .json's content), written atomically."""
    base = data.get("baseline") or {}
    runs = data.get("runs", [])
    lines = ["# Paper scale: full-width VGG-16, DSFP vs the baselines, MARL search (issue 17)", "",
             f"Command: `{runs[-1]['command']}`; commit {runs[-1]['commit']}; {runs[-1]['date']}.  " if runs else "",
             f"Machine: {runs[-1]['machine']}." if runs else "", "",
             "## Baseline", "",
             f"Test accuracy **{_pct(base.get('test_acc'))} %** (target {BASELINE_TARGET[0]}-{BASELINE_TARGET[1]} %; "
             f"flip-TTA {_pct(base.get('test_acc_flip_tta'))} %), {data['setup']['baseline_epochs']} epochs"
             + (", reused from the cache." if base.get("reused") else "."), "",
             "## Uniform rates, same KD fine-tune", "",
             f"Retention = fine-tuned test accuracy / baseline test accuracy. DSFP paper: {PAPER_RETENTION} % at a "
             "70 % rate (after up to 700 epochs of fine-tuning; here "
             f"{data['setup']['finetune_epochs']} epochs).", "",
             "| criterion | rate | test after pruning | after BN | after fine-tune | retention % | MACs reduction |",
             "|---|---|---|---|---|---|---|"]
    for r in data.get("rows", []):
        lines.append(f"| {r['variant']} | {r['rate']:.0%} | {_pct(r['test_pruned'])} | {_pct(r['test_bn'])} | "
                     f"{_pct(r['test_ft'])} | {_pct(r['retention_ft'])} | {100 * r['macs_reduction']:.1f} % |")
    lines += ["", f"## Searches at the MACs target {data['setup']['macs_target']}", "",
              "| algorithm | plans | best val objective | MACs ratio | test before FT | test after FT | "
              "retention % |", "|---|---|---|---|---|---|---|"]
    for name, s in data.get("searches", {}).items():
        f = data.get("finals", {}).get(name, {})
        lines.append(f"| {name} | {s['plans_used']} | {_pct(s['best']['objective'], 4)} | "
                     f"{_pct(f.get('macs_ratio'), 4)} | {_pct(f.get('test_acc_before_finetune'))} | "
                     f"{_pct(f.get('test_acc'))} | {_pct(100 * f['retention'] if f.get('retention') else None)} |")
    projected = data.get("projection", {})
    lines += ["", "## Time per stage", "", "| stage | projected by --dry-run (s) | actual (s) |", "|---|---|---|"]
    for stage, actual in data.get("timings", {}).items():
        lines.append(f"| {stage} | {_pct(projected.get(stage), 0)} | {actual:.0f} |")
    write_markdown(path, "\n".join(lines))


# ----------------------------------------------------------------------------- main


def _load(json_path: Path, dry_path: Path, cfg: PaperScaleConfig) -> dict[str, Any]:
    setup = cfg.setup()
    data: dict[str, Any] = {"format": JSON_FORMAT, "setup": setup, "baseline": None, "rows": [], "searches": {},
                            "finals": {}, "timings": {}, "runs": []}
    if json_path.is_file() and cfg.resume:
        old = json.loads(json_path.read_text())
        stored = without_run_only(PaperScaleConfig, old.get("setup", {}))
        if stored != setup:
            diff = {k: (stored.get(k), setup.get(k)) for k in {*stored, *setup} if stored.get(k) != setup.get(k)}
            raise ValueError(f"{json_path} holds results of other settings ({diff}, as (stored, now)); rerun "
                             "without --resume to start over, or choose another --out")
        data = old
    elif json_path.is_file():
        log(f"starting over: {json_path} is overwritten (pass --resume to keep its results)")
    if dry_path.is_file():
        dry = json.loads(dry_path.read_text())
        if dry.get("setup") == setup:
            data["projection"] = dry["stages"]
    return data


def run(cfg: PaperScaleConfig, argv: list[str] | None) -> dict[str, Any]:
    """Every stage not yet in the .json; returns the paths written."""
    t_start = time.time()
    device = resolve_device(cfg.device)
    md_path = results_path(cfg.out, "paper_scale.md")
    json_path, dry_path = md_path.with_suffix(".json"), md_path.with_suffix(".dryrun.json")
    data = _load(json_path, dry_path, cfg)
    data["runs"].append({"command": command_line("paper_scale", argv), "commit": commit(),
                         "machine": machine() + f", device {device}",
                         "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M")})

    def save() -> None:
        atomic_write_text(json_path, json.dumps(data, indent=1, default=float))
        write_report(data, md_path)

    def timed(stage: str, t0: float) -> None:
        data["timings"][stage] = round(data["timings"].get(stage, 0.0) + time.perf_counter() - t0, 1)
        save()

    t0 = time.perf_counter()
    path, info = ensure_baseline(cfg, device)
    if data["baseline"] is None or not info["reused"]:
        data["baseline"] = info
    timed("baseline", t0)

    t0 = time.perf_counter()
    ccfg = criteria_config(cfg)
    net_ctx = criteria_bench.prepare_net(cfg.net, ccfg, device, {"baselines": {}}, {}, lambda: None)
    data["baseline"].update(macs=net_ctx["baseline"]["macs"], params=net_ctx["baseline"]["params"])
    done = {(r["variant"], float(r["rate"])) for r in data["rows"]}
    for variant in ccfg.variants:
        for rate in cfg.uniform_rates:
            if (variant.name, float(rate)) in done:
                continue
            log(f"row {variant.name} at {rate:.0%}")
            data["rows"].append(criteria_bench.run_row(net_ctx, variant, float(rate), cfg.seed, ccfg, device))
            timed("criteria", t0)
            t0 = time.perf_counter()
    timed("criteria", t0)

    bcfg = marl_config(cfg, path)
    ctx = marl_bench.Context(bcfg)
    baseline = {k: net_ctx["baseline"][k] for k in ("macs", "params", "test_acc")}
    for name in cfg.algos:
        if name not in data["searches"]:
            t0 = time.perf_counter()
            log(f"search {name}: {cfg.search.plans} plans")
            seed_everything(cfg.seed)
            data["searches"][name] = _search_summary(marl_bench.run_search(bcfg, ctx, name, cfg.seed))
            timed("search", t0)
        if name not in data["finals"]:
            t0 = time.perf_counter()
            log(f"fine-tuning the best plan of {name}")
            data["finals"][name] = marl_bench.run_finetune(bcfg, ctx, name, cfg.seed, data["searches"][name], None,
                                                           baseline)
            timed("finals", t0)
    log(f"done in {(time.time() - t_start) / 60:.1f} min: {md_path}")
    return {"report": str(md_path), "json": str(json_path), "rows": len(data["rows"]),
            "searches": len(data["searches"]), "baseline_test_acc": data["baseline"]["test_acc"]}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    md_path = results_path(cfg.out, "paper_scale.md")
    if cfg.dry_run:
        outputs: dict[str, Any] = {"files": [("--out", md_path.with_suffix(".dryrun.json"))]}
    else:  # the baseline cache is locked by pruning_env.train while it trains
        outputs = {"files": [("--out", md_path)],
                   "folders": [("--work-dir", marl_bench.finetune_dir(cfg.work_dir, cfg.problem.macs_target))]}
    with hold_outputs("paper_scale", **outputs):
        return _main(cfg, argv)


def _main(cfg: PaperScaleConfig, argv: list[str] | None) -> int:
    try:
        if cfg.dry_run:
            from benchmarks.paper_scale_dry import dry_run

            summary = dry_run(cfg, argv)
        else:
            summary = run(cfg, argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished rows, searches and fine-tunes are saved; rerun the same command with "
              "--resume to continue", file=sys.stderr)
        return 130
    print_json(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
