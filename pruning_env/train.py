"""Train a baseline CNN: ``python -m pruning_env.train --net vgg16 --dataset cifar10``.

Recipe: SGD with Nesterov momentum, one-cycle (or cosine) learning rate schedule
stepped per batch, weight decay, label smoothing, random-crop + flip augmentation
on batched tensors. The validation split (held out from the training data) is
evaluated after every epoch; the test split once at the end.

A checkpoint is written atomically after every epoch (model + optimiser +
scheduler + RNG states), so ``--resume`` after an interruption continues from the
last finished epoch and gives the same result as an uninterrupted run (on CPU).
"""

from __future__ import annotations

import argparse
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

from . import checkpoint as ckpt
from .cli import add_config_args, config_from_args, option, print_json, resolve_device, seed_everything
from .data import Splits, batches, cache_dir, load_splits
from .evaluation import evaluate
from .models import build, list_models

__all__ = ["TrainConfig", "train", "fit", "default_checkpoint_path", "main"]


@dataclass
class TrainConfig:
    """How to train a baseline network."""

    net: str = option("vgg16", "architecture", choices=list_models())
    dataset: str = option("cifar10", "data set: cifar10, cifar100, synthetic or an image-folder name")
    data_dir: str | None = option(None, "directory holding the data set (default: $PRUNING_ENV_DATA, else the cache)")
    width: float = option(1.0, "channel width multiplier (e.g. 0.25 for CPU experiments)")
    epochs: int = option(30, "training epochs")
    batch_size: int = option(128, "batch size")
    lr: float = option(0.1, "peak learning rate")
    momentum: float = option(0.9, "SGD (Nesterov) momentum")
    weight_decay: float = option(5e-4, "L2 weight decay (not applied to BN and biases)")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy (0 disables)")
    dropout: float | None = option(0.0, "dropout rate of the classifier's Dropout layers while training "
                                   "(None keeps the architecture's 0.5)")
    schedule: str = option("onecycle", "learning-rate schedule", choices=["onecycle", "cosine"])
    warmup_frac: float = option(0.15, "one-cycle: fraction of steps spent warming up")
    val_fraction: float = option(0.1, "share of the training data held out for validation")
    split_seed: int = option(0, "seed of the train/validation split")
    seed: int = option(0, "seed for initialisation, shuffling and augmentation")
    device: str = option("auto", "auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    out: str | None = option(None, "checkpoint path (default: the cache, see default_checkpoint_path)")
    resume: bool = option(False, "continue from the checkpoint at --out after an interruption")
    channels_last: bool = option(True, "train in channels-last memory format (about 1.3x faster on CPU)")
    progress: bool = option(True, "show progress bars")


def default_checkpoint_path(net: str, dataset: str, width: float, epochs: int, seed: int = 0) -> Path:
    """Where baselines are cached: ``~/.cache/pruning_env/checkpoints/<net>-<dataset>-w<width>-e<epochs>-s<seed>.pt``."""
    return cache_dir() / "checkpoints" / f"{net}-{dataset}-w{width:g}-e{epochs}-s{seed}.pt"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimiser groups: weight decay on weight matrices/kernels, none on BN parameters and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=cfg.warmup_frac, div_factor=10.0,
            final_div_factor=100.0, three_phase=False, anneal_strategy="linear",
        )
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)


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
        ``{"val_acc", "epochs", "history"}`` (accuracies in percent).
    """
    device = resolve_device(cfg.device)
    model.to(device)
    if cfg.dropout is not None:
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = cfg.dropout
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    steps_per_epoch = -(-len(splits.train) // cfg.batch_size)
    sched = _make_scheduler(opt, cfg, cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    start_epoch, history = 0, []
    if resume_state is not None:
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        gen.set_state(resume_state["generator"])
        torch.set_rng_state(resume_state["torch_rng"])
        start_epoch, history = resume_state["epoch"], list(resume_state["history"])
    val_acc = history[-1]["val_acc"] if history else float("nan")
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.time()
        loss_sum, seen = 0.0, 0
        it = batches(splits.train, cfg.batch_size, mean=splits.mean, std=splits.std, shuffle=True,
                     augment_data=True, generator=gen, device=device)
        bar = tqdm(it, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
                   leave=False, file=sys.stderr)
        for x, y in bar:
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{sched.get_last_lr()[0]:.3g}")
        val_acc = evaluate(model, splits.val, mean=splits.mean, std=splits.std, device=device)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "val_acc": val_acc,
                        "seconds": time.time() - t0})
        if cfg.progress:
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: loss {loss_sum / max(seen, 1):.4f}  val_acc {val_acc:.2f}%  "
                       f"({time.time() - t0:.0f}s)", file=sys.stderr)
        if out is not None:
            state = {"epoch": epoch + 1, "history": history, "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state()}
            ckpt.save(out, model, input_shape=splits.input_shape, dataset=splits.name, classes=splits.classes,
                      metrics={"val_acc": val_acc}, train_config=dataclasses.asdict(cfg),
                      extra={"train_state": state, **(meta or {})})
    return {"val_acc": val_acc, "epochs": cfg.epochs, "history": history}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a baseline as configured; returns the JSON summary the CLI prints.

    The returned dict has ``test_acc`` and ``val_acc`` (percent), ``epochs``,
    ``seconds`` (this run's wall-clock time) and ``checkpoint`` (path).
    """
    t0 = time.time()
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg.epochs}")
    device = resolve_device(cfg.device)
    out = Path(cfg.out) if cfg.out else default_checkpoint_path(cfg.net, cfg.dataset, cfg.width, cfg.epochs, cfg.seed)
    splits = load_splits(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed)
    seed_everything(cfg.seed)
    model = build(cfg.net, num_classes=splits.num_classes, in_channels=splits.input_shape[0], width=cfg.width)
    resume_state = None
    if cfg.resume and out.is_file():
        loaded = ckpt.load(out, expect_arch=cfg.net)
        resume_state = loaded.extra.get("train_state")
        if resume_state is None:
            raise ckpt.CheckpointError(f"{out} has no training state to resume from")
        model = loaded.model
        if cfg.progress:
            print(f"resuming {out} after epoch {resume_state['epoch']}/{cfg.epochs}", file=sys.stderr)
    elif out.is_file() and not cfg.resume:
        print(f"note: overwriting {out} (pass --resume to continue it instead)", file=sys.stderr)
    result = fit(model, splits, cfg, out=out, resume_state=resume_state)
    test_acc = evaluate(model, splits.test, mean=splits.mean, std=splits.std, device=device)
    loaded = ckpt.load(out)
    ckpt.save(out, model, input_shape=splits.input_shape, dataset=splits.name, classes=splits.classes,
              metrics={"val_acc": result["val_acc"], "test_acc": test_acc}, train_config=dataclasses.asdict(cfg),
              extra=loaded.extra)
    return {"test_acc": test_acc, "val_acc": result["val_acc"], "epochs": cfg.epochs,
            "seconds": round(time.time() - t0, 1), "checkpoint": str(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pruning_env.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, TrainConfig)
    args = parser.parse_args(argv)
    cfg = config_from_args(TrainConfig, args)
    try:
        summary = train(cfg)
    except (ValueError, RuntimeError) as exc:  # our errors carry actionable messages
        parser.exit(2, f"error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted: the last finished epoch is saved; rerun with --resume to continue\n")
    print_json(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
