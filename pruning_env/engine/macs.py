"""Predict the MACs and parameters of any pruning plan in microseconds, without building a model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn

from pruning_env.core.fx import probe_forward
from pruning_env.engine import flops as flops_mod
from pruning_env.engine.graph import PrunableLayer, consumer_map, prunable_layers
from pruning_env.engine.plan import PlanError, PruningPlan

__all__ = ["MacsModel"]


class MacsModel:
    """Predict a pruned model's MACs and parameters from keep counts alone.

    Built once from the unpruned model. Every layer that :func:`pruning_env.engine.flops.count`
    counts and whose width a plan can change contributes
    ``a*O*I + b*O + c*I + d`` MACs (and likewise parameters), where ``O`` is its
    output width (its own keep count for a prunable conv or its BatchNorm, else
    fixed) and ``I`` its input width (``keep count * block`` of the prunable layer
    feeding it, else fixed): conv MACs are bilinear in in/out channels, BatchNorm
    linear in its channels, a Linear after a flatten bilinear in kept blocks. The
    coefficients are measured, not assumed: each such layer is rebuilt on the
    ``meta`` device at widths ``{1, 2} x {1, 2}`` and counted with ``flops.count``,
    so predictions follow that counter's conventions (e.g. whether biases count)
    exactly. Everything else is a constant. :meth:`predict` takes microseconds.

    Attributes:
        layer_names: the prunable layers, in forward order.
        widths: their unpruned widths (``(L,)`` int64 array).
        base_macs, base_params: the unpruned model's MACs (per image) and parameters.
    """

    def __init__(self, layer_names: Sequence[str], widths: Sequence[int], terms: np.ndarray,
                 const_macs: int, const_params: int) -> None:
        self.layer_names = tuple(layer_names)
        self.widths = np.asarray(widths, dtype=np.int64)
        self._index = {n: i for i, n in enumerate(self.layer_names)}
        # columns: out_layer, out_fixed, in_layer, in_block, in_fixed, 4 MAC coefficients, 4 param coefficients
        self._terms = np.asarray(terms, dtype=np.int64).reshape(-1, 13)
        self._const_macs = int(const_macs)
        self._const_params = int(const_params)
        t = self._terms  # the per-plan arithmetic's constant parts (predict_batch)
        if ((t[:, [0, 2]] < -1) | (t[:, [0, 2]] >= len(self.widths))).any():
            raise ValueError(f"MacsModel terms name layers outside [-1, {len(self.widths)}): "
                             f"{sorted(set(t[:, [0, 2]].ravel().tolist()))}")
        # O and I of every term are gathered from the keep counts followed by the fixed widths: columns
        # [0, L) the layers, [L, L + T) each term's fixed O, [L + T, L + 2T) its fixed I
        n_layers, n_terms = len(self.widths), len(t)
        self._fixed = np.concatenate([t[:, 1], t[:, 4]])
        self._o_col = np.where(t[:, 0] >= 0, t[:, 0], n_layers + np.arange(n_terms))
        self._i_col = np.where(t[:, 2] >= 0, t[:, 2], n_layers + n_terms + np.arange(n_terms))
        self._i_mul = np.where(t[:, 2] >= 0, t[:, 3], 1)  # a fixed I is taken as it is
        # rows: the O*I, O and I coefficients of every term; columns: MACs, params (the 1-terms go to _const)
        self._coef = np.concatenate([t[:, [5, 9]], t[:, [6, 10]], t[:, [7, 11]]], axis=0)
        self._const = np.array([self._const_macs + int(t[:, 8].sum()), self._const_params + int(t[:, 12].sum())],
                               dtype=np.int64)
        self.base_macs, self.base_params = self.predict_array(self.widths)

    @classmethod
    def from_model(cls, model: nn.Module, input_shape: tuple[int, int, int] = (3, 32, 32), *,
                   layers: Sequence[PrunableLayer] | None = None) -> MacsModel:
        """Analyse the unpruned ``model`` for inputs of ``input_shape`` ``(C, H, W)``."""
        if layers is None:
            layers = prunable_layers(model, input_shape)
        report = flops_mod.count(model, input_shape)
        modules = dict(model.named_modules())
        index = {lay.name: i for i, lay in enumerate(layers)}
        out_of: dict[str, int] = {}
        for lay in layers:
            out_of[lay.name] = index[lay.name]
            if lay.bn is not None:
                out_of[lay.bn] = index[lay.name]
        in_of = {c: (index[p], block) for c, (p, block) in consumer_map(list(layers)).items()}
        linked = [n for n in report.per_layer_macs if n in out_of or n in in_of]
        in_shapes = _input_shapes(model, input_shape, linked)
        const_macs, const_params = report.macs, report.params
        rows = []
        for name in linked:
            mod = modules[name]
            const_macs -= report.per_layer_macs[name]
            const_params -= report.per_layer_params[name]
            if isinstance(mod, nn.Conv2d):
                o0, i0 = mod.out_channels, mod.in_channels
            elif isinstance(mod, nn.Linear):
                o0, i0 = mod.out_features, mod.in_features
            elif isinstance(mod, nn.BatchNorm2d):
                o0 = i0 = mod.num_features
            else:  # pragma: no cover - the graph only links convs, BatchNorm2d and Linear
                raise TypeError(f"unexpected layer type {type(mod).__name__} at {name}")
            macs_c, params_c = _probe_coefficients(mod, in_shapes[name])
            in_layer, block = in_of.get(name, (-1, 1))
            rows.append((out_of.get(name, -1), o0, in_layer, block, i0, *macs_c, *params_c))
        mm = cls([lay.name for lay in layers], [lay.out_channels for lay in layers], np.asarray(rows, dtype=np.int64),
                 const_macs, const_params)
        if (mm.base_macs, mm.base_params) != (report.macs, report.params):  # pragma: no cover - a safety net
            raise RuntimeError(f"MacsModel does not reproduce flops.count on the unpruned model "
                               f"({mm.base_macs}, {mm.base_params}) != ({report.macs}, {report.params})")
        return mm

    def predict_array(self, keep: np.ndarray | Sequence[int]) -> tuple[int, int]:
        """``(macs, params)`` for keep counts given as an ``(L,)`` array in ``layer_names`` order."""
        macs, params = self.predict_batch(np.asarray(keep, dtype=np.int64).reshape(1, -1))
        return int(macs[0]), int(params[0])

    def predict_batch(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(macs, params)``, each ``(N,)`` int64, for ``(N, L)`` keep counts: per term, ``O`` and ``I`` from the
        keep counts (or fixed), then ``[O*I, O, I] @ coefficients`` (exact integer arithmetic)."""
        k = np.asarray(keep, dtype=np.int64).reshape(-1, len(self.widths))
        ext = np.empty((len(k), len(self.widths) + len(self._fixed)), dtype=np.int64)
        ext[:, :len(self.widths)], ext[:, len(self.widths):] = k, self._fixed
        o, i = ext[:, self._o_col], ext[:, self._i_col] * self._i_mul  # (N, terms)
        both = np.concatenate([o * i, o, i], axis=1) @ self._coef + self._const  # (N, 2)
        return both[:, 0], both[:, 1]

    def predict(self, keep_counts: Mapping[str, int]) -> tuple[int, int]:
        """``(macs per image, params)`` of the model whose layers keep ``keep_counts``
        filters (``{layer: count}``; missing layers keep all)."""
        k = self.widths.copy()
        for name, count in keep_counts.items():
            i = self._index.get(name)
            if i is None:
                raise PlanError(f"{name!r} is not a prunable layer of this model")
            k[i] = count
        if (k < 1).any() or (k > self.widths).any():
            bad = [(n, int(c), int(w)) for n, c, w in zip(self.layer_names, k, self.widths) if not 1 <= c <= w]
            raise PlanError(f"keep counts outside [1, width]: {bad[:4]}")
        return self.predict_array(k)

    def predict_plan(self, plan: PruningPlan) -> tuple[int, int]:
        """``(macs, params)`` after applying ``plan``."""
        return self.predict(plan.keep_counts())


