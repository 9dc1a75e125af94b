"""``python -m benchmarks.paper_scale --dry-run``: time a few steps of every stage and project the whole run.

Every figure is a measurement with the run's real settings (network, width, batch sizes, recipe, env),
scaled by how often the run repeats it:

* a training or fine-tuning step: the slope between ``k`` and ``2k`` steps of the real loop (``fit`` /
  ``finetune`` on a training subset), so fixed costs (moving the model, the end-of-epoch evaluation) do
  not count as steps; on CUDA one untimed step first (CUDA context, cuDNN autotuning);
* an evaluation image: one evaluation of a few batches, per image;
* scoring: every criterion's scores (``benchmarks.criteria.ScoreBank``) on ``--dry-calib`` calibration
  images, scaled linearly to ``--calib-size`` for the data-driven ones (on a GPU small batches underuse
  the device, so this overestimates);
* a search: building its env (with the Fisher KL: the exact KL of the unpruned network, paid once per
  env, is the scoring measurement above and is added), then ``--dry-steps`` plans of the algorithm, per
  plan (the first episode's reset is in it: an overestimate for a few plans).

The baseline is untrained (timing only) and nothing is written but ``<out>.dryrun.json``, which the real
run's report shows next to the actual times.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from typing import Any

import torch

import agents
from benchmarks import criteria as criteria_bench
from benchmarks.common import atomic_write_text, log, results_path
from benchmarks.paper_scale import PaperScaleConfig, train_config
from pruning_env import criteria
from pruning_env.core.config import resolve_device, seed_everything, with_overrides
from pruning_env.core.data import Splits, calibration_batch, load_splits
from pruning_env.core.evaluation import evaluate
from pruning_env.core.models import build
from pruning_env.engine.flops import count
from pruning_env.engine.graph import prunable_layers
from pruning_env.engine.plan import plan_uniform
from pruning_env.engine.surgery import apply
from pruning_env.envs.config import changed_settings
from pruning_env.envs.registry import make_benchmark_env
from pruning_env.search import Search, algorithm_env, algorithm_overrides
from pruning_env.training.finetune import finetune
from pruning_env.training.train import fit

__all__ = ["dry_run"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _subset(splits: Splits, n_train: int, n_eval: int) -> Splits:
    return dataclasses.replace(splits, train=splits.train.subset(n_train), val=splits.val.subset(n_eval),
                               test=splits.test.subset(n_eval))


def _per_step(run_steps: Callable[[int], Any], k: int, device: torch.device) -> float:
    """Seconds per step: ``(t(2k) - t(k)) / k`` of ``run_steps(n)`` (n steps), after a warm-up step on CUDA."""
    if device.type == "cuda":
        run_steps(1)
    t1 = _seconds(lambda: run_steps(k), device)
    t2 = _seconds(lambda: run_steps(2 * k), device)
    return max(t2 - t1, 0.0) / k if t2 > t1 else t2 / (2 * k)  # noisy CPU: fall back to the plain mean


def _per_image_eval(model: torch.nn.Module, splits: Splits, device: torch.device) -> float:
    n = min(len(splits.val), 512)
    evaluate(model, splits.val, mean=splits.mean, std=splits.std, device=device, limit=min(n, 8))  # warm-up
    return _seconds(lambda: evaluate(model, splits.val, mean=splits.mean, std=splits.std, device=device,
                                     limit=n), device) / n


def _steps(n_images: int, batch: int) -> int:
    return math.ceil(n_images / batch)


def dry_run(cfg: PaperScaleConfig, argv: list[str] | None) -> dict[str, Any]:
    """Time every stage; print the projection table; write ``<out>.dryrun.json``. Returns the JSON summary."""
    device = resolve_device(cfg.device)
    k = cfg.dry_steps
    splits = load_splits(cfg.dataset, cfg.data_dir)
    n_train, n_val, n_test = len(splits.train), len(splits.val), len(splits.test)
    seed_everything(cfg.seed)
    base = build(cfg.net, num_classes=splits.num_classes, in_channels=splits.input_shape[0], width=cfg.width)
    base.to(device).eval()
    stages: dict[str, float] = {}
    detail: list[tuple[str, str, float, str]] = []  # (stage, what, seconds, how many)

    # 1. the baseline: epochs x steps x step + per-epoch validation + the final test passes (plain and flip TTA)
    log("dry run: baseline training steps ...")
    tcfg = dataclasses.replace(train_config(cfg, device, results_path(cfg.out, "paper_scale.md")), epochs=1,
                               progress=False, out=None)  # fit() is given no checkpoint path: nothing is written
    step = _per_step(lambda n: fit(copy.deepcopy(base), _subset(splits, n * tcfg.batch_size, 8), tcfg), k, device)
    img = _per_image_eval(base, splits, device)
    steps = _steps(n_train, tcfg.batch_size) * cfg.baseline_epochs
    stages["baseline"] = steps * step + (cfg.baseline_epochs * n_val + 3 * n_test) * img
    detail += [("baseline", "training step", step, f"{steps} steps"),
               ("baseline", "evaluation image", img, f"{cfg.baseline_epochs * n_val + 3 * n_test} images")]

    # 2. the rows: every criterion's scores once, then per row BN + fine-tune + the finalize evaluations
    log("dry run: scoring ...")
    calib = min(cfg.problem.scoring.calib_size, n_train)  # calibration_batch caps it at the training split
    images, labels = calibration_batch(splits, min(cfg.dry_calib, calib), seed=0, device=device)
    layers = prunable_layers(base, splits.input_shape)
    names = [layer.name for layer in layers]
    disk: dict[str, Any] = {}
    bank = criteria_bench.ScoreBank(base, names, images, labels, disk, "dry", lambda: None)
    l1_scores = None
    for variant in map(criteria_bench.parse_variant, cfg.criteria):
        scores, _ = bank.scores(variant, cfg.seed)
        l1_scores = scores if variant.criterion == "l1" else l1_scores
    scale = calib / images.shape[0]
    scoring = {}
    for key, entry in disk.items():
        prim = key.split("|", 1)[1]
        name = prim.split(":")[0]
        data_driven = name in ("gradpass", "kl") or criteria.get_criterion(name).needs_data
        scoring[prim] = entry["seconds"] * (scale if data_driven else 1.0)
    exact_kl = scoring.get("kl:exact", 0.0)  # what the search envs pay on top of their timed (Fisher) set-up
    if l1_scores is None:
        l1_scores = criteria.score(base, None, None, "l1", layers=names)
    log("dry run: fine-tuning steps at every rate ...")
    ft = cfg.finetune
    n_ft = min(ft.train_limit or n_train, n_train)
    rule = cfg.problem.rule
    row_cost: dict[float, tuple[float, float]] = {}  # rate -> (seconds per row, MACs ratio)
    base_macs = count(base, splits.input_shape).macs
    for rate in cfg.uniform_rates:
        plan = plan_uniform(l1_scores, rate, min_keep=rule.min_keep, round_to=rule.round_to)
        pruned = apply(base, plan, splits.input_shape, layers=layers).to(device)
        one = dataclasses.replace(ft, epochs=1, train_limit=None, device=str(device), progress=False)
        ft_step = _per_step(lambda n, p=pruned, c=one: finetune(copy.deepcopy(p), _subset(splits, n * c.batch_size, 8),
                                                                c, teacher=base), k, device)
        ft_img = _per_image_eval(pruned, splits, device)
        evals = (ft.epochs + 1) * n_val + 3 * (n_val + n_test)  # per-epoch selection + the finalize stages
        bn_images = cfg.problem.bn.bn_recal_batches * cfg.problem.bn.bn_recal_batch_size
        row = ft.epochs * _steps(n_ft, ft.batch_size) * ft_step + (evals + bn_images) * ft_img
        row_cost[rate] = (row, count(pruned, splits.input_shape).macs / base_macs)
        detail.append(("criteria", f"fine-tune step at {rate:.0%}", ft_step,
                       f"{ft.epochs * _steps(n_ft, ft.batch_size)} steps x {len(cfg.criteria)} rows"))
    stages["criteria"] = sum(scoring.values()) + len(cfg.criteria) * sum(c for c, _ in row_cost.values())
    detail += [("criteria", f"scoring {p}", s, "once") for p, s in scoring.items()]

    # 3. the searches: plans x per-plan time + the env's static scoring (exact KL) per env; 4. the finals
    per_plan: dict[str, float] = {}
    setup: dict[str, float] = {}
    timing_problem = with_overrides(cfg.problem, kl="fisher")
    for name in cfg.algos:
        log(f"dry run: {k} plans of {name} ...")
        seed_everything(cfg.seed)
        box: list[Any] = []
        setup[name] = _seconds(lambda b=box: b.append(make_benchmark_env(
            cfg.net, cfg.dataset, model=base, splits=splits, device=str(device), **changed_settings(timing_problem))),
            device)
        env = box[0]
        scfg = dataclasses.replace(cfg.search, plans=k)
        cls = agents.get_algorithm(name)
        algo = agents.make_algorithm(name, algorithm_env(cls, env), seed=cfg.seed, device=device,
                                     **algorithm_overrides(cls, name, scfg, env.config.episode_length))
        search = Search(algo, env, scfg, progress=False)
        seconds = _seconds(search.run, device)
        per_plan[name] = seconds / max(search.plans_used, 1)
        detail.append(("search", f"{name}: one plan", per_plan[name], f"{cfg.search.plans} plans"))
        detail.append(("search", f"{name}: env set-up (Fisher KL)", setup[name], "once"))
    stages["search"] = sum(cfg.search.plans * per_plan[n] + setup[n] + exact_kl for n in cfg.algos)
    if cfg.problem.scoring.kl == "exact":
        detail.append(("search", "exact KL of the unpruned network", exact_kl, f"{len(cfg.algos)} envs"))
    target = cfg.problem.macs_target
    closest = min(row_cost.values(), key=lambda c: abs(c[1] - target))[0]
    stages["finals"] = len(cfg.algos) * closest
    detail.append(("finals", "one KD fine-tune near the MACs target", closest, f"{len(cfg.algos)} plans"))

    total = sum(stages.values())
    lines = [f"dry run on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}): "
             f"{cfg.net} width {cfg.width:g}, {cfg.dataset} ({n_train} / {n_val} / {n_test} images)",
             f"{'stage':<10} {'measured':<48} {'seconds':>10}  {'x':<24}"]
    lines += [f"{s:<10} {what:<48} {sec:>10.4f}  {times:<24}" for s, what, sec, times in detail]
    lines += [f"{'projected':<10} {s:<48} {v:>10.1f}" for s, v in stages.items()]
    lines.append(f"projected total: {total:.0f} s = {total / 60:.1f} min (target about 10 min on one H200-class GPU)")
    print("\n".join(lines))
    dry_path = results_path(cfg.out, "paper_scale.md").with_suffix(".dryrun.json")
    atomic_write_text(dry_path, json.dumps({"setup": cfg.setup(), "device": str(device), "stages": stages,
                                            "total_s": total, "argv": argv}, indent=1))
    return {"dry_run": True, "device": str(device), "projected_s": {s: round(v, 1) for s, v in stages.items()},
            "projected_total_s": round(total, 1), "file": str(dry_path)}
