"""Prune a trained network once: ``python -m pruning_env.prune --checkpoint base.pt --criterion dsfp
--direction low --rate 0.7 --out pruned.pt``.

Steps:

1. load the baseline checkpoint and its data set (the train/validation split the
   baseline was trained with, read from its ``train_config``);
2. score every prunable filter (:mod:`pruning_env.criteria`) on ``--calib-size``
   images drawn from the TRAINING split with ``--seed``;
3. prune ``--rate`` of the filters of every prunable layer (lowest scores first,
   :func:`pruning_env.pruning.plan_uniform`), physically (:func:`pruning_env.engine.apply`);
   or apply a saved ``--plan`` instead of steps 2-3;
4. re-estimate BatchNorm statistics on ``--bn-recal-batches`` training batches;
5. fine-tune for ``--finetune-epochs`` (optionally distilling from the baseline with
   ``--kd``), selecting the best weights on the validation split.

The final network is the one after the last step performed. Accuracy is measured
on the validation and test splits after steps 3, 4 and 5; retention = final test
accuracy / baseline test accuracy (the paper's definition). Latency is measured on
the CPU at batch sizes 1 and 64.

Outputs: the pruned checkpoint ``--out`` (loads by itself with
:func:`pruning_env.core.checkpoint.load`; it records the plan, criterion, direction and KL
mode), the full report as JSON next to it (``--out`` with the suffix ``.json``), a
readable summary, and as the LAST line one JSON object with ``macs_reduction``,
``params_reduction`` (fractions), ``test_acc``, ``baseline_test_acc`` (percent),
``retention`` (fraction), ``criterion`` and ``direction``.

Errors in the input (unknown criterion, rate outside [0, 1), missing checkpoint,
another architecture than ``--net``, a plan that does not fit) exit with status 2
and a one-line message.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pruning_env.core import checkpoint as ckpt
from pruning_env import criteria
from pruning_env.cli.options import add_config_args, config_from_args, print_json
from pruning_env.core.config import option, resolve_device, seed_everything
from pruning_env.core.data import Split, Splits, batches, load_splits
from pruning_env.core.evaluation import evaluate, measure_latency
from pruning_env.training.finetune import FinetuneConfig, finetune
from pruning_env.engine.bn import recalibrate_bn
from pruning_env.engine.graph import prunable_layers
from pruning_env.core.models import list_models
from pruning_env.engine.macs import MacsModel
from pruning_env.engine.plan import PlanError, PruningPlan, plan_uniform
from pruning_env.engine.surgery import apply

__all__ = ["PruneConfig", "prune", "main"]


@dataclass
class PruneConfig:
    """One-shot pruning of a trained checkpoint."""

    checkpoint: str | None = option(None, "baseline checkpoint (.pt) written by pruning_env.train (required)")
    out: str | None = option(None, "pruned checkpoint to write (required); the JSON report goes next to it")
    criterion: str | None = option(None, "importance criterion (required unless --plan)",
                                   choices=criteria.list_criteria())
    rate: float = option(0.5, "fraction of the filters of every prunable layer to remove, in [0, 1)")
    direction: str | None = option(None, "dsfp only: prune the lowest fused scores (low, the paper's code; the "
                                         "default, see benchmarks/results/criteria.md) or the highest (high, the "
                                         "paper's text)", choices=["low", "high"])
    kl: str | None = option(None, "KL mode of the dsfp/kl criteria (default: exact)", choices=list(criteria.KL_MODES))
    plan: str | None = option(None, "apply this saved plan (JSON from PruningPlan.to_json) instead of scoring")
    net: str | None = option(None, "expected architecture of the checkpoint (error if it holds another)",
                             choices=list_models())
    dataset: str | None = option(None, "data set (default: the one recorded in the checkpoint)")
    data_dir: str | None = option(None, "directory holding the data set (default: $PRUNING_ENV_DATA, else the cache)")
    val_fraction: float | None = option(None, "validation share (default: the baseline's, else 0.1)")
    split_seed: int | None = option(None, "train/validation split seed (default: the baseline's, else 0)")
    calib_size: int = option(128, "calibration images for the criterion, drawn from the TRAINING split")
    round_to: int = option(1, "round every layer's kept filter count to a multiple of this")
    min_keep: int = option(1, "keep at least this many filters per layer")
    bn_recal_batches: int = option(20, "training batches for re-estimating BN statistics after pruning (0 = off)")
    bn_recal_batch_size: int = option(128, "batch size of the BN re-estimation")
    finetune_epochs: int = option(0, "fine-tuning epochs after pruning (0 = none)")
    kd: bool = option(False, "fine-tune with knowledge distillation from the baseline")
    temperature: float = option(4.0, "distillation temperature T")
    finetune_lr: float = option(0.01, "fine-tuning peak learning rate (cosine decay)")
    finetune_optimizer: str = option("sgd", "fine-tuning optimiser (the paper: adam with lr 1e-4)",
                                     choices=["sgd", "adam"])
    finetune_batch_size: int = option(128, "fine-tuning batch size")
    resume: bool = option(False, "continue an interrupted fine-tuning recorded at --out")
    eval_limit: int | None = option(None, "evaluate on N validation/test images (a fixed random subset; quick runs)")
    latency_repeats: int = option(20, "timed forward passes per latency measurement (0 = skip latency)")
    seed: int = option(0, "seed for calibration images, random scores, BN re-estimation and fine-tuning")
    device: str = option("auto", "auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    trust_pickle: bool = option(False, "allow a checkpoint holding a pickled user model (only files you trust)")
    progress: bool = option(True, "show progress bars")


def _check(cfg: PruneConfig) -> None:
    if not cfg.checkpoint:
        raise ValueError("--checkpoint is required")
    if not cfg.out:
        raise ValueError("--out is required")
    if cfg.plan is None:
        if cfg.criterion is None:
            raise ValueError(f"--criterion is required (one of {', '.join(criteria.list_criteria())}) unless --plan")
        if cfg.criterion not in criteria.list_criteria():
            raise ValueError(f"unknown criterion {cfg.criterion!r}; choose one of {', '.join(criteria.list_criteria())}")
        if isinstance(cfg.rate, bool) or not 0.0 <= float(cfg.rate) < 1.0:
            raise ValueError(f"--rate must be in [0, 1) (the fraction of filters removed), got {cfg.rate}")
        if cfg.criterion != "dsfp" and cfg.direction not in (None, "low"):
            raise ValueError(f"--direction applies to dsfp only; {cfg.criterion} always prunes its lowest scores")
        if cfg.kl is not None and cfg.criterion not in ("dsfp", "kl"):
            raise ValueError(f"--kl applies to the dsfp and kl criteria only, not {cfg.criterion}")
    for name in ("calib_size", "round_to", "min_keep", "bn_recal_batch_size", "finetune_batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("bn_recal_batches", "finetune_epochs", "latency_repeats"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.kd and cfg.finetune_epochs == 0:
        raise ValueError("--kd needs --finetune-epochs >= 1")


def _eval_subset(split: Split, limit: int | None) -> Split:
    """``limit`` examples drawn with a fixed seed (the test split may be sorted by class), else all."""
    if limit is None or limit >= len(split):
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:limit]
    return Split(split.images[idx], split.labels[idx])


def _accuracy(model: torch.nn.Module, splits: Splits, device: torch.device, limit: int | None) -> dict[str, float]:
    return {split: evaluate(model, _eval_subset(getattr(splits, split), limit), mean=splits.mean, std=splits.std,
                            device=device)
            for split in ("val", "test")}


def _latency(model: torch.nn.Module, input_shape: tuple[int, int, int], repeats: int) -> dict[str, float] | None:
    if repeats == 0:
        return None
    cpu_model = copy.deepcopy(model).cpu() if any(p.device.type != "cpu" for p in model.parameters()) else model
    return {f"batch_{b}": round(measure_latency(cpu_model, input_shape, batch_size=b, repeats=repeats), 3)
            for b in (1, 64)}


def _calibration_batch(splits: Splits, n: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(splits.train), generator=gen)[: min(n, len(splits.train))]
    subset = Split(splits.train.images[idx], splits.train.labels[idx])
    return next(batches(subset, len(subset), mean=splits.mean, std=splits.std, device=device))


def prune(cfg: PruneConfig) -> dict[str, Any]:
    """Run the pipeline of the module docstring; returns the full report (also written as JSON)."""
    t_start = time.time()
    _check(cfg)
    device = resolve_device(cfg.device)
    say = (lambda msg: print(msg, file=sys.stderr)) if cfg.progress else (lambda msg: None)
    base_ckpt = ckpt.load(cfg.checkpoint, map_location=device, expect_arch=cfg.net, trust_pickle=cfg.trust_pickle)
    base = base_ckpt.model.eval()
    input_shape = tuple(base_ckpt.input_shape)
    train_cfg = base_ckpt.train_config or {}
    dataset = cfg.dataset or base_ckpt.dataset
    if not dataset:
        raise ValueError(f"{cfg.checkpoint} records no data set; pass --dataset")
    splits = load_splits(dataset, cfg.data_dir,
                         val_fraction=cfg.val_fraction if cfg.val_fraction is not None
                         else float(train_cfg.get("val_fraction", 0.1)),
                         split_seed=cfg.split_seed if cfg.split_seed is not None else int(train_cfg.get("split_seed", 0)))
    if splits.input_shape != input_shape:
        raise ValueError(f"the data set's images are {splits.input_shape} but the checkpoint expects {input_shape}")
    if base_ckpt.classes is not None and len(base_ckpt.classes) != splits.num_classes:
        raise ValueError(f"the checkpoint has {len(base_ckpt.classes)} classes, the data set {splits.num_classes}")
    seed_everything(cfg.seed)
    layers = prunable_layers(base, input_shape)
    if not layers:
        raise ValueError("the model has no prunable conv layer (see pruning_env.engine.graph for the policy)")
    macs_model = MacsModel.from_model(base, input_shape, layers=layers)

    timings: dict[str, float] = {}
    direction = cfg.direction or "low"
    kl_mode = (cfg.kl or "exact") if cfg.criterion in ("dsfp", "kl") else None
    if cfg.plan is not None:
        try:
            plan = PruningPlan.from_json(Path(cfg.plan).read_text())
        except OSError as exc:
            raise ValueError(f"cannot read plan {cfg.plan}: {exc.strerror}") from None
        plan.validate(layers)
        criterion = cfg.criterion or "plan"
    else:
        criterion = cfg.criterion
        t0 = time.time()
        options: dict[str, Any] = {}
        if criterion == "dsfp":
            options["direction"] = direction
        if kl_mode is not None:
            options["kl"] = kl_mode
        if criterion == "random":
            options["seed"] = cfg.seed
        data_free = criterion in ("l1", "l2", "fpgm", "random")
        images, labels = (None, None) if data_free else _calibration_batch(splits, cfg.calib_size, cfg.seed, device)
        say(f"scoring {len(layers)} layers with {criterion}...")
        scores = criteria.score(base, images, labels, criterion, layers=[l.name for l in layers], **options)
        timings["scoring_s"] = round(time.time() - t0, 2)
        plan = plan_uniform(scores, cfg.rate, min_keep=cfg.min_keep, round_to=cfg.round_to)
    t0 = time.time()
    pruned = apply(base, plan, input_shape, layers=layers).eval()
    timings["surgery_s"] = round(time.time() - t0, 4)
    macs, params = macs_model.predict_plan(plan)

    say("evaluating the baseline and the pruned network...")
    baseline_acc = _accuracy(base, splits, device, cfg.eval_limit)
    stages: dict[str, dict[str, float] | None] = {"after_pruning": _accuracy(pruned, splits, device, cfg.eval_limit),
                                                   "after_bn_recal": None, "after_finetune": None}
    if cfg.bn_recal_batches:
        recalibrate_bn(pruned, splits, cfg.bn_recal_batches, cfg.bn_recal_batch_size, cfg.seed, device)
        stages["after_bn_recal"] = _accuracy(pruned, splits, device, cfg.eval_limit)
    meta = {"criterion": criterion, "direction": direction, "kl": kl_mode, "rate": cfg.rate,
            "baseline_checkpoint": str(cfg.checkpoint), "prune_config": dataclasses.asdict(cfg)}
    finetune_summary = None
    if cfg.finetune_epochs:
        ft_cfg = FinetuneConfig(epochs=cfg.finetune_epochs, optimizer=cfg.finetune_optimizer, lr=cfg.finetune_lr,
                                batch_size=cfg.finetune_batch_size, kd=cfg.kd, temperature=cfg.temperature,
                                seed=cfg.seed, device=str(device), progress=cfg.progress)
        t0 = time.time()
        finetune_summary = finetune(pruned, splits, ft_cfg, teacher=base if cfg.kd else None, out=cfg.out,
                                    resume=cfg.resume, plan=plan.to_dict(), meta=meta)
        timings["finetune_s"] = round(time.time() - t0, 1)
        stages["after_finetune"] = _accuracy(pruned, splits, device, cfg.eval_limit)
    final = next(stages[s] for s in ("after_finetune", "after_bn_recal", "after_pruning") if stages[s] is not None)
    assert final is not None

    say("measuring CPU latency...")
    latency = {"baseline": _latency(base, input_shape, cfg.latency_repeats),
               "pruned": _latency(pruned, input_shape, cfg.latency_repeats)}
    counts = plan.keep_counts()
    report: dict[str, Any] = {
        "checkpoint": str(cfg.out), "report": str(Path(cfg.out).with_suffix(".json")),
        "baseline_checkpoint": str(cfg.checkpoint), "arch": base_ckpt.arch, "dataset": splits.name,
        "criterion": criterion, "direction": direction, "kl": kl_mode, "rate": cfg.rate,
        "round_to": cfg.round_to, "min_keep": cfg.min_keep, "calib_size": cfg.calib_size, "seed": cfg.seed,
        "eval_limit": cfg.eval_limit,
        "baseline_macs": macs_model.base_macs, "baseline_params": macs_model.base_params,
        "macs": macs, "params": params,
        "macs_reduction": 1.0 - macs / macs_model.base_macs,
        "params_reduction": 1.0 - params / macs_model.base_params,
        "filters_kept": sum(counts.get(l.name, l.out_channels) for l in layers),
        "filters_total": sum(l.out_channels for l in layers),
        "baseline_val_acc": baseline_acc["val"], "baseline_test_acc": baseline_acc["test"],
        "accuracy": stages,
        "val_acc": final["val"], "test_acc": final["test"],
        "retention": final["test"] / baseline_acc["test"] if baseline_acc["test"] > 0 else float("nan"),
        "latency_ms": latency,
        "layers": {l.name: {"width": l.out_channels, "kept": counts.get(l.name, l.out_channels)} for l in layers},
        "finetune": finetune_summary,
        "timings": {**timings, "total_s": round(time.time() - t_start, 1)},
    }
    metrics = {"val_acc": final["val"], "test_acc": final["test"], "baseline_test_acc": baseline_acc["test"],
               "retention": report["retention"], "macs": macs, "params": params,
               "macs_reduction": report["macs_reduction"], "params_reduction": report["params_reduction"]}
    extra = {**meta, "report": {k: v for k, v in report.items() if k not in ("layers",)}}
    if finetune_summary is not None:
        extra["train_state"] = {"finished": True, "summary": finetune_summary,
                                "epoch": len(finetune_summary["history"]), "history": finetune_summary["history"]}
    ckpt.save(cfg.out, pruned, input_shape=input_shape, dataset=splits.name, classes=splits.classes,
              metrics=metrics, train_config=base_ckpt.train_config, plan=plan.to_dict(), extra=extra)
    Path(report["report"]).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def _summary_lines(r: dict[str, Any]) -> list[str]:
    def acc(stage: dict[str, float] | None) -> str:
        return "-" if stage is None else f"val {stage['val']:.2f}%  test {stage['test']:.2f}%"

    lines = [
        f"{r['arch']} on {r['dataset']}: {r['criterion']} (direction {r['direction']}"
        f"{', kl ' + r['kl'] if r['kl'] else ''}), rate {r['rate']}",
        f"  filters   {r['filters_kept']}/{r['filters_total']} kept",
        f"  MACs      {r['baseline_macs'] / 1e6:.2f} M -> {r['macs'] / 1e6:.2f} M  (-{100 * r['macs_reduction']:.1f} %)",
        f"  params    {r['baseline_params'] / 1e6:.3f} M -> {r['params'] / 1e6:.3f} M  "
        f"(-{100 * r['params_reduction']:.1f} %)",
        f"  baseline        val {r['baseline_val_acc']:.2f}%  test {r['baseline_test_acc']:.2f}%",
        f"  after pruning   {acc(r['accuracy']['after_pruning'])}",
        f"  after BN recal  {acc(r['accuracy']['after_bn_recal'])}",
        f"  after finetune  {acc(r['accuracy']['after_finetune'])}",
        f"  retention       {100 * r['retention']:.2f} % of the baseline test accuracy",
    ]
    lat = r["latency_ms"]
    if lat["baseline"] is not None:
        lines.append(f"  CPU latency     batch 1: {lat['baseline']['batch_1']:.2f} -> {lat['pruned']['batch_1']:.2f} ms; "
                     f"batch 64: {lat['baseline']['batch_64']:.1f} -> {lat['pruned']['batch_64']:.1f} ms")
    lines.append(f"  wrote {r['checkpoint']} and {r['report']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pruning_env.prune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, PruneConfig)
    args = parser.parse_args(argv)
    cfg = config_from_args(PruneConfig, args)
    try:
        report = prune(cfg)
    except (ValueError, RuntimeError, PlanError) as exc:  # ours carry actionable one-line messages
        parser.exit(2, f"error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted: finished fine-tuning epochs are saved at --out; rerun with --resume\n")
    for line in _summary_lines(report):
        print(line)
    print_json({k: report[k] for k in ("macs_reduction", "params_reduction", "test_acc", "val_acc",
                                       "baseline_test_acc", "retention", "criterion", "direction", "kl", "rate",
                                       "macs", "params", "checkpoint", "report")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
