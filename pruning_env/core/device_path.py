"""The switches of the CUDA fast path that the training loops share, and their loss bookkeeping.

On CPU every switch is off and the loops run exactly the code they always ran (same numbers,
bit for bit). On CUDA (:func:`device_path`):

* ``resident``: the data set lives on the GPU and is augmented there
  (:func:`pruning_env.core.batching.batches` with ``resident=True``);
* ``sync_free``: no host synchronisation per step: the loss is summed on the device and read
  once per epoch (:class:`LossMeter`), progress bars show the learning rate only;
* ``amp``: forward and backward under ``torch.autocast("cuda", dtype=torch.bfloat16)``. The
  weights, gradients, optimiser state, BN running statistics and the EMA stay float32; the
  losses (cross-entropy, the KD term's log-softmax) are computed in float32 by autocast's
  rules. Every evaluation (validation, test, the env's reward and BN re-estimation) runs
  outside autocast, in float32. bf16 has an 8-bit mantissa, so a bf16 run's weights and
  accuracies differ from an fp32 run's by training noise (a few tenths of a point), not by a
  systematic loss: no loss scaling is needed for bf16;
* ``benchmark``: cuDNN autotuning while a loop trains one fixed architecture (restored after).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pruning_env.core.evaluation import check_finite_loss

__all__ = ["DevicePath", "LossMeter", "device_path"]


@dataclass(frozen=True)
class DevicePath:
    """Which parts of the fast path a training loop uses (all off: the CPU path)."""

    resident: bool = False
    sync_free: bool = False
    amp: bool = False
    benchmark: bool = False
    amp_device: str = "cuda"
    """The device type autocast applies to (tests run the bf16 loops on the CPU with ``"cpu"``)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when ``amp`` (on ``amp_device``), else a no-op context."""
        return torch.autocast(self.amp_device, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    @contextlib.contextmanager
    def kernels(self) -> Iterator[None]:
        """cuDNN autotuning for the duration of a loop when ``benchmark`` (the global flag is restored)."""
        if not self.benchmark:
            yield
            return
        old = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = old


def device_path(device: torch.device, *, amp: bool, device_data: bool) -> DevicePath:
    """The fast path for ``device``: everything off on CPU (``amp``/``device_data`` are then ignored)."""
    cuda = device.type == "cuda"
    return DevicePath(resident=cuda and device_data, sync_free=cuda, amp=cuda and amp, benchmark=cuda)


class LossMeter:
    """The running sum of a training loop's per-example loss, with the finiteness check.

    ``sync_each_step=True`` (the CPU loops): every step's loss is read on the host and checked at
    once (:func:`check_finite_loss`), and summed as a Python float, as the loops always did.
    ``False`` (the CUDA loops): the sum stays on the device and is read once, by :meth:`finish`,
    which raises :class:`NonFiniteError` if any step's loss was NaN/inf (a non-finite loss makes the
    sum non-finite), so a diverged epoch is never saved.
    """

    def __init__(self, sync_each_step: bool) -> None:
        self.sync_each_step = sync_each_step
        self.total: float | torch.Tensor = 0.0
        self.seen = 0

    def add(self, loss: torch.Tensor, n: int, *, where: str, hint: str) -> None:
        """Add a batch's mean ``loss`` (scalar tensor) over ``n`` examples."""
        if self.sync_each_step:
            self.total += check_finite_loss(loss, where=where, hint=hint) * n
        else:
            self.total = self.total + loss.detach().float() * n
        self.seen += n

    def mean(self) -> float | None:
        """The mean loss so far, or None when reading it would synchronise with the device."""
        if not self.sync_each_step:
            return None
        return float(self.total) / max(self.seen, 1)

    def finish(self, *, where: str, hint: str) -> float:
        """The mean loss of the epoch (one host read); raises :class:`NonFiniteError` if it is NaN/inf."""
        if isinstance(self.total, torch.Tensor):
            return check_finite_loss(self.total, where=where, hint=hint) / max(self.seen, 1)
        return float(self.total) / max(self.seen, 1)

