"""Fine-tuning of pruned networks, optionally with knowledge distillation.

Recipe (our choice, for few epochs on a CPU): SGD with Nesterov momentum 0.9,
learning rate 0.01 with a cosine decay to zero stepped per batch, weight decay
5e-4 (not on BN and biases), random-crop + flip augmentation. The DSFP paper
fine-tunes with Adam 1e-4 and cosine restarts for up to 700 epochs; a pruned
network that starts from trained weights recovers most of its accuracy in a few
epochs at a larger, decaying learning rate, which is what the default does.
``optimizer="adam", lr=1e-4`` reproduces the paper's optimiser.

Knowledge distillation (``kd=True``, teacher = the unpruned network), as in the
DSFP code::

    loss = a * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - a) * CE(student, labels)

with ``T = temperature`` (4) and ``a`` decaying linearly from ``alpha_start`` (0.5)
in the first epoch to ``alpha_end`` (0.1) in the last.

Model selection uses the VALIDATION split (never the test split): the weights
with the best validation accuracy, including the starting weights (epoch 0), are
kept, so fine-tuning never returns a network that is worse on validation than
the one it was given.

A checkpoint is written atomically after every epoch (current weights, best
weights, optimiser, scheduler and RNG states under ``extra["train_state"]``);
``resume=True`` continues an interrupted run to the same result as an
uninterrupted one (on CPU). When the run ends, the checkpoint holds the best
weights.

On CUDA the loop takes the fast path (:mod:`pruning_env.core.device_path`: the data set
resident on the GPU and augmented there, channels-last student and teacher, bf16 autocast
of the student's and the teacher's forward passes, the loss read once per epoch); the
validation that selects the weights runs in float32. On CPU those options are ignored.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pruning_env.core import checkpoint as ckpt
from pruning_env.core.config import (
    check_settings,
    config_mismatch,
    mismatch_message,
    option,
    preserved_rng,
    resolve_device,
    seed_everything,
)
from pruning_env.core.data import Splits, batches
from pruning_env.core.device_path import LossMeter, device_path
from pruning_env.core.evaluation import evaluate
from pruning_env.core.models import list_models
from pruning_env.engine.plan import PruningPlan
from pruning_env.training.optim import param_groups
from pruning_env.training.teacher import TeacherCache, teacher_fn

__all__ = ["FinetuneConfig", "alpha_at", "finetune", "kd_loss"]


@dataclass
class FinetuneConfig:
    """How to fine-tune a pruned network."""

    epochs: int = option(5, "fine-tuning epochs (0 = none)", min=0)
    optimizer: str = option("sgd", "optimiser: sgd (Nesterov momentum) or adam (the DSFP paper: adam, lr 1e-4)",
                            choices=["sgd", "adam"])
    lr: float = option(0.01, "peak learning rate (cosine decay to 0 over all steps)",
                       min=0, min_exclusive=True)
    momentum: float = option(0.9, "SGD momentum", min=0, max=1, max_exclusive=True)
    weight_decay: float = option(5e-4, "L2 weight decay (not applied to BN and biases)", min=0)
    batch_size: int = option(128, "batch size", min=1)
    kd: bool = option(True, "distil from the unpruned teacher (a*T^2*KL + (1-a)*CE)", aliases=("kd",))
    temperature: float = option(4.0, "distillation temperature T", aliases=("temperature",),
                                 min=0, min_exclusive=True)
    alpha_start: float = option(0.5, "distillation weight a in the first epoch", min=0, max=1)
    alpha_end: float = option(0.1, "distillation weight a in the last epoch (linear decay)", min=0, max=1)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy term",
                                   min=0, max=1, max_exclusive=True)
    augment: bool = option(True, "random-crop + flip augmentation of training batches")
    amp: bool = option(True, "CUDA: bf16 autocast of the student's and teacher's forward passes (weights, "
                       "optimiser and the validation stay float32); ignored on CPU")
    channels_last: bool = option(True, "CUDA: fine-tune in channels-last memory format; ignored on CPU", run_only=True)
    device_data: bool = option(True, "CUDA: keep the data set on the GPU and augment it there; ignored on CPU",
                               cli=False, run_only=True)
    train_limit: int | None = option(None, "training images per epoch: a fixed subset of the training split "
                                     "(None or 0: all)", aliases=("finetune_limit",), min=0)
    # A command sets these from its own --seed/--device/--progress (so the seed is run-only there, not here).
    seed: int = option(0, "seed for shuffling, augmentation and dropout", cli=False, min=0, run_only="nested")
    device: str = option("auto", "auto (CUDA if present, else CPU), cpu, cuda, cuda:N", cli=False, run_only=True)
    progress: bool = option(True, "show progress bars", cli=False, run_only=True)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.train_limit == 0:  # "0 = all", as recorded benchmark command lines say
            self.train_limit = None

    def check(self) -> None:
        """Raise :class:`~pruning_env.core.config.SettingError` for out-of-range settings (set after construction)."""
        check_settings(self)


def alpha_at(epoch: int, cfg: FinetuneConfig) -> float:
    """Distillation weight in (0-based) ``epoch``: linear from ``alpha_start`` to ``alpha_end``."""
    if cfg.epochs <= 1:
        return cfg.alpha_start
    return cfg.alpha_start + (cfg.alpha_end - cfg.alpha_start) * epoch / (cfg.epochs - 1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, labels)``.

    Args:
        student_logits, teacher_logits: ``(B, classes)``.
        labels: ``(B,)`` class indices.
        alpha: weight of the distillation term in [0, 1].
        temperature: ``T`` > 0; both distributions are ``softmax(logits / T)``.

    Returns:
        Scalar loss; the KL is summed over classes and averaged over the batch.
    """
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits.detach() / t, dim=1),
                  reduction="batchmean", log_target=True)
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return alpha * t * t * kl + (1.0 - alpha) * ce


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def finetune(
    student: nn.Module,
    splits: Splits,
    cfg: FinetuneConfig,
    *,
    teacher: nn.Module | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    plan: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    teacher_cache: TeacherCache | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Fine-tune ``student`` in place; it ends with its best-validation weights.

    With ``stop_after`` the run pauses after that many epochs of ITS schedule (the cosine decay still spans
    ``cfg.epochs``; a fraction such as 0.25 pauses after that share of an epoch's steps): the student keeps its
    current weights and ``out`` the full state, so a later call with ``resume=True`` (and a larger or no
    ``stop_after``) continues the same run to the same result. A pause inside an epoch records the epoch's
    starting generator state and the steps done; the continuation replays the epoch's batch draws up to there
    (without training on them), so it sees the same batches as an uninterrupted run.

    Args:
        student: the (pruned) network; trained in place on ``cfg.device``.
        splits: data; ``train`` for training, ``val`` for model selection.
        cfg: the recipe (see :class:`FinetuneConfig`).
        teacher: the unpruned network, required when ``cfg.kd`` (not modified).
        out: checkpoint path written after every epoch (``None``: no checkpoint).
        resume: continue the run recorded at ``out`` (if the file exists).
        plan: the pruning plan (dict) to record in the checkpoint.
        meta: extra entries for the checkpoint's ``extra`` (e.g. criterion).
        teacher_cache: a :class:`~pruning_env.training.teacher.TeacherCache` of ``teacher`` shared by runs
            that replay the same batches (same seed and recipe): the teacher's outputs are computed once
            (CPU only; the result is unchanged).
        stop_after: pause after this many epochs, > 0, fractions allowed (``None`` or ``>= cfg.epochs``: run to
            the end; at least one step is trained); needs ``out``.

    Returns:
        ``{"val_acc" (best, percent), "initial_val_acc", "best_epoch" (0 = the
        starting weights), "epochs", "history" (per epoch: train_loss, val_acc,
        alpha, lr, seconds), "seconds"}``; a paused run's summary has ``"paused": True``, ``"epoch"`` (epochs
        done, a fraction inside an epoch) and ``"last_val_acc"`` (the current weights', percent).
    """
    cfg.check()
    if stop_after is not None and (not stop_after > 0 or out is None):
        raise ValueError(f"stop_after must be a positive number of epochs and needs out= (the state to continue "
                         f"from), got stop_after={stop_after}, out={out}")
    if cfg.kd and teacher is None:
        raise ValueError("kd=True needs the unpruned teacher network (teacher=...)")
    teach = teacher_fn(teacher, teacher_cache) if teacher is not None and cfg.kd else None
    t_start = time.time()
    if cfg.train_limit is not None:  # a fixed subset (the first N of the shuffled training split)
        splits = dataclasses.replace(splits, train=splits.train.subset(cfg.train_limit))
    device = resolve_device(cfg.device)
    student.to(device)
    if teacher is not None and cfg.kd:
        teacher.to(device)
        teacher_training = teacher.training
        teacher.eval()
    out = Path(out) if out is not None else None
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = -(-len(splits.train) // cfg.batch_size)
    groups = param_groups(student, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    else:
        opt = torch.optim.Adam(groups, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
    total_steps = cfg.epochs * steps_per_epoch
    pause_step = None if stop_after is None else max(1, round(stop_after * steps_per_epoch))
    pause = pause_step is not None and pause_step < total_steps
    start_step, meter_state, last_val = 0, (0.0, 0), None

    state: dict[str, Any] | None = None
    if resume and out is not None and out.is_file():
        is_builtin = getattr(student, "arch", None) in list_models()
        # The file is this run's own output; a user architecture is stored pickled.
        loaded = ckpt.load(out, map_location=device, trust_pickle=not is_builtin)
        state = loaded.extra.get("train_state")
        if state is None:
            raise ckpt.CheckpointError(f"{out} has no fine-tuning state to resume from")
        if plan is not None and loaded.plan is not None and PruningPlan.from_dict(loaded.plan).key() != \
                PruningPlan.from_dict(plan).key():  # same widths, other filters: another plan's run
            raise ckpt.CheckpointError(f"{out} is the fine-tuning of another pruning plan; delete it or resume "
                                       "with the plan it was made for")
        try:
            student.load_state_dict(loaded.model.state_dict())
        except RuntimeError:
            raise ckpt.CheckpointError(f"{out} holds a network of other widths than this student "
                                       "(another plan?); delete it or resume with the same plan") from None
        if "config" in state:  # a resumed run is the same run, or it is refused
            diff = config_mismatch(state["config"], dataclasses.asdict(cfg), FinetuneConfig)
            if diff:
                named = {(k if k == "seed" else f"finetune_{k}"): v for k, v in diff.items()}
                raise ValueError(mismatch_message(f"the fine-tuning checkpoint {out}", named,
                                                  "delete it (or pass --overwrite) to start afresh"))
        if state.get("finished"):
            return dict(state["summary"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history = list(state["history"])
        start_epoch = state["epoch"]
        start_step = state.get("step", 0)  # > 0: paused inside epoch start_epoch + 1 (generator: its start)
        meter_state, last_val = tuple(state.get("meter", (0.0, 0))), state.get("last_val_acc")
        best_val, best_epoch, best_state = state["best_val"], state["best_epoch"], state["best_state_dict"]
        initial_val = state["initial_val_acc"]
        if cfg.progress:
            print(f"resuming {out} after epoch {start_epoch}/{cfg.epochs}", file=sys.stderr)
    else:
        initial_val = evaluate(student, splits.val, mean=splits.mean, std=splits.std, device=device)
        history, start_epoch = [], 0
        best_val, best_epoch, best_state = initial_val, 0, _state_copy(student)

    def save(finished: bool, summary: dict[str, Any] | None = None, *, step: int = 0,
             epoch_generator: torch.Tensor | None = None, meter: tuple[float, int] = (0.0, 0)) -> None:
        if out is None:
            return
        train_state: dict[str, Any] = {"epoch": len(history), "history": history, "best_val": best_val,
                                       "best_epoch": best_epoch, "initial_val_acc": initial_val,
                                       "finished": finished, "config": dataclasses.asdict(cfg),
                                       "last_val_acc": last_val}
        if finished:
            train_state["summary"] = summary
        else:
            train_state.update(optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                               generator=gen.get_state() if epoch_generator is None else epoch_generator,
                               torch_rng=torch.get_rng_state(), best_state_dict=best_state, step=step,
                               meter=meter)
        ckpt.save(out, student, input_shape=splits.input_shape, dataset=splits.name, classes=splits.classes,
                  metrics={"val_acc": best_val if finished else last_val}, plan=plan,
                  extra={**(meta or {}), "train_state": train_state})

    def progress() -> int:  # optimiser steps done
        return len(history) * steps_per_epoch + start_step

    path = device_path(device, amp=cfg.amp, device_data=cfg.device_data)
    # channels-last on the fast path only (the CPU loop is the one it always was); undone in the finally
    formatted = [m for m in (student, teacher if cfg.kd else None) if m is not None] \
        if path.sync_free and cfg.channels_last else []
    for m in formatted:
        m.to(memory_format=torch.channels_last)
    hint = "lower --finetune-lr (or --finetune-temperature) and fine-tune afresh"
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if pause and progress() >= pause_step:  # type: ignore[operator]
                break
            t0 = time.time()
            alpha = alpha_at(epoch, cfg)
            student.train()
            meter = LossMeter(sync_each_step=not path.sync_free)
            meter.total, meter.seen = meter_state
            skip, epoch_generator, paused = start_step, gen.get_state(), False
            it = batches(splits.train, cfg.batch_size, mean=splits.mean, std=splits.std, shuffle=True,
                         augment_data=cfg.augment, generator=gen, device=device, resident=path.resident)
            bar = tqdm(it, total=steps_per_epoch, desc=f"finetune {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=not cfg.progress, file=sys.stderr)
            with path.kernels():
                for i, (x, y) in enumerate(bar):
                    if i < skip:  # done before the pause: the draws are replayed, the step is not
                        continue
                    if formatted:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with path.autocast():
                        logits = student(x)
                        if teach is not None:
                            teacher_logits = teach(x)
                            loss = kd_loss(logits, teacher_logits, y, alpha=alpha, temperature=cfg.temperature,
                                           label_smoothing=cfg.label_smoothing)
                        else:
                            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                    meter.add(loss, len(y), where=f"fine-tuning epoch {epoch + 1}", hint=hint)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    running = meter.mean()  # None on the fast path: reading the loss would wait for the GPU
                    if running is not None:
                        bar.set_postfix(loss=f"{running:.3f}")
                    if pause and epoch * steps_per_epoch + i + 1 == pause_step and i + 1 < steps_per_epoch:
                        paused = True
                        break
            if paused:  # inside the epoch: its start generator, the steps done and the loss so far are kept
                with preserved_rng():  # a validation the uninterrupted run does not make: it draws nothing
                    last_val = evaluate(student, splits.val, mean=splits.mean, std=splits.std, device=device)
                save(finished=False, step=i + 1, epoch_generator=epoch_generator,
                     meter=(float(meter.total), meter.seen))
                start_step = i + 1
                break
            start_step, meter_state = 0, (0.0, 0)
            train_loss = meter.finish(where=f"fine-tuning epoch {epoch + 1}", hint=hint)
            val_acc = evaluate(student, splits.val, mean=splits.mean, std=splits.std, device=device)
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_acc": val_acc,
                            "alpha": alpha if cfg.kd else 0.0, "lr": sched.get_last_lr()[0],
                            "seconds": time.time() - t0})
            last_val = val_acc
            if val_acc > best_val:
                best_val, best_epoch, best_state = val_acc, epoch + 1, _state_copy(student)
            if cfg.progress:
                tqdm.write(f"finetune epoch {epoch + 1}/{cfg.epochs}: loss {train_loss:.4f}  "
                           f"val_acc {val_acc:.2f}% (best {best_val:.2f}%)", file=sys.stderr)
            save(finished=False)
    finally:
        for m in formatted:
            m.to(memory_format=torch.contiguous_format)
        if teacher is not None and cfg.kd:
            teacher.train(teacher_training)
    if pause:
        student.eval()
        last = last_val if last_val is not None else initial_val
        return {"paused": True, "epoch": progress() / steps_per_epoch, "last_val_acc": last, "val_acc": best_val,
                "initial_val_acc": initial_val, "best_epoch": best_epoch, "epochs": cfg.epochs,
                "history": list(history), "seconds": round(time.time() - t_start, 1)}
    student.load_state_dict(best_state)
    student.eval()
    summary = {"val_acc": best_val, "initial_val_acc": initial_val, "best_epoch": best_epoch,
               "epochs": cfg.epochs, "history": history, "seconds": round(time.time() - t_start, 1)}
    save(finished=True, summary=summary)
    return summary
