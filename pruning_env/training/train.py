"""Train a baseline CNN (CLI: ``python -m pruning_env.train --net vgg16 --dataset cifar10``).

Recipe: SGD with Nesterov momentum, one-cycle (or cosine) learning rate schedule
stepped per batch, weight decay, label smoothing, random-crop + flip + Cutout 8x8
augmentation on batched tensors, batch augmentation (every batch of 128 images holds
two independently augmented copies of each: twice the compute of a plain epoch) and an
exponential moving average of the weights (decay 0.999), which is what is validated
and saved. ``--aug-copies 1 --ema-decay 0 --cutout 0`` is the plain recipe. The
validation split (held out from the training data) is evaluated after every epoch;
the test split once at the end.

A checkpoint is written atomically after every epoch (model + optimiser +
scheduler + RNG states), so ``--resume`` after an interruption continues from the
last finished epoch and gives the same result as an uninterrupted run (on CPU).

On CUDA the loop takes the fast path (:mod:`pruning_env.core.device_path`): the data set
resident on the GPU and augmented there (``device_data``), channels-last, bf16 autocast
(``amp``), the loss summed on the device and read once per epoch, cuDNN autotuning, large
evaluation batches. On CPU those options are ignored and the loop is the one it always was.
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
    option,
    preserved_rng,
    resolve_device,
    run_only_names,
    seed_everything,
)
from pruning_env.core.data import Splits, batches, cache_dir, load_splits
from pruning_env.core.device_path import DevicePath, LossMeter, device_path
from pruning_env.core.evaluation import evaluate
from pruning_env.core.models import build, list_models
from pruning_env.training.optim import param_groups

__all__ = ["TrainConfig", "TrainingInterrupted", "default_checkpoint_path", "fit", "recipe_mismatch", "train",
           "with_legacy_values"]


@dataclass
class TrainConfig:
    """How to train a baseline network."""

    net: str = option("vgg16", "architecture", choices=list_models())
    dataset: str = option("cifar10", "data set: cifar10, cifar100, synthetic or an image-folder name")
    data_dir: str | None = option(None, "directory holding the data set (default: $PRUNING_ENV_DATA, else the cache)",
                                  run_only=True)
    width: float = option(1.0, "channel width multiplier (e.g. 0.25 for CPU experiments)",
                          min=0, min_exclusive=True)
    epochs: int = option(30, "training epochs", min=1)
    batch_size: int = option(128, "batch size", min=1)
    lr: float = option(0.1, "peak learning rate", min=0, min_exclusive=True)
    momentum: float = option(0.9, "SGD (Nesterov) momentum", min=0, max=1, max_exclusive=True)
    weight_decay: float = option(5e-4, "L2 weight decay (not applied to BN and biases)", min=0)
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy (0 disables)",
                                   min=0, max=1, max_exclusive=True)
    dropout: float | None = option(0.0, "dropout rate of the classifier's Dropout layers while training "
                                   "(None keeps the architecture's 0.5)", min=0, max=1, max_exclusive=True)
    schedule: str = option("onecycle", "learning-rate schedule", choices=["onecycle", "cosine"])
    warmup_frac: float = option(0.15, "one-cycle: fraction of steps spent warming up",
                               min=0, max=1, min_exclusive=True, max_exclusive=True)
    anneal: str = option("linear", "one-cycle: shape of the warm-up and decay", choices=["linear", "cos"])
    cycle_momentum: bool = option(False, "one-cycle: cycle the momentum inversely to the learning rate "
                                  "(0.95 -> 0.85 -> 0.95, torch's OneCycleLR default)")
    crop_padding: int = option(4, "random-crop augmentation: pixels of zero padding on each side (0: no crop)",
                              min=0)
    aug_copies: int = option(2, "batch augmentation (Hoffer et al., 2020): independently augmented copies of "
                             "every image in its batch; costs that many times the compute per step (1: off)", min=1)
    cutout: int = option(8, "Cutout augmentation: side in pixels of a zeroed square per image (0: none)", min=0)
    sam_rho: float = option(0.0, "sharpness-aware minimisation (Foret et al., 2021): radius of the weight "
                            "perturbation, e.g. 0.05; costs a second forward/backward per step (0: off)", min=0)
    ema_decay: float = option(0.999, "exponential moving average of the weights and BN statistics, decay per "
                              "step (e.g. 0.999); the average is validated and saved (0: off)",
                              min=0, max=1, max_exclusive=True)
    val_fraction: float = option(0.1, "share of the training data held out for validation",
                                min=0, max=1, min_exclusive=True, max_exclusive=True)
    split_seed: int = option(0, "seed of the train/validation split", min=0)
    seed: int = option(0, "seed for initialisation, shuffling and augmentation", min=0)
    device: str = option("auto", "auto (CUDA if present, else CPU), cpu, cuda, cuda:N", run_only=True)
    out: str | None = option(None, "checkpoint path (default: the cache, see default_checkpoint_path)", run_only=True)
    resume: bool = option(False, "continue from the checkpoint at --out after an interruption", run_only=True)
    overwrite: bool = option(False, "replace an existing --out (without it an existing --out is refused)",
                             run_only=True)
    channels_last: bool = option(True, "train in channels-last memory format (faster convolutions on CPU)",
                                 run_only=True)
    amp: bool = option(True, "CUDA: bf16 autocast of forward and backward (weights, optimiser, BN statistics and "
                       "every evaluation stay float32); ignored on CPU")
    device_data: bool = option(True, "CUDA: keep the data set on the GPU and augment it there (no per-batch host "
                               "copies); ignored on CPU", run_only=True)
    progress: bool = option(True, "show progress bars", run_only=True)

    def __post_init__(self) -> None:
        check_settings(self)


def default_checkpoint_path(net: str, dataset: str, width: float, epochs: int, seed: int = 0) -> Path:
    """Where baselines are cached.

    ``~/.cache/pruning_env/checkpoints/<net>-<dataset>-w<width>-e<epochs>-s<seed>.pt``.
    """
    return cache_dir() / "checkpoints" / f"{net}-{dataset}-w{width:g}-e{epochs}-s{seed}.pt"


def _make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=cfg.warmup_frac, div_factor=10.0,
            final_div_factor=100.0, three_phase=False, anneal_strategy=cfg.anneal,
            cycle_momentum=cfg.cycle_momentum, base_momentum=0.85, max_momentum=0.95,
        )
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)


def _sam_second_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> None:
    """Replace the gradients in ``model`` by SAM's: the gradient at ``w + rho * g / ||g||``.

    Called after ``loss.backward()`` at ``w``; leaves the weights at ``w`` and the BN running
    statistics as the first pass left them (the perturbed pass does not update them).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = cfg.sam_rho / (float(norm) + 1e-12)
    eps = [g * scale for g in grads]
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    with torch.no_grad():
        originals = [p.detach().clone() for p in params]
        torch._foreach_add_(params, eps)
    for m in bns:
        m.momentum = 0.0  # running stats unchanged by the perturbed pass
    try:
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing).backward()
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        with torch.no_grad():
            torch._foreach_copy_(params, originals)  # exactly w again (w + e - e is not, in floats)


