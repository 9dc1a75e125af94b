"""How the env measures one plan, and THE record of a measurement (:class:`Measurement`).

:class:`PlanMeter` holds everything a measurement needs that does not change within an env (the unpruned
network, its layers, the calibration batch, the reward images and the unpruned network's signals). The
env caches its results by plan; nothing here caches plans.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pruning_env.core.data import Splits, calibration_batch
from pruning_env.criteria import apply_direction, compute_components, fuse, fuse_normalised, minmax, score
from pruning_env.engine.bn import BNRecalConfig
from pruning_env.engine.graph import PrunableLayer
from pruning_env.engine.macs import MacsModel
from pruning_env.engine.plan import PruningPlan
from pruning_env.engine.surgery import apply
from pruning_env.envs.config import EnvConfig
from pruning_env.envs.features import LayerDsfp, combine_dsfp, dsfp_features, kept_table, layer_dsfp, removed_masses
from pruning_env.envs.objective import objective
from pruning_env.training.proxy import RewardImages, Signals, kd_steps
from pruning_env.training.teacher import TeacherCache

__all__ = ["Measurement", "PlanMeter", "StaticDsfp", "dsfp_order_and_features", "metric", "surviving"]


def metric(meaning: str, *, info: str | None = None, info_per: float = 1.0) -> Any:
    """A measured quantity of :class:`Measurement`: ``meaning`` (with its unit); ``info``: its key in the env's
    infos when that differs from the field's name, where its value is divided by ``info_per``."""
    return field(metadata={"metric": meaning, "info": info, "info_per": info_per})


@dataclass(frozen=True)
class Measurement:
    """What the env measured for one plan: THE record of a measurement (``env.measure(plan)``).

    Its *metrics* are the fields made with :func:`metric`, in this order; every other shape of a
    measurement is derived from them, so adding a metric is adding one field here:

    * :meth:`to_dict`: ``{metric: value}`` (``float``, or ``int`` for the exact counts); a search point
      (:class:`pruning_env.search.Search`) carries these keys;
    * :meth:`info`: the env's infos (every value a ``float`` that survives a float32 cast: the integer counts
      in millions, ``mmacs`` and ``mparams``), to which the env adds the agent's layer ``rate``.

    The other attributes are what an env needs to continue from the plan (not metrics, not compared):
    ``plan``; ``signals`` (accuracy, KL and cross-entropy on the reward images); ``scores`` (per layer, the
    ``(C_current,)`` pruning order of the current filters for the next step, low = pruned first); ``features``
    (the DSFP observation features, ``{name: (L,) array}``). The record is picklable: another env of the same
    model, data and config takes it as its own (its :attr:`~pruning_env.envs.env.FilterPruningEnv.measurement_source`).
    """

    acc: float = metric("validation accuracy in percent on the env's reward images (after the proxy's KD steps, "
                        "if any)")
    acc_ratio: float = metric("acc / the unpruned network's")
    quality: float = metric("the reward proxy's signal on an accuracy-ratio scale (1 = unpruned; see Rewards)")
    macs_ratio: float = metric("MACs / the unpruned network's")
    params_ratio: float = metric("parameters / the unpruned network's")
    macs: int = metric("MACs per image (an exact integer; in infos mmacs, millions)", info="mmacs", info_per=1e6)
    params: int = metric("parameters (an exact integer; in infos mparams, millions)", info="mparams", info_per=1e6)
    objective: float = metric("J of the network under the env's reward settings (see Rewards)")
    # not metrics (keyword-only, so a metric declared in a subclass may follow them)
    plan: PruningPlan | None = field(default=None, compare=False, repr=False, kw_only=True)
    signals: Signals | None = field(default=None, compare=False, repr=False, kw_only=True)
    scores: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False, kw_only=True)
    features: Mapping[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False, kw_only=True)

    @classmethod
    def metrics(cls) -> tuple[str, ...]:
        """The names of the metrics, in order (the keys of :meth:`to_dict`)."""
        return tuple(f.name for f in _metric_fields(cls))

    @classmethod
    def info_keys(cls) -> tuple[str, ...]:
        """The keys of :meth:`info`, in order (the env's infos add ``rate``)."""
        return tuple(f.metadata["info"] or f.name for f in _metric_fields(cls))

    @classmethod
    def meanings(cls) -> dict[str, str]:
        """``{info key: meaning}`` of every metric (the env's documented infos)."""
        return {f.metadata["info"] or f.name: f.metadata["metric"] for f in _metric_fields(cls)}

    def to_dict(self) -> dict[str, float | int]:
        """The metrics as plain Python numbers: ``int`` for the exact counts, ``float`` for the rest."""
        return {f.name: (int if f.type in ("int", int) else float)(getattr(self, f.name))
                for f in _metric_fields(type(self))}

    def info(self) -> dict[str, float]:
        """The metrics in the env's info form: every value a ``float`` (counts divided by their ``info_per``)."""
        out = {}
        for f in _metric_fields(type(self)):
            value, per = getattr(self, f.name), f.metadata["info_per"]
            out[f.metadata["info"] or f.name] = value / per if per != 1.0 else float(value)
        return out


