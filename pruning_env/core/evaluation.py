"""Accuracy and latency measurement.

On CUDA, :func:`evaluate` reads the split from its device-resident copy
(:func:`pruning_env.core.batching.resident_copy`), uses large batches and synchronises with
the host once per call; it always runs in float32 (no autocast: the env's rewards and every
reported accuracy are fp32 measurements; note that cuDNN may use TF32 for fp32 convolutions
on Ampere and newer GPUs, torch's default ``torch.backends.cudnn.allow_tf32 = True``).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from pruning_env.core.data import Split, batches

__all__ = ["DEFAULT_EVAL_BATCH", "NonFiniteError", "check_finite_loss", "evaluate", "measure_latency"]

DEFAULT_EVAL_BATCH = {"cpu": 500, "cuda": 2000}
"""Images per evaluation forward pass by device type when a caller gives none (others: the CPU value)."""


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
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    flip_tta: bool = False,
) -> float:
    """Top-1 accuracy in percent of ``model`` (in eval mode) on ``split``.

    Args:
        batch_size: images per forward pass (``None``: :data:`DEFAULT_EVAL_BATCH` of the device type;
            the accuracy does not depend on it).
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
    dev = torch.device(device)
    if batch_size is None:
        batch_size = DEFAULT_EVAL_BATCH.get(dev.type, DEFAULT_EVAL_BATCH["cpu"])
    was_training = model.training
    model.eval()
    # counted on the device and read once: no host synchronisation per batch (exact integers either way)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    finite = torch.ones((), dtype=torch.bool, device=dev)
    try:
        for x, y in batches(split, batch_size, mean=mean, std=std, device=dev):
            scores = model(x).softmax(1) + model(x.flip(3)).softmax(1) if flip_tta else model(x)
            finite &= torch.isfinite(scores).all()
            correct += (scores.argmax(1) == y).sum()
    finally:
        model.train(was_training)
    if not bool(finite):
        raise NonFiniteError("the model produced non-finite outputs (NaN/inf); its weights are probably "
                             "NaN/inf (a diverged training?): no accuracy can be measured")
    return 100.0 * int(correct) / len(split)


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