class _Ema:
    """Exponential moving average of a model's floating-point state (weights and BN statistics).

    ``swap()`` exchanges the live model's values with the other copy, in the model's own
    tensors. Between epochs the model holds the average (validated, saved, returned) and the
    other copy the raw weights; ``fit`` swaps at the start and at the end of every epoch.
    The effective decay warms up as ``min(decay, (1 + t) / (10 + t))`` after ``t`` updates so
    the average is not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.live = [t for t in model.state_dict().values() if t.dtype.is_floating_point]
        self.avg = [t.detach().clone() for t in self.live]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.avg, [t.detach() for t in self.live], 1.0 - d)

    @torch.no_grad()
    def swap(self) -> None:
        for live, avg in zip(self.live, self.avg):
            tmp = live.clone()
            live.copy_(avg)
            avg.copy_(tmp)

    def resume_state(self) -> dict[str, Any]:
        """Between epochs: the raw weights and the step count, for ``--resume``."""
        return {"ema_raw": [t.clone() for t in self.avg], "ema_updates": self.updates}

    @torch.no_grad()
    def load_resume(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint, whose model holds the average: the raw weights go aside."""
        if "ema_raw" not in state:
            raise ValueError("this checkpoint was trained without --ema-decay; resume it with --ema-decay 0")
        torch._foreach_copy_(self.avg, state["ema_raw"])
        self.updates = int(state["ema_updates"])


