"""Prune a trained network once: ``python -m pruning_env.prune --checkpoint base.pt --criterion dsfp
--direction low --rate 0.7 --out pruned.pt``.

Steps:

1. load the baseline checkpoint and its data set (the train/validation split the
   baseline was trained with, read from its ``train_config``);
2. score every prunable filter (:mod:`pruning_env.criteria`) on ``--calib-size``
   images drawn from the TRAINING split with ``--seed``;
3. prune ``--rate`` of the filters of every prunable layer (lowest scores first,
   :func:`pruning_env.engine.plan_uniform`, the one rate rule), physically (:func:`pruning_env.engine.apply`);
   or apply a saved ``--plan`` instead of steps 2-3;
4. re-estimate BatchNorm statistics on ``--bn-recal-batches`` training batches;
5. fine-tune for ``--finetune-epochs`` (distilling from the baseline unless ``--no-kd``),
   selecting the best weights on the validation split.

Steps 3-5 are :func:`pruning_env.training.finalize.finalize`, the pipeline
``train_marl.py`` and the benchmarks use too.

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
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pruning_env import criteria
from pruning_env.cli.options import add_config_args, config_from_args, print_json
from pruning_env.core import checkpoint as ckpt
from pruning_env.core.config import (
    check_settings,
    config_mismatch,
    flat_dict,
    flat_from_dict,
    mismatch_message,
    nested,
    option,
    resolve_device,
    seed_everything,
)
from pruning_env.core.data import calibration_batch, load_splits
from pruning_env.core.models import check_classes, check_float32, list_models
from pruning_env.criteria.config import ScoringConfig
from pruning_env.engine.bn import BNRecalConfig
from pruning_env.engine.graph import prunable_layers
from pruning_env.engine.plan import PlanError, PruningPlan, RateRule, plan_uniform
from pruning_env.training.finalize import finalize, latency
from pruning_env.training.finetune import FinetuneConfig

__all__ = ["PruneConfig", "main", "prune"]


@dataclass
class PruneConfig:
    """One-shot pruning of a trained checkpoint."""

    checkpoint: str | None = option(None, "baseline checkpoint (.pt) written by pruning_env.train (required)",
                                    run_only=True)
    out: str | None = option(None, "pruned checkpoint to write (required); the JSON report goes next to it",
                             run_only=True)
    rate: float = option(0.5, "fraction of the filters of every prunable layer to remove, in [0, 1)",
                         min=0, max=1, max_exclusive=True)
    plan: str | None = option(None, "apply this saved plan (JSON from PruningPlan.to_json) instead of scoring",
                              run_only=True)
    scoring: ScoringConfig = nested(ScoringConfig, "the criterion that ranks the filters")
    rule: RateRule = nested(RateRule, "rate -> kept filters")
    net: str | None = option(None, "expected architecture of the checkpoint (error if it holds another)",
                             choices=list_models())
    dataset: str | None = option(None, "data set (default: the one recorded in the checkpoint)")
    data_dir: str | None = option(None, "directory holding the data set (default: $PRUNING_ENV_DATA, else the cache)",
                                  run_only=True)
    val_fraction: float | None = option(None, "validation share (default: the baseline's, else 0.1)",
                                        min=0, max=1, min_exclusive=True, max_exclusive=True)
    split_seed: int | None = option(None, "train/validation split seed (default: the baseline's, else 0)",
                                     min=0)
    bn: BNRecalConfig = nested(BNRecalConfig, "BN re-estimation of the final network: 20 batches here (the env's "
                               "per-plan proxy uses 2)", default=BNRecalConfig(bn_recal_batches=20))
    finetune: FinetuneConfig = nested(FinetuneConfig, "fine-tuning (none unless --finetune-epochs)",
                                      prefix="finetune", default=FinetuneConfig(epochs=0))
    resume: bool = option(False, "continue an interrupted fine-tuning recorded at --out (same settings only)",
                          run_only=True)
    overwrite: bool = option(False, "replace an existing --out (without it an existing --out is refused)",
                             run_only=True)
    eval_limit: int | None = option(None, "evaluate on the first N validation/test images (quick runs)",
                                    min=1)
    latency_repeats: int = option(20, "timed forward passes per latency measurement (0 = skip latency)",
                                 min=0, run_only=True)
    seed: int = option(0, "seed for calibration images, random scores, BN re-estimation and fine-tuning",
                      min=0)
    device: str = option("auto", "auto (CUDA if present, else CPU), cpu, cuda, cuda:N", run_only=True)
    trust_pickle: bool = option(False, "allow a checkpoint holding a pickled user model (only files you trust)",
                                run_only=True)
    progress: bool = option(True, "show progress bars", run_only=True)

    def __post_init__(self) -> None:
        check_settings(self)


def _check_paths(cfg: PruneConfig) -> None:
    """--out must not replace an input or an earlier result unless asked, and must be writable (before any work)."""
    assert cfg.checkpoint and cfg.out
    out, report = Path(cfg.out), Path(cfg.out).with_suffix(".json")
    if not Path(cfg.checkpoint).is_file():
        raise ckpt.CheckpointError(f"checkpoint {cfg.checkpoint} does not exist")
    inputs = {Path(cfg.checkpoint).resolve(): "--checkpoint"}
    if cfg.plan is not None:
        inputs[Path(cfg.plan).resolve()] = "--plan"
    for path, what in ((out, "--out"), (report, "the report (--out with .json)")):
        if path.resolve() in inputs:
            raise ValueError(f"{what} {path} is the {inputs[path.resolve()]} input; writing it would replace the "
                             "input: choose another --out")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues --out and --overwrite replaces it: give one of them")
    if out.is_file() and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"--out {out} exists (an earlier result); pass --overwrite to replace it, --resume to "
                         "continue its fine-tuning, or choose another --out")
    ckpt.check_writable(out, "--out")
    ckpt.check_writable(report, "--out (its .json report)")


def _check_resume(cfg: PruneConfig) -> None:
    """A resumed run is the same run: refuse one whose --out was made with other settings."""
    if not (cfg.resume and Path(cfg.out).is_file()):  # type: ignore[arg-type]
        return
    try:
        loaded = ckpt.load(cfg.out, trust_pickle=cfg.trust_pickle)  # type: ignore[arg-type]
    except ckpt.CheckpointError as exc:
        raise ValueError(f"--resume: {exc}; pass --overwrite to start afresh") from None
    saved = loaded.extra.get("prune_config")
    if cfg.plan is not None and saved is not None and loaded.plan is not None:
        try:
            same = PruningPlan.from_json(Path(cfg.plan).read_text()).to_dict() == loaded.plan
        except (OSError, ValueError, KeyError, TypeError):
            same = True  # an unreadable --plan is reported where it is read
        if not same:
            raise ValueError(f"--resume: {cfg.out} was made with another plan than --plan {cfg.plan}; resume with "
                             "its plan, or pass --overwrite (instead of --resume) to start afresh")
    if saved is None:
        raise ValueError(f"--resume: {cfg.out} was not written by pruning_env.prune; choose another --out "
                         "or pass --overwrite to replace it")
    diff = config_mismatch(flat_from_dict(PruneConfig, saved), flat_dict(cfg), PruneConfig)
    if diff:
        raise ValueError(mismatch_message(str(cfg.out), diff, "pass --overwrite (instead of --resume) to start afresh"))


def _check(cfg: PruneConfig) -> None:
    if not cfg.checkpoint:
        raise ValueError("--checkpoint is required")
    if not cfg.out:
        raise ValueError("--out is required")
    ckpt.check_writable(cfg.out, "--out")  # the rest of the paths under the lock (_check_paths)
    sc = cfg.scoring
    if cfg.plan is None:
        if "direction" not in criteria.get_criterion(sc.criterion).options and sc.direction != "low":
            raise ValueError(f"--direction applies to dsfp only; {sc.criterion} always prunes its lowest scores")
        if not sc.uses_kl and sc.kl != ScoringConfig().kl:
            raise ValueError(f"--kl applies to the dsfp and kl criteria only, not {sc.criterion}")
    cfg.finetune.check()


def prune(cfg: PruneConfig) -> dict[str, Any]:
    """Run the pipeline of the module docstring; returns the full report (also written as JSON).

    ``--out`` is locked for the whole run (:func:`~pruning_env.core.checkpoint.run_lock`): a second run on
    the same ``--out`` is refused at once, naming the other run, whatever its flags.
    """
    t_start = time.time()
    _check(cfg)
    assert cfg.out
    with ckpt.run_lock(cfg.out, "--out", file=True):
        _check_paths(cfg)  # under the lock: a run on --out now is refused by it, one that just finished is seen
        _check_resume(cfg)
        return _prune(cfg, t_start)


def _prune(cfg: PruneConfig, t_start: float) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    say = (lambda msg: print(msg, file=sys.stderr)) if cfg.progress else (lambda msg: None)
    base_ckpt = ckpt.load(cfg.checkpoint, map_location=device, expect_arch=cfg.net, trust_pickle=cfg.trust_pickle)
    base = base_ckpt.model.eval()
    check_float32(base, f"{cfg.checkpoint}")
    input_shape = tuple(base_ckpt.input_shape)
    train_cfg = base_ckpt.train_config or {}
    dataset = cfg.dataset or base_ckpt.dataset
    if not dataset:
        raise ValueError(f"{cfg.checkpoint} records no data set; pass --dataset")
    splits = load_splits(dataset, cfg.data_dir,
                         val_fraction=cfg.val_fraction if cfg.val_fraction is not None
                         else float(train_cfg.get("val_fraction", 0.1)),
                         split_seed=cfg.split_seed if cfg.split_seed is not None
                         else int(train_cfg.get("split_seed", 0)))
    if splits.input_shape != input_shape:
        raise ValueError(f"the data set's images are {splits.input_shape} but the checkpoint expects {input_shape}")
    check_classes(base, input_shape, splits.num_classes, f"the checkpoint {cfg.checkpoint}")
    seed_everything(cfg.seed)
    layers = prunable_layers(base, input_shape)
    if not layers:
        raise ValueError("the model has no prunable conv layer (see pruning_env.engine.graph for the policy)")

    timings: dict[str, float] = {}
    sc = cfg.scoring
    kl_mode = sc.kl if sc.uses_kl else None
    if cfg.plan is not None:
        try:
            plan = PruningPlan.from_json(Path(cfg.plan).read_text())
        except OSError as exc:
            raise ValueError(f"cannot read plan {cfg.plan}: {exc.strerror}") from None
        plan.validate(layers)
        criterion = "plan"
    else:
        criterion = sc.criterion
        t0 = time.time()
        images, labels = (calibration_batch(splits, sc.calib_size, seed=cfg.seed, device=device) if sc.needs_data
                          else (None, None))
        say(f"scoring {len(layers)} layers with {criterion}...")
        scores = criteria.score(base, images, labels, criterion, layers=[lay.name for lay in layers],
                                **sc.options(seed=cfg.seed))
        timings["scoring_s"] = round(time.time() - t0, 2)
        plan = plan_uniform(scores, cfg.rate, min_keep=cfg.rule.min_keep, round_to=cfg.rule.round_to)

    meta = {"criterion": criterion, "direction": sc.direction, "kl": kl_mode, "rate": cfg.rate,
            "baseline_checkpoint": str(cfg.checkpoint), "prune_config": dataclasses.asdict(cfg)}
    ft_cfg = dataclasses.replace(cfg.finetune, seed=cfg.seed, device=str(device), progress=cfg.progress)
    say("pruning, re-estimating BN, fine-tuning and evaluating...")
    t0 = time.time()
    pruned, result = finalize(base, splits, plan=plan, bn=cfg.bn, finetune_cfg=ft_cfg, layers=layers, out=cfg.out,
                              resume=cfg.resume, meta=meta, eval_limit=cfg.eval_limit, bn_seed=cfg.seed)
    timings["finalize_s"] = round(time.time() - t0, 1)
    finetune_summary = result["finetune"]

    say("measuring CPU latency...")
    lat = {"baseline": latency(base, input_shape, cfg.latency_repeats),
           "pruned": latency(pruned, input_shape, cfg.latency_repeats)}
    counts = plan.keep_counts()
    report: dict[str, Any] = {
        "checkpoint": str(cfg.out), "report": str(Path(cfg.out).with_suffix(".json")),
        "baseline_checkpoint": str(cfg.checkpoint), "arch": base_ckpt.arch, "dataset": splits.name,
        "criterion": criterion, "direction": sc.direction, "kl": kl_mode, "rate": cfg.rate,
        "round_to": cfg.rule.round_to, "min_keep": cfg.rule.min_keep, "calib_size": sc.calib_size, "seed": cfg.seed,
        "eval_limit": cfg.eval_limit,
        "baseline_macs": result["baseline_macs"], "baseline_params": result["baseline_params"],
        "macs": result["macs"], "params": result["params"],
        "macs_reduction": result["macs_reduction"], "params_reduction": result["params_reduction"],
        "filters_kept": sum(counts.get(lay.name, lay.out_channels) for lay in layers),
        "filters_total": sum(lay.out_channels for lay in layers),
        "baseline_val_acc": result["baseline"]["val"], "baseline_test_acc": result["baseline"]["test"],
        "accuracy": result["accuracy"],
        "val_acc": result["val_acc"], "test_acc": result["test_acc"], "retention": result["retention"],
        "latency_ms": lat,
        "layers": {lay.name: {"width": lay.out_channels, "kept": counts.get(lay.name, lay.out_channels)}
                   for lay in layers},
        "finetune": finetune_summary,
        "timings": {**timings, "total_s": round(time.time() - t_start, 1)},
    }
    metrics = {k: report[k] for k in ("val_acc", "test_acc", "baseline_test_acc", "retention", "macs", "params",
                                      "macs_reduction", "params_reduction")}
    extra = {**meta, "report": {k: v for k, v in report.items() if k not in ("layers",)}}
    if finetune_summary is not None:
        extra["train_state"] = {"finished": True, "summary": finetune_summary,
                                "epoch": len(finetune_summary["history"]), "history": finetune_summary["history"]}
    ckpt.save(cfg.out, pruned, input_shape=input_shape, dataset=splits.name, classes=splits.classes,
              metrics=metrics, train_config=base_ckpt.train_config, plan=plan.to_dict(), extra=extra)
    ckpt.atomic_write_text(report["report"], json.dumps(report, indent=2, default=str) + "\n")
    return report


def _summary_lines(r: dict[str, Any]) -> list[str]:
    def acc(stage: dict[str, float] | None) -> str:
        return "-" if stage is None else f"val {stage['val']:.2f}%  test {stage['test']:.2f}%"

    lines = [
        f"{r['arch']} on {r['dataset']}: {r['criterion']} (direction {r['direction']}"
        f"{', kl ' + r['kl'] if r['kl'] else ''}), rate {r['rate']}",
        f"  filters   {r['filters_kept']}/{r['filters_total']} kept",
        f"  MACs      {r['baseline_macs'] / 1e6:.2f} M -> {r['macs'] / 1e6:.2f} M  "
        f"(-{100 * r['macs_reduction']:.1f} %)",
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
        lines.append(f"  CPU latency     batch 1: {lat['baseline']['batch_1']:.2f} -> "
                     f"{lat['pruned']['batch_1']:.2f} ms; "
                     f"batch 64: {lat['baseline']['batch_64']:.1f} -> {lat['pruned']['batch_64']:.1f} ms")
    lines.append(f"  wrote {r['checkpoint']} and {r['report']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pruning_env.prune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, PruneConfig)
    args = parser.parse_args(argv)
    started = time.time()
    cfg = None
    try:
        cfg = config_from_args(PruneConfig, args)
        report = prune(cfg)
    except (ValueError, TypeError, RuntimeError, PlanError) as exc:  # ours carry actionable one-line messages
        parser.exit(2, f"error: {exc}\n")
    except KeyboardInterrupt:
        out = Path(cfg.out) if cfg is not None and cfg.out else None
        if out is not None and out.is_file() and (cfg.resume or out.stat().st_mtime >= started):  # type: ignore[union-attr]
            parser.exit(130, f"interrupted: finished fine-tuning epochs are saved at {out}; rerun with --resume\n")
        parser.exit(130, "interrupted before any fine-tuning epoch finished: nothing was saved\n")
    for line in _summary_lines(report):
        print(line)
    print_json({k: report[k] for k in ("macs_reduction", "params_reduction", "test_acc", "val_acc",
                                       "baseline_test_acc", "retention", "criterion", "direction", "kl", "rate",
                                       "macs", "params", "checkpoint", "report")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
