"""Reward proxies: cheap signals of how well a pruned network will do after fine-tuning.

The env's reward needs, for every plan, a number that ranks plans the way their accuracy after a full
fine-tune would (``benchmarks/reward_fidelity.py`` measures how well each proxy does). A proxy here is

1. BatchNorm re-estimation on a few training batches (:class:`~pruning_env.engine.bn.BNRecalConfig`),
2. optionally ``proxy_kd_steps`` steps of knowledge distillation from the unpruned network
   (:func:`kd_steps`: SGD, constant learning rate, the fine-tuning recipe's KD loss),
3. one signal on a fixed set of validation images (:class:`RewardImages`): ``acc`` (top-1 accuracy),
   ``kl`` (KL divergence of the network's outputs from the unpruned network's) or ``ce``
   (cross-entropy with the labels).

The signal becomes a *quality* on the scale of an accuracy ratio (1 for the unpruned network, higher is
better, see :meth:`Signals.quality`), which the env's objective uses in place of ``acc / base acc``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pruning_env.core.config import check_settings, option
from pruning_env.core.data import Split, Splits, batches
from pruning_env.core.evaluation import NonFiniteError, check_finite_loss
from pruning_env.training.finetune import FinetuneConfig, kd_loss
from pruning_env.training.optim import param_groups
from pruning_env.training.teacher import TeacherCache, teacher_fn

__all__ = ["PROXY_SIGNALS", "ProxyConfig", "RewardImages", "Signals", "kd_steps"]

#: The signals a proxy can reward (see :meth:`Signals.quality`).
PROXY_SIGNALS = ("acc", "kl", "ce")

_RECIPE = FinetuneConfig()  # the KD loss's temperature and weight, momentum and weight decay of fine-tuning


@dataclass(frozen=True)
class ProxyConfig:
    """What the env's reward measures on a pruned network (after its BN re-estimation)."""

    proxy: str = option("kl", "reward signal on the reward images: kl (KL divergence from the unpruned network's "
                        "outputs, the default), acc (accuracy) or ce (cross-entropy); how well each ranks plans like "
                        "a fine-tune, and at what cost: README 'Results', benchmarks/results/reward_fidelity.md",
                        choices=list(PROXY_SIGNALS))
    proxy_kd_steps: int = option(0, "knowledge-distillation steps on training batches before the signal is "
                                 "measured (0: none)", min=0)
    proxy_kd_lr: float = option(0.01, "constant SGD learning rate of those steps", min=0, min_exclusive=True)
    proxy_kd_batch_size: int = option(128, "batch size of those steps", min=1)

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class Signals:
    """What a network does on the reward images.

    Attributes:
        acc: top-1 accuracy in percent.
        kl: mean over images of ``KL(p_unpruned || p_network)`` at temperature 1, in nats.
        ce: mean cross-entropy with the labels, in nats.
    """

    acc: float
    kl: float
    ce: float

    def quality(self, signal: str, base: Signals) -> float:
        """The signal on an accuracy-ratio scale (1 = the unpruned network ``base``, higher = better).

        ``acc``: ``acc / base.acc``; ``kl``: ``exp(-kl)`` (the unpruned network has KL 0);
        ``ce``: ``exp(base.ce - ce)``. All are monotone in their signal, so they rank plans alike.
        """
        if signal == "acc":
            return self.acc / max(base.acc, 1e-9)
        if signal == "kl":
            return math.exp(-self.kl)
        if signal == "ce":
            return math.exp(base.ce - self.ce)
        raise ValueError(f"signal must be one of {PROXY_SIGNALS}, got {signal!r}")


