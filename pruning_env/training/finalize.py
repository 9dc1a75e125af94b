"""The finalize pipeline: plan -> smaller network -> BN re-estimated -> fine-tuned -> test report.

Written once and called by every command that turns a plan into a final network: the
prune CLI, ``train_marl.py``, :meth:`FilterPruningEnv.pruned_model`'s users and the
benchmarks. Steps (:func:`finalize`):

1. apply the plan to the unpruned network (physical surgery; or take an already pruned
   network, e.g. one made by another library);
2. re-estimate BatchNorm statistics (:class:`~pruning_env.engine.bn.BNRecalConfig`; with
   the env's settings and ``bn_seed=0`` this is exactly the network the env's reward
   measured);
3. fine-tune (:func:`~pruning_env.training.finetune.finetune`, knowledge distillation from
   the unpruned network by default), model selection on the VALIDATION split;
4. measure validation and test accuracy after each step performed, MACs and parameters.

The test split is touched only here, for the report; nothing is selected on it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning_env.core.data import Splits
from pruning_env.core.evaluation import evaluate, measure_latency
from pruning_env.core.models import check_classes, check_float32
from pruning_env.engine.bn import BNRecalConfig
from pruning_env.engine.flops import count
from pruning_env.engine.graph import PrunableLayer
from pruning_env.engine.plan import PruningPlan
from pruning_env.engine.surgery import apply
from pruning_env.training.finetune import FinetuneConfig, finetune
from pruning_env.training.teacher import TeacherCache

__all__ = ["STAGES", "accuracy", "finalize", "latency"]

STAGES = ("after_pruning", "after_bn_recal", "after_finetune")
"""The points at which :func:`finalize` measures accuracy (a stage not performed is ``None``)."""


def accuracy(model: nn.Module, splits: Splits, *, device: str | torch.device = "cpu", limit: int | None = None,
             which: Sequence[str] = ("val", "test")) -> dict[str, float]:
    """Top-1 accuracy in percent on the named splits (``limit``: the first N images of each)."""
    return {name: evaluate(model, getattr(splits, name), mean=splits.mean, std=splits.std, device=device,
                           limit=limit) for name in which}


def latency(model: nn.Module, input_shape: tuple[int, int, int], repeats: int) -> dict[str, float] | None:
    """Median CPU latency in milliseconds at batch 1 and 64 (``{"batch_1", "batch_64"}``); None if ``repeats == 0``.

    Measured on a CPU copy when the model lives elsewhere (the model itself is not moved).
    """
    if repeats == 0:
        return None
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    cpu_model = model if on_cpu else copy.deepcopy(model).cpu()
    return {f"batch_{b}": round(measure_latency(cpu_model, input_shape, batch_size=b, repeats=repeats), 3)
            for b in (1, 64)}


def finalize(
    base: nn.Module,
    splits: Splits,
    *,
    plan: PruningPlan | None = None,
    model: nn.Module | None = None,
    bn: BNRecalConfig | None = None,
    finetune_cfg: FinetuneConfig | None = None,
    layers: Sequence[PrunableLayer] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    meta: dict[str, Any] | None = None,
    eval_limit: int | None = None,
    bn_seed: int = 0,
    baseline_accuracy: dict[str, float] | None = None,
    probe: Callable[[nn.Module], Any] | None = None,
    teacher_cache: TeacherCache | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Turn ``plan`` (or an already pruned ``model``) into a final network and report on it.

    Args:
        base: the unpruned, trained network (not modified; the KD teacher).
        splits: data: ``train`` for BN statistics and fine-tuning, ``val`` for model selection,
            ``test`` for the report only.
        plan: the pruning plan to apply to ``base``; or
        model: a network pruned elsewhere (used in place of step 1; modified in place).
        bn: BN re-estimation settings (default :class:`BNRecalConfig()`; 0 batches: skip).
        finetune_cfg: fine-tuning recipe including ``seed``/``device``/``progress`` (``None`` or
            ``epochs=0``: no fine-tuning). With ``kd`` the teacher is ``base``.
        layers: ``base``'s prunable layers if known (skips a trace).
        out: fine-tuning checkpoint path, written after every epoch (resumable).
        resume: continue the fine-tuning recorded at ``out``.
        meta: extra entries for that checkpoint.
        eval_limit: measure accuracy on the first N validation/test images only (quick runs).
        bn_seed: seed of the BN re-estimation batches (0: as the env).
        baseline_accuracy: ``base``'s ``{"val", "test"}`` accuracy if already measured.
        probe: called on the network after BN re-estimation, before fine-tuning (e.g. to measure it
            exactly as the env's reward did); its return value is the report's ``probe``.
        teacher_cache: the KD teacher's outputs shared by many finalizations with one recipe and seed
            (:class:`~pruning_env.training.teacher.TeacherCache` of ``base``; CPU; same result).

    Returns:
        ``(network, report)``. The report holds ``baseline`` (``{"val", "test"}`` percent),
        ``accuracy`` (``{stage: {"val", "test"} or None}`` for :data:`STAGES`), ``probe``, ``val_acc`` and
        ``test_acc`` of the final network, ``retention`` (final / baseline test accuracy),
        ``macs``, ``params``, ``baseline_macs``, ``baseline_params`` (per image), their
        ``*_ratio`` and ``*_reduction``, ``keep`` (kept filters per layer), ``finetune`` (the
        fine-tuning summary or ``None``) and ``plan`` (dict or ``None``).
    """
    if (plan is None) == (model is None):
        raise ValueError("finalize needs exactly one of plan= (to apply to base) or model= (already pruned)")
    check_float32(base, "the unpruned network")
    check_classes(base, splits.input_shape, splits.num_classes, "the unpruned network")
    if model is not None:
        check_float32(model, "the pruned network")
        check_classes(model, splits.input_shape, splits.num_classes, "the pruned network")
    bn = bn if bn is not None else BNRecalConfig()
    ft = finetune_cfg if finetune_cfg is not None else FinetuneConfig(epochs=0)
    ft.check()
    device = next(base.parameters()).device
    input_shape = splits.input_shape
    if plan is not None:
        model = apply(base, plan, input_shape, layers=layers)
    assert model is not None
    model.to(device).eval()
    base_acc = baseline_accuracy or accuracy(base, splits, device=device, limit=eval_limit)
    if base_acc["test"] <= 0:  # retention (final / baseline) would be undefined: refuse before any work
        raise ValueError("the unpruned network classifies no test image correctly (0 % test accuracy), so "
                         "retention is undefined; check that the checkpoint was trained on this data set")
    stages: dict[str, dict[str, float] | None] = dict.fromkeys(STAGES)
    stages["after_pruning"] = accuracy(model, splits, device=device, limit=eval_limit)
    if bn.bn_recal_batches > 0:
        bn.apply(model, splits, seed=bn_seed, device=device)
        stages["after_bn_recal"] = accuracy(model, splits, device=device, limit=eval_limit)
    probed = probe(model) if probe is not None else None
    summary = None
    if ft.epochs > 0:
        ft = dataclasses.replace(ft, device=str(device)) if ft.device == "auto" else ft
        summary = finetune(model, splits, ft, teacher=base if ft.kd else None, out=out, resume=resume,
                           plan=plan.to_dict() if plan is not None else None, meta=meta,
                           teacher_cache=teacher_cache if ft.kd else None)
        stages["after_finetune"] = accuracy(model, splits, device=device, limit=eval_limit)
    final = next(stages[s] for s in reversed(STAGES) if stages[s] is not None)
    assert final is not None
    base_cost, cost = count(base, input_shape), count(model, input_shape)
    keep = {n: int(m.out_channels) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and plan is not None and n in plan.keep}
    report: dict[str, Any] = {
        "baseline": base_acc,
        "accuracy": stages,
        "val_acc": final["val"],
        "test_acc": final["test"],
        "retention": final["test"] / base_acc["test"],
        "macs": cost.macs, "params": cost.params,
        "baseline_macs": base_cost.macs, "baseline_params": base_cost.params,
        "macs_ratio": cost.macs / base_cost.macs, "params_ratio": cost.params / base_cost.params,
        "macs_reduction": 1.0 - cost.macs / base_cost.macs, "params_reduction": 1.0 - cost.params / base_cost.params,
        "keep": keep,
        "finetune": summary,
        "plan": plan.to_dict() if plan is not None else None,
        "probe": probed,
    }
    return model, report