def _metric_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "metric" in f.metadata]


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
        self.base, self.splits, self.device = base, splits, device
        self._plan_fields(layers, cfg, keep_count, MacsModel.from_model(base, splits.input_shape))
        self.calib_x, self.calib_y = calibration_batch(splits, cfg.scoring.calib_size, seed=0, device=device)
        self.reward_images = RewardImages(base, splits.val, mean=splits.mean, std=splits.std, limit=cfg.eval_size,
                                          batch_size=cfg.eval_batch_size, device=device)
        # the proxy's KD steps of every plan replay the same batches (seed 0): the teacher runs once per batch
        self.teacher = TeacherCache(base)
        self._base_kl: dict[str, torch.Tensor] | None = None
        self._base_components: dict[str, dict[str, torch.Tensor]] = {}
        self._static: StaticDsfp | None = None  # dynamic=False with DSFP: the memoised static scores

    def _plan_fields(self, layers: list[PrunableLayer], cfg: EnvConfig, keep_count: Any,
                     macs_model: MacsModel) -> None:
        """What a meter knows of plans without a network: layers, settings, the rate rule, the MACs model."""
        self.layers, self.cfg, self.keep_count, self.macs_model = layers, cfg, keep_count, macs_model
        self.names = [layer.name for layer in layers]
        self.widths = np.array([layer.out_channels for layer in layers])
        self.rates = list(cfg.rates)
        self.timings: dict[str, float] = {}  # seconds per phase, summed over measurements

    @property
    def base_signals(self) -> Signals:
        """The unpruned network's signals on the reward images."""
        return self.reward_images.base

    def build(self, plan: PruningPlan, bn: BNRecalConfig | None = None) -> nn.Module:
        """A new, physically pruned network of ``plan`` with BN re-estimated as the env does (or by ``bn``)."""
        model = apply(self.base, plan, self.splits.input_shape, layers=self.layers)
        (self.cfg.bn if bn is None else bn).apply(model, self.splits, seed=0, device=self.device)
        return model

    def measure(self, plan: PruningPlan) -> Measurement:
        """The measurement of ``plan``'s network: accuracy, quality, MACs, objective and next-step scores."""
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
        return self.record(plan, signals.acc, quality, int(macs), int(params), signals=signals, scores=scores,
                           features=features)

    def record(self, plan: PruningPlan | None, acc: float, quality: float, macs: int, params: int,
               **rest: Any) -> Measurement:
        """The :class:`Measurement` of measured ``acc``, ``quality``, ``macs`` and ``params``: the ratios to the
        unpruned network and the objective are derived here, in one place (``rest``: its other attributes)."""
        base_macs, base_params = self.macs_model.base_macs, self.macs_model.base_params
        macs_ratio = macs / base_macs
        return Measurement(acc=acc, acc_ratio=acc / max(self.base_signals.acc, 1e-9), quality=quality,
                           macs_ratio=macs_ratio, params_ratio=params / base_params, macs=int(macs),
                           params=int(params), objective=objective(self.cfg, quality, macs_ratio, acc, macs),
                           plan=plan, **rest)

    def network_signals(self, model: nn.Module) -> Signals:
        """The reward images' signals of any network (the proxy's KD steps, if any, run on a copy)."""
        steps = self.cfg.proxy.proxy_kd_steps
        if steps:
            model = copy.deepcopy(model)
            kd_steps(model, self.base, self.splits, steps, lr=self.cfg.proxy.proxy_kd_lr,
                     batch_size=self.cfg.proxy.proxy_kd_batch_size, seed=0, device=self.device,
                     teacher_cache=self.teacher)
        return self.reward_images.measure(model)

    def _score(self, model: nn.Module, plan: PruningPlan, is_base: bool) -> tuple[dict, dict[str, np.ndarray]]:
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
        elif cfg.scoring.criterion == "dsfp":  # static sensitivity: the unpruned network's, of the kept filters
            if self._static is None:
                self._static = StaticDsfp(self.sensitivities(), names, cfg.scoring.direction, self.rates,
                                          self.keep_count)
            return self._static(plan)
        else:
            grad, taylor, kl = surviving(self.sensitivities(), plan, names)
        if is_base:
            self._base_components = {"grad": grad, "taylor": taylor}
        sc = cfg.scoring
        order = None
        if sc.criterion != "dsfp":  # with DSFP the fused score is the order: no second gradient pass
            order = score(model, self.calib_x, self.calib_y, sc.criterion, layers=names, **sc.options(seed=0))
        return dsfp_order_and_features(names, grad, taylor, kl, sc.direction, self.rates, self.keep_count, order)

    def sensitivities(self) -> dict[str, dict[str, torch.Tensor]]:
        """The unpruned network's DSFP components on the calibration batch: ``{"grad" | "taylor" | "kl": {layer:
        (C,) tensor}}`` (computed with its first measurement)."""
        if not self._base_components or self._base_kl is None:
            raise RuntimeError("the unpruned network has not been measured yet")
        return {**self._base_components, "kl": self._base_kl}