class RewardImages:
    """A fixed set of validation images with the unpruned network's outputs on them (computed once).

    Args:
        teacher: the unpruned network (eval mode).
        split: the validation split; its first ``limit`` images are used (the same ones the accuracy of
            :func:`~pruning_env.core.evaluation.evaluate` with ``limit`` uses).
        mean, std: normalisation of the data set.
        limit: number of images (``None``: all).
        batch_size: images per forward pass.
        device: where images and outputs live.
    """

    def __init__(self, teacher: nn.Module, split: Split, *, mean: tuple[float, ...], std: tuple[float, ...],
                 limit: int | None, batch_size: int = 500, device: str | torch.device = "cpu") -> None:
        if limit is not None:
            split = split.subset(limit)
        if len(split) == 0:
            raise ValueError("the reward needs at least one validation image")
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        xs, ys = zip(*batches(split, self.batch_size, mean=mean, std=std, device=self.device))
        self.images: tuple[torch.Tensor, ...] = xs  # normalised (B, C, H, W) batches
        self.labels: tuple[torch.Tensor, ...] = ys
        with torch.no_grad():
            self.teacher_log_probs = tuple(F.log_softmax(_forward(teacher, x), dim=1) for x in xs)
        self.base = self.measure(teacher)

    def __len__(self) -> int:
        return sum(len(y) for y in self.labels)

    @torch.no_grad()
    def measure(self, model: nn.Module) -> Signals:
        """Accuracy, KL from the unpruned network and cross-entropy of ``model`` (its mode is restored)."""
        correct, kl, ce = 0, 0.0, 0.0
        for x, y, t in zip(self.images, self.labels, self.teacher_log_probs):
            log_p = F.log_softmax(_forward(model, x), dim=1)
            correct += int((log_p.argmax(1) == y).sum())
            kl += float(F.kl_div(log_p, t, reduction="sum", log_target=True))
            ce += float(F.nll_loss(log_p, y, reduction="sum"))
        n = len(self)
        return Signals(acc=100.0 * correct / n, kl=max(0.0, kl / n), ce=ce / n)


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        out = model(x)
    finally:
        model.train(was_training)
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError("the model produced non-finite outputs (NaN/inf): no reward can be measured")
    return out


def kd_steps(student: nn.Module, teacher: nn.Module, splits: Splits, steps: int, *, lr: float, batch_size: int,
             seed: int = 0, device: str | torch.device = "cpu",
             checkpoints: tuple[int, ...] = (), on_checkpoint=None,
             teacher_cache: TeacherCache | None = None) -> None:
    """``steps`` SGD steps of knowledge distillation on augmented training batches, in place.

    The fine-tuning recipe's loss (:func:`~pruning_env.training.finetune.kd_loss` with its temperature and
    first-epoch weight), Nesterov momentum and weight decay, at a CONSTANT learning rate ``lr``, so the
    first ``n`` of ``N`` steps are exactly an ``n``-step run: ``on_checkpoint(n)`` is called after step
    ``n`` for every ``n`` in ``checkpoints`` (one run measures several step counts). Deterministic in
    ``seed``; the student ends in eval mode. ``teacher_cache``: the teacher's outputs shared by the runs of many
    plans (they replay the same batches; :class:`~pruning_env.training.teacher.TeacherCache`).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if steps == 0:
        return
    if len(splits.train) == 0:
        raise ValueError("KD steps need training images (splits.train is empty)")
    student.to(device)
    teacher.eval()
    teach = teacher_fn(teacher, teacher_cache)
    opt = torch.optim.SGD(param_groups(student, _RECIPE.weight_decay), lr=lr, momentum=_RECIPE.momentum,
                          nesterov=True)
    gen = torch.Generator().manual_seed(seed)
    student.train()
    # dropout draws from torch's global RNG: seeded here, and the caller's RNG state is left as it was
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        _kd_loop(student, teach, splits, steps, opt, gen, batch_size, device, checkpoints, on_checkpoint)


def _kd_loop(student: nn.Module, teacher: Callable[[torch.Tensor], torch.Tensor], splits: Splits, steps: int,
             opt: torch.optim.Optimizer,
             gen: torch.Generator, batch_size: int, device: str | torch.device, checkpoints: tuple[int, ...],
             on_checkpoint) -> None:
    done = 0
    try:
        while done < steps:
            for x, y in batches(splits.train, batch_size, mean=splits.mean, std=splits.std, shuffle=True,
                                augment_data=True, generator=gen, device=device,
                                drop_last=len(splits.train) >= batch_size):
                target = teacher(x)
                loss = kd_loss(student(x), target, y, alpha=_RECIPE.alpha_start, temperature=_RECIPE.temperature)
                check_finite_loss(loss, where=f"proxy KD step {done + 1}", hint="lower --proxy-kd-lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
                if done in checkpoints and on_checkpoint is not None:
                    student.eval()
                    on_checkpoint(done)
                    student.train()
                if done >= steps:
                    break
    finally:
        student.eval()