def _input_shapes(model: nn.Module, input_shape: tuple[int, ...], names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Input shape (without the batch dimension) of each named module for one forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        def hook(_mod: nn.Module, args: tuple, name: str = name) -> None:
            shapes[name] = tuple(int(s) for s in args[0].shape[1:])
        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        probe_forward(model, (1, *input_shape[-3:]))
    finally:
        for h in handles:
            h.remove()
    return shapes


def _probe_coefficients(mod: nn.Module, in_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Coefficients ``(a, b, c, d)`` of ``a*O*I + b*O + c*I + d`` for the MACs and the
    parameters of ``mod`` at output width ``O`` and input width ``I``, measured by
    counting meta-device copies of ``mod`` at ``O, I in {1, 2}`` with ``flops.count``."""
    f_macs, f_params = {}, {}
    for o in (1, 2):
        for i in (1, 2):
            if isinstance(mod, nn.Conv2d):
                probe: nn.Module = nn.Conv2d(i, o, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                                             bias=mod.bias is not None, padding_mode=mod.padding_mode, device="meta")
                shape = (i, *in_shape[1:])
            elif isinstance(mod, nn.Linear):
                if len(in_shape) != 1:
                    raise PlanError(f"a Linear consumer must take (N, features) input, got (N, {in_shape})")
                probe = nn.Sequential(nn.Flatten(), nn.Linear(i, o, bias=mod.bias is not None, device="meta"))
                shape = (i, 1, 1)
            else:
                probe = nn.BatchNorm2d(o, affine=mod.affine, track_running_stats=mod.track_running_stats,
                                       device="meta")
                shape = (o, *in_shape[1:])
            rep = flops_mod.count(probe, shape)
            f_macs[o, i], f_params[o, i] = rep.macs, rep.params

    def solve(f: dict[tuple[int, int], int]) -> tuple[int, ...]:
        a = f[2, 2] - f[2, 1] - f[1, 2] + f[1, 1]
        b = f[2, 1] - f[1, 1] - a
        c = f[1, 2] - f[1, 1] - a
        return a, b, c, f[1, 1] - a - b - c

    return solve(f_macs), solve(f_params)