def fit(
    model: nn.Module,
    splits: Splits,
    cfg: TrainConfig,
    *,
    out: Path | None = None,
    resume_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place with the recipe of ``cfg``; checkpoint to ``out`` after each epoch.

    Returns:
        ``{"val_acc", "epochs", "history", "train_state"}`` (accuracies in percent; ``train_state``: what
        the last checkpoint at ``out`` holds for ``--resume``, ``None`` without ``out``), kept in memory so
        that nothing is read back from ``out``.
    """
    device = resolve_device(cfg.device)
    model.to(device)
    # --dropout applies while training only: the returned model has the architecture's rates again, exactly
    # what loading the saved checkpoint gives (else a just-trained baseline fine-tunes differently from a cached one)
    dropouts = [(m, m.p) for m in model.modules() if isinstance(m, nn.Dropout)]
    if cfg.dropout is not None:
        for m, _ in dropouts:
            m.p = cfg.dropout
    path = device_path(device, amp=cfg.amp, device_data=cfg.device_data)
    try:
        # the caller's global RNG states are as before (training seeds and draws from them)
        with preserved_rng(), path.kernels():
            return _fit_epochs(model, splits, cfg, device, path, out=out, resume_state=resume_state, meta=meta)
    finally:
        for m, p in dropouts:
            m.p = p
        if cfg.channels_last:
            model.to(memory_format=torch.contiguous_format)  # as a loaded checkpoint is


def _fit_epochs(model: nn.Module, splits: Splits, cfg: TrainConfig, device: torch.device, path: DevicePath, *,
                out: Path | None, resume_state: dict[str, Any] | None, meta: dict[str, Any] | None) -> dict[str, Any]:
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    steps_per_epoch = -(-len(splits.train) // cfg.batch_size)
    sched = _make_scheduler(opt, cfg, cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    start_epoch, history = 0, []
    ema = _Ema(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if resume_state is not None:
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        gen.set_state(resume_state["generator"])
        torch.set_rng_state(resume_state["torch_rng"])
        start_epoch, history = resume_state["epoch"], list(resume_state["history"])
        if ema is not None:
            ema.load_resume(resume_state)
    val_acc = history[-1]["val_acc"] if history else float("nan")
    state = resume_state if out is not None else None
    for epoch in range(start_epoch, cfg.epochs):
        if ema is not None:
            ema.swap()  # train the raw weights (at the first epoch both copies are equal)
        model.train()
        t0 = time.time()
        meter = LossMeter(sync_each_step=not path.sync_free)
        hint = (("the last finished epoch is saved at " + str(out) if out is not None and epoch > 0
                 else "nothing was saved") + "; lower --lr (or raise --warmup-frac) and train afresh (--overwrite)")
        it = batches(splits.train, cfg.batch_size, mean=splits.mean, std=splits.std, shuffle=True,
                     augment_data=True, generator=gen, device=device, cutout=cfg.cutout,
                     padding=cfg.crop_padding, copies=cfg.aug_copies, resident=path.resident)
        bar = tqdm(it, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
                   leave=False, file=sys.stderr)
        for x, y in bar:
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with path.autocast():
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            meter.add(loss, len(y), where=f"epoch {epoch + 1}, step {meter.seen // max(len(y), 1) + 1}", hint=hint)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.sam_rho > 0:
                _sam_second_pass(model, x, y, cfg)
            step_lr = opt.param_groups[0]["lr"]  # the rate this step used (the scheduler then moves to the next)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update()
            running = meter.mean()  # None on the fast path: reading the loss would wait for the GPU
            bar.set_postfix(**({} if running is None else {"loss": f"{running:.3f}"}), lr=f"{step_lr:.3g}")
        train_loss = meter.finish(where=f"epoch {epoch + 1}", hint=hint)
        if ema is not None:
            ema.swap()  # validate, save and return the average; the raw weights travel in the train state
        val_acc = evaluate(model, splits.val, mean=splits.mean, std=splits.std, device=device)
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_acc": val_acc,
                        "seconds": time.time() - t0})
        if cfg.progress:
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: loss {train_loss:.4f}  val_acc {val_acc:.2f}%  "
                       f"({time.time() - t0:.0f}s)", file=sys.stderr)
        if out is not None:
            state = {"epoch": epoch + 1, "history": history, "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state()}
            if ema is not None:
                state.update(ema.resume_state())
            ckpt.save(out, model, input_shape=splits.input_shape, dataset=splits.name, classes=splits.classes,
                      metrics={"val_acc": val_acc}, train_config=dataclasses.asdict(cfg),
                      extra={"train_state": state, **(meta or {})})
    return {"val_acc": val_acc, "epochs": cfg.epochs, "history": history, "train_state": state}


_TRAIN_STATE_KEYS = frozenset({"epoch", "history", "optimizer", "scheduler", "generator", "torch_rng"})
# What checkpoints from before a field existed were trained with (the feature was off).
_LEGACY_VALUES: dict[str, Any] = {"aug_copies": 1, "crop_padding": 4, "cutout": 0, "ema_decay": 0.0, "sam_rho": 0.0,
                                  "warmup_frac": 0.15, "anneal": "linear", "cycle_momentum": False}


def _flag(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{name.replace('_', '-')}"
    return f"--{name.replace('_', '-')} {value}"


def with_legacy_values(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved ``train_config`` with the recipe fields it predates filled in.

    Those fields get the values the code used before they existed (the option was off).
    """
    return {**_LEGACY_VALUES, **saved}


def recipe_mismatch(cfg: TrainConfig, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Recipe fields where ``cfg`` differs from a checkpoint's saved ``train_config``.

    Returns ``{field: (saved value, cfg value)}``; fields that only say where the run executes
    (device, paths, progress bars, memory format) are ignored, and fields a checkpoint predates
    count as the value the code then used (``with_legacy_values``).
    """
    saved = with_legacy_values(saved)
    run_only = run_only_names(TrainConfig)
    return {f.name: (saved[f.name], getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
            if f.name not in run_only and f.name in saved and saved[f.name] != getattr(cfg, f.name)}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a baseline as configured; returns the JSON summary the CLI prints.

    The returned dict has ``test_acc`` and ``val_acc`` (percent; single forward pass, what
    every other part of the package measures), ``test_acc_flip_tta`` (percent, mean softmax of
    the image and its mirror: reported separately, never used for rewards), ``epochs``,
    ``seconds`` (this run's wall-clock time) and ``checkpoint`` (path).

    The checkpoint (``--out``) is locked for the whole run (:func:`~pruning_env.core.checkpoint.run_lock`):
    a second run on the same ``--out`` is refused at once (:class:`~pruning_env.core.checkpoint.RunLockedError`,
    naming the other run), whatever its flags.
    """
    out = _out_path(cfg)
    ckpt.check_writable(out, "--out")  # before the lock file is made beside it
    # it seeds and draws from the global RNGs: the caller's are left as they were
    with preserved_rng(), ckpt.run_lock(out, "--out", file=True):
        return _train(cfg, out)


def _out_path(cfg: TrainConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    return default_checkpoint_path(cfg.net, cfg.dataset, cfg.width, cfg.epochs, cfg.seed)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`; the message says what is saved and how to continue."""


def _saved_epoch(out: Path, since: float, resume: bool) -> int:
    """The last epoch this run (or the run it resumed) saved at ``out``; 0 if none."""
    if not out.is_file() or not (resume or out.stat().st_mtime >= since):
        return 0
    try:
        state = ckpt.load(out).extra.get("train_state") or {}
    except ckpt.CheckpointError:
        return 0
    return int(state.get("epoch", 0))


def _check_out(cfg: TrainConfig, out: Path) -> None:
    """Before any work: --out writable, not replaced unless asked, and resumable when --resume is given."""
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues --out and --overwrite replaces it: give one of them")
    ckpt.check_writable(out, "--out")
    if out.is_file() and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"--out {out} exists (an earlier result); pass --resume to continue it, --overwrite to "
                         "replace it, or choose another --out")


def _resume_state(loaded: ckpt.Checkpoint, out: Path) -> dict[str, Any]:
    state = loaded.extra.get("train_state")
    if loaded.plan is not None or "prune_config" in loaded.extra or "algorithm" in loaded.extra:
        raise ValueError(f"--resume: {out} is a pruned or fine-tuned network, not an interrupted baseline training "
                         "(pruning_env.train); choose another --out, or --overwrite to train afresh there")
    if not isinstance(state, dict) or not set(state) >= _TRAIN_STATE_KEYS:
        raise ValueError(f"--resume: {out} has no training state of pruning_env.train to resume from; "
                         "pass --overwrite to train afresh there")
    return state


def _train(cfg: TrainConfig, out: Path) -> dict[str, Any]:
    t0 = time.time()
    device = resolve_device(cfg.device)
    _check_out(cfg, out)
    splits = load_splits(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed)
    seed_everything(cfg.seed)
    model = build(cfg.net, num_classes=splits.num_classes, in_channels=splits.input_shape[0], width=cfg.width)
    resume_state = None
    if cfg.resume and out.is_file():
        loaded = ckpt.load(out, expect_arch=cfg.net)
        resume_state = _resume_state(loaded, out)
        diff = recipe_mismatch(cfg, loaded.train_config) if loaded.train_config is not None else {}
        if diff:
            raise ValueError(
                f"{out} was trained with a different recipe than this run asks for ("
                + "; ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in diff.items())
                + "); resuming would mix the two. Resume with the checkpoint's recipe ("
                + " ".join(_flag(k, a) for k, (a, _) in diff.items())
                + "), or drop --resume to start afresh.")
        model = loaded.model
        if cfg.progress:
            print(f"resuming {out} after epoch {resume_state['epoch']}/{cfg.epochs}", file=sys.stderr)
    try:
        result = fit(model, splits, cfg, out=out, resume_state=resume_state)
    except KeyboardInterrupt:
        done = _saved_epoch(out, t0, resume_state is not None)
        raise TrainingInterrupted(
            f"interrupted: epoch {done}/{cfg.epochs} is saved at {out}; rerun with --resume to continue" if done
            else "interrupted before the first epoch finished: nothing was saved; rerun to start again") from None
    test_acc = evaluate(model, splits.test, mean=splits.mean, std=splits.std, device=device)
    test_tta = evaluate(model, splits.test, mean=splits.mean, std=splits.std, device=device, flip_tta=True)
    # the resume state this run kept in memory (never read back from --out)
    ckpt.save(out, model, input_shape=splits.input_shape, dataset=splits.name, classes=splits.classes,
              metrics={"val_acc": result["val_acc"], "test_acc": test_acc, "test_acc_flip_tta": test_tta},
              train_config=dataclasses.asdict(cfg), extra={"train_state": result["train_state"]})
    return {"test_acc": test_acc, "test_acc_flip_tta": test_tta, "val_acc": result["val_acc"], "epochs": cfg.epochs,
            "seconds": round(time.time() - t0, 1), "checkpoint": str(out)}
