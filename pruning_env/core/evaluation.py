"""Accuracy and latency measurement."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from pruning_env.core.data import Split, batches

__all__ = ["NonFiniteError", "check_finite_loss", "evaluate", "measure_latency"]


class NonFiniteError(RuntimeError):
    """A model produced NaN/inf (logits or a loss): a result computed from it would be silently wrong."""


def check_finite_loss(loss: torch.Tensor, *, where: str, hint: str) -> float:
    """``float(loss)``, or :class:`NonFiniteError` naming ``where`` it happened and ``hint`` (what to change)."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteError(f"the training loss became {value} at {where}; {hint}")
    return value


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    flip_tta: bool = False,
) -> float:
    """Top-1 accuracy in percent of ``model`` (in eval mode) on ``split``.

    Args:
        limit: evaluate only the first ``limit`` examples (a fixed, deterministic subset).
        flip_tta: test-time augmentation: classify by the mean softmax of each image and
            its horizontal mirror (two forward passes). Off everywhere the package measures
            accuracy (rewards, fine-tuning, reports' ``test_acc``); reports give it separately.

    The model's train/eval mode is restored afterwards. Raises :class:`NonFiniteError` when the
    model's outputs hold NaN/inf (NaN weights would otherwise count as class 0).
    """
    if limit is not None:
        split = split.subset(limit)
    if len(split) == 0:
        raise ValueError("cannot evaluate on an empty split")
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for x, y in batches(split, batch_size, mean=mean, std=std, device=device):
            scores = model(x).softmax(1) + model(x.flip(3)).softmax(1) if flip_tta else model(x)
            if not bool(torch.isfinite(scores).all()):
                raise NonFiniteError("the model produced non-finite outputs (NaN/inf); its weights are probably "
                                     "NaN/inf (a diverged training?): no accuracy can be measured")
            correct += int((scores.argmax(1) == y).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / len(split)


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    *,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    warmup: int = 5,
    repeats: int = 30,
) -> float:
    """Median wall-clock latency of one forward pass, in milliseconds.

    Args:
        input_shape: ``(C, H, W)`` of one image.
        batch_size: images per forward pass.
    """
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    times = []
    try:
        for i in range(warmup + repeats):
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    times.sort()
    return 1000.0 * times[len(times) // 2]
