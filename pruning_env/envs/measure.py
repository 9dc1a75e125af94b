"""How the env measures one plan: surgery, BN re-estimation, the transition's scores and the reward proxy.

:class:`PlanMeter` holds everything a measurement needs that does not change within an env (the unpruned
network, its layers, the calibration batch, the reward images and the unpruned network's signals). The
env caches its results by plan (:class:`Measured`); nothing here caches plans.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pruning_env.core.data import Splits, calibration_batch
from pruning_env.criteria import apply_direction, compute_components, fuse, score
from pruning_env.engine.bn import BNRecalConfig
from pruning_env.engine.graph import PrunableLayer
from pruning_env.engine.macs import MacsModel
from pruning_env.engine.plan import PruningPlan
from pruning_env.engine.surgery import apply
from pruning_env.envs.config import EnvConfig
from pruning_env.envs.features import dsfp_features
from pruning_env.training.proxy import RewardImages, Signals, kd_steps
from pruning_env.training.teacher import TeacherCache

__all__ = ["Measured", "PlanMeter"]


@dataclass
class Measured:
    """What the env knows about one plan.

    Attributes:
        acc: validation accuracy in percent on the reward images (after the proxy's KD steps, if any).
        quality: the reward proxy's signal on an accuracy-ratio scale (1 = unpruned; see
            :meth:`~pruning_env.training.proxy.Signals.quality`).
        macs, params: MACs per image and parameters of the pruned network.
        signals: accuracy, KL and cross-entropy on the reward images.
        scores: per layer, the pruning order of the current filters (low = prune first).
        features: ``(L, n_dsfp_features + K)`` DSFP observation features.
    """

    acc: float
    quality: float
    macs: int
    params: int
    signals: Signals
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    features: np.ndarray | None = None
    plan: PruningPlan | None = None


class PlanMeter:
    """Measures plans of one unpruned network under one :class:`EnvConfig` (no caching).

    Args:
        base: the unpruned network in eval mode on ``device`` (never modified).
        layers: its prunable layers, agent order.
        splits: calibration and BN batches from ``train``, reward images from ``val``.
        cfg: the env's settings.
        keep_count: ``(layer index, rate) -> filters kept`` (the env's rate rule).
        device: where everything runs.
    """

    def __init__(self, base: nn.Module, layers: list[PrunableLayer], splits: Splits, cfg: EnvConfig,
                 keep_count, device: torch.device) -> None:
        self.base, self.layers, self.splits, self.cfg, self.device = base, layers, splits, cfg, device
        self.names = [layer.name for layer in layers]
        self.widths = np.array([layer.out_channels for layer in layers])
        self.keep_count = keep_count
        self.rates = list(cfg.rates)
        self.macs_model = MacsModel.from_model(base, splits.input_shape)
        self.calib_x, self.calib_y = calibration_batch(splits, cfg.scoring.calib_size, seed=0, device=device)
        self.reward_images = RewardImages(base, splits.val, mean=splits.mean, std=splits.std, limit=cfg.eval_size,
                                          batch_size=cfg.eval_batch_size, device=device)
        self.timings: dict[str, float] = {}  # seconds per phase, summed over measurements
        # the proxy's KD steps of every plan replay the same batches (seed 0): the teacher runs once per batch
        self.teacher = TeacherCache(base)
        self._base_kl: dict[str, torch.Tensor] | None = None
        self._base_components: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def base_signals(self) -> Signals:
        """The unpruned network's signals on the reward images."""
        return self.reward_images.base

    def build(self, plan: PruningPlan, bn: BNRecalConfig | None = None) -> nn.Module:
        """A new, physically pruned network of ``plan`` with BN re-estimated as the env does (or by ``bn``)."""
        model = apply(self.base, plan, self.splits.input_shape, layers=self.layers)
        (self.cfg.bn if bn is None else bn).apply(model, self.splits, seed=0, device=self.device)
        return model

    def measure(self, plan: PruningPlan) -> Measured:
        """Accuracy, quality, MACs and next-step scores of ``plan``'s network."""
        cfg, clock = self.cfg, time.perf_counter
        t0 = clock()
        macs, params = self.macs_model.predict(plan.keep_counts())
        is_base = all(plan.keep_count(n) == c for n, c in zip(self.names, self.widths))
        model = self.base if is_base else apply(self.base, plan, self.splits.input_shape, layers=self.layers)
        t1 = clock()
        if not is_base:
            cfg.bn.apply(model, self.splits, seed=0, device=self.device)
        t2 = clock()
        scores, features = self._score(model, plan, is_base)
        t3 = clock()
        if not is_base:
            kd_steps(model, self.base, self.splits, cfg.proxy.proxy_kd_steps, lr=cfg.proxy.proxy_kd_lr,
                     batch_size=cfg.proxy.proxy_kd_batch_size, seed=0, device=self.device,
                     teacher_cache=self.teacher)
        t4 = clock()
        signals = self.base_signals if is_base else self.reward_images.measure(model)
        t5 = clock()
        for phase, seconds in (("surgery", t1 - t0), ("bn_recal", t2 - t1), ("scoring", t3 - t2),
                               ("proxy_kd", t4 - t3), ("evaluation", t5 - t4)):
            self.timings[phase] = self.timings.get(phase, 0.0) + seconds
        quality = signals.quality(cfg.proxy.proxy, self.base_signals)
        return Measured(acc=signals.acc, quality=quality, macs=int(macs), params=int(params), signals=signals,
                        scores=scores, features=features, plan=plan)

    def network_signals(self, model: nn.Module) -> Signals:
        """The reward images' signals of any network (the proxy's KD steps, if any, run on a copy)."""
        steps = self.cfg.proxy.proxy_kd_steps
        if steps:
            model = copy.deepcopy(model)
            kd_steps(model, self.base, self.splits, steps, lr=self.cfg.proxy.proxy_kd_lr,
                     batch_size=self.cfg.proxy.proxy_kd_batch_size, seed=0, device=self.device,
                     teacher_cache=self.teacher)
        return self.reward_images.measure(model)

    def _score(self, model: nn.Module, plan: PruningPlan, is_base: bool) -> tuple[dict, np.ndarray]:
        """Per-layer pruning order of the current filters and the DSFP observation features."""
        cfg, names = self.cfg, self.names
        if self._base_kl is None:
            self._base_kl = compute_components(self.base, self.calib_x, self.calib_y, layers=names,
                                               kl=cfg.scoring.kl).kl
        if cfg.dynamic or is_base or cfg.kl_per_step:
            comp = compute_components(model, self.calib_x, self.calib_y, layers=names,
                                      kl=cfg.kl_per_step if (cfg.kl_per_step and not is_base) else None)
            grad, taylor = comp.grad, comp.taylor
            kl = comp.kl if comp.kl is not None else {n: self._base_kl[n][plan.indices(n)] for n in names}
        else:  # static sensitivity: the unpruned network's scores of the surviving filters
            grad = {n: self._base_components["grad"][n][plan.indices(n)] for n in names}
            taylor = {n: self._base_components["taylor"][n][plan.indices(n)] for n in names}
            kl = {n: self._base_kl[n][plan.indices(n)] for n in names}
        if is_base:
            self._base_components = {"grad": grad, "taylor": taylor}
        fused = fuse(grad, taylor, kl)
        sc = cfg.scoring
        if sc.criterion == "dsfp":  # the fused score is at hand already: no second gradient pass
            order = apply_direction(fused, sc.direction)
        else:
            order = score(model, self.calib_x, self.calib_y, sc.criterion, layers=names, **sc.options(seed=0))
        feats = dsfp_features(names, grad, taylor, kl, fused, order, self.rates, self.keep_count)
        return order, feats