def surviving(base: Mapping[str, Mapping[str, torch.Tensor]], plan: PruningPlan,
              names: list[str]) -> tuple[dict[str, torch.Tensor], ...]:
    """``(grad, taylor, kl)`` of the filters ``plan`` keeps, from the unpruned network's (``base``, as
    :meth:`PlanMeter.sensitivities` gives them): the static sensitivity of ``dynamic=False``."""
    return tuple({n: base[c][n][plan.indices(n)] for n in names} for c in ("grad", "taylor", "kl"))


def dsfp_order_and_features(names: list[str], grad: Mapping[str, torch.Tensor], taylor: Mapping[str, torch.Tensor],
                            kl: Mapping[str, torch.Tensor], direction: str, rates: list[float], keep_count: Any,
                            order: Mapping[str, torch.Tensor] | None = None) -> tuple[Any, dict[str, np.ndarray]]:
    """The transition's pruning order of the current filters (the DSFP fusion in ``direction``, unless another
    criterion's ``order`` is given) and the DSFP observation features, from the current filters' components."""
    fused = fuse(grad, taylor, kl)
    if order is None:
        order = apply_direction(fused, direction)
    return order, dsfp_features(names, grad, taylor, kl, fused, order, rates, keep_count)


class StaticDsfp:
    """:func:`dsfp_order_and_features` of ``dynamic=False`` for any plan, from the unpruned network's components
    (``base``) of the filters the plan keeps, memoised per layer: a layer's order and statistics depend only on
    which of its filters survive, so a kept-filter set met before costs a dictionary lookup.

    Args:
        base: ``{"grad" | "taylor" | "kl": {layer: (C,) tensor}}`` of the unpruned network.
        names, direction, rates, keep_count: as :func:`dsfp_order_and_features`'s.
        per_layer: kept-filter sets remembered per layer (the oldest is forgotten first).
    """

    def __init__(self, base: Mapping[str, Mapping[str, torch.Tensor]], names: list[str], direction: str,
                 rates: list[float], keep_count: Any, per_layer: int = 2048) -> None:
        self.base, self.names, self.direction, self.per_layer = base, names, direction, per_layer
        self.kept = kept_table(len(names), rates, keep_count)
        self._memo: list[dict[tuple[int, ...], tuple[torch.Tensor, LayerDsfp, np.ndarray]]] = [{} for _ in names]
        fuse({n: base["grad"][n] for n in names}, {n: base["taylor"][n] for n in names},
             {n: base["kl"][n] for n in names})  # fuse's checks (lengths, finite values), once for every subset
        self._base64 = {c: {n: torch.as_tensor(base[c][n]).detach().to("cpu", torch.float64).flatten()
                            for n in names} for c in ("grad", "taylor", "kl")}

    def layer(self, i: int, kept: tuple[int, ...]) -> tuple[torch.Tensor, LayerDsfp, np.ndarray]:
        """Layer ``i``'s ``(order, statistics, removed masses)`` when it keeps the filters ``kept`` (sorted
        indices into the unpruned layer): the ``(C_kept,)`` pruning order of those filters (low first), their
        :class:`LayerDsfp` and its :func:`removed_masses` at every grid rate. Memoised; do not modify."""
        n, memo = self.names[i], self._memo[i]
        hit = memo.get(kept)
        if hit is None:  # fuse() and layer_dsfp() of the kept filters, sharing the min-max normalisation
            idx = torch.tensor(kept, dtype=torch.long)
            grad, taylor, kl = (self.base[c][n][idx] for c in ("grad", "taylor", "kl"))
            norm = tuple(minmax(self._base64[c][n][idx]) for c in ("grad", "taylor", "kl"))
            fused = fuse_normalised(*norm)
            order = apply_direction({n: fused}, self.direction)[n]
            stats = layer_dsfp(grad, taylor, kl, fused, order, norm)
            hit = (order, stats, removed_masses(stats, self.kept[i]))
            if len(memo) >= self.per_layer:
                memo.pop(next(iter(memo)))
            memo[kept] = hit
        return hit

    def __call__(self, plan: PruningPlan) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
        """``(order, features)`` of ``plan``, exactly as :func:`dsfp_order_and_features` gives them."""
        hits = [self.layer(i, plan.keep[n]) for i, n in enumerate(self.names)]
        return ({n: h[0].clone() for n, h in zip(self.names, hits)},
                combine_dsfp([h[1] for h in hits], self.kept, [h[2] for h in hits]))
