"""Surrogate mode: the pruning env with every measurement predicted by a model fitted on the real env's.

A *surrogate data set* (:class:`SurrogateData`, a compressed ``.npz`` with no pickled object) holds what the real
env measured for many plans of one trained network (keep counts per layer; accuracy, KL and cross-entropy on the
reward images; exact MACs and parameters), the unpruned network's DSFP sensitivities and signals, the settings it
was measured under and its provenance. It is written by ``python -m benchmarks.surrogate_data``. The data sets
shipped with the package are in ``pruning_env/envs/surrogate_data/``; each is registered as an env id with
``Surrogate`` in it (``pruning_env/Tiny-Surrogate-v1``; see :func:`shipped_data`).

:class:`SurrogateModel` fits one LightGBM regressor per signal (accuracy, log KL, log cross-entropy) from the
plan's keep ratios, MACs and parameter ratios, deterministically (one thread, fixed seed), in seconds on first
use, and caches the fitted trees as LightGBM's TEXT model format (never a pickle) under
``<cache>/surrogate/``, keyed by the data file's digest and the model settings.

:class:`SurrogatePruningEnv` is the real :class:`~pruning_env.envs.env.FilterPruningEnv` with its plan meter
replaced: same agents, spaces, transition (exact budget included), observations, rewards and info keys. It
differs from the real env in exactly these ways:

* Accuracy, KL and cross-entropy of a pruned network are the model's predictions from the plan's keep counts
  (the unpruned network's are the measured ones); the quality, objective and rewards are derived from them by
  the env's own code. MACs and parameters are exact (the architecture's analytic count).
* It exists only for ``dynamic=False`` with the DSFP criterion: the sensitivities of the surviving filters are
  the unpruned network's (shipped), so the observations and the transition depend only on the plan, as in the
  real env with ``dynamic=False``; the real env's default ``dynamic=True`` re-scores the pruned network each
  step, which needs the network.
* The settings that change a measurement (calibration, reward images, BN re-estimation, proxy KD steps,
  criterion, direction) are the data's; asking for others is an error. Reward settings (``reward``,
  ``macs_target``, ``lam``, ``budget_penalty``, ``exact_budget``, ``proxy``), ``rates``, the rate rule and
  ``episode_length`` are free.
* There is no network: ``base_model``, ``calibration_batch``, ``build_network`` and ``measure_network`` raise
  an error naming the real env to use. ``splits`` is None.

Many episodes at once: :class:`~pruning_env.envs.surrogate_vector.SurrogateVectorEnv` steps N episodes of a
surrogate env in arrays, each row the episode this env gives for the same actions.

Confirm any result that matters on the real env (its id without ``-Surrogate``, with ``dynamic=False``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from pruning_env.core.data import cache_dir
from pruning_env.core.models import build
from pruning_env.engine.graph import PrunableLayer, prunable_layers
from pruning_env.engine.macs import MacsModel
from pruning_env.engine.plan import PruningPlan
from pruning_env.envs.config import EnvConfig
from pruning_env.envs.env import FilterPruningEnv
from pruning_env.envs.measure import Measurement, PlanMeter, StaticDsfp
from pruning_env.training.proxy import Signals

__all__ = ["DATA_DIR", "MEASURED_SETTINGS", "SIGNALS", "BatchParts", "SurrogateData", "SurrogateModel",
           "SurrogatePruningEnv", "data_command", "data_name", "find_data", "predict_measurements", "shipped_data"]

DATA_DIR = Path(__file__).with_name("surrogate_data")
"""Where the shipped surrogate data sets are (``<Problem>.npz``, e.g. ``Tiny.npz``, ``VGG16-CIFAR10-w0.25.npz``;
see :func:`data_name`)."""
FORMAT = 1
SIGNALS = ("acc", "kl", "ce")
"""What is measured per plan and predicted: accuracy (%), KL from the unpruned outputs (nats), cross-entropy."""
MEASURED_SETTINGS = ("criterion", "direction", "kl", "calib_size", "kl_per_step", "dynamic", "eval_size",
                     "bn_recal_batches", "bn_recal_batch_size", "proxy_kd_steps", "proxy_kd_lr",
                     "proxy_kd_batch_size")
"""The env settings (flat names) that change what a plan measures: a surrogate env has its data's."""
_SOURCES_HINT = "python -m benchmarks.surrogate_data --help"


@dataclass(frozen=True)
class SurrogateData:
    """Measurements of many plans of one trained network, with what the surrogate env needs besides.

    Attributes:
        meta: ``net``, ``width``, ``dataset``, ``num_classes``, ``input_shape``, ``layers`` (names, agent order),
            ``widths`` (filters per layer), ``settings`` (:data:`MEASURED_SETTINGS` as measured), ``base``
            (the unpruned network's signals), ``sources`` (names of the plan sources), ``provenance``
            (command, commit, checkpoint and its weights digest, machine, date).
        keep: ``(N, L)`` int, filters kept per layer of every plan.
        signals: ``{acc | kl | ce: (N,) float64}`` as measured.
        macs, params: ``(N,)`` int64, exact counts.
        source: ``(N,)`` int, index into ``meta["sources"]``; seed: ``(N,)`` int, the search seed (-1: none);
        target: ``(N,)`` float, the MACs target the plan was made for (0: none).
        sensitivities: ``{grad | taylor | kl: {layer: (C,) float32 tensor}}`` of the unpruned network.
    """

    meta: dict[str, Any]
    keep: np.ndarray
    signals: dict[str, np.ndarray]
    macs: np.ndarray
    params: np.ndarray
    source: np.ndarray
    seed: np.ndarray
    target: np.ndarray
    sensitivities: dict[str, dict[str, torch.Tensor]] = field(repr=False)

    def __len__(self) -> int:
        return int(self.keep.shape[0])

    @property
    def layers(self) -> list[str]:
        return list(self.meta["layers"])

    @property
    def widths(self) -> np.ndarray:
        return np.asarray(self.meta["widths"], dtype=np.int64)

    def digest(self) -> str:
        """SHA-256 (16 hex digits) of the measurements and settings: the model cache's key."""
        h = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode())
        for a in (self.keep, *(self.signals[s] for s in SIGNALS), self.macs, self.params):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write a compressed ``.npz`` (no object arrays: loadable with ``allow_pickle=False``)."""
        arrays = {"meta": np.array(json.dumps({**self.meta, "format": FORMAT}, sort_keys=True)),
                  "keep": self.keep.astype(np.int16), "macs": self.macs.astype(np.int64),
                  "params": self.params.astype(np.int64), "source": self.source.astype(np.int16),
                  "seed": self.seed.astype(np.int16), "target": self.target.astype(np.float64),
                  **{f"signal_{s}": self.signals[s].astype(np.float64) for s in SIGNALS},
                  **{f"base_{c}": np.concatenate([self.sensitivities[c][n].numpy() for n in self.layers])
                     .astype(np.float32) for c in ("grad", "taylor", "kl")}}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> SurrogateData:
        """Read a data set written by :meth:`save` (``ValueError`` naming the file when it is not one)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path} is not a surrogate data set ({type(exc).__name__}: {exc}); make one with "
                             f"{_SOURCES_HINT}") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} has surrogate data format {meta.get('format')}, this package reads {FORMAT}")
        offsets = np.cumsum([0, *meta["widths"]])
        sens = {c: {n: torch.from_numpy(arrays[f"base_{c}"][offsets[i]:offsets[i + 1]].copy())
                    for i, n in enumerate(meta["layers"])} for c in ("grad", "taylor", "kl")}
        return cls(meta=meta, keep=arrays["keep"].astype(np.int64),
                   signals={s: arrays[f"signal_{s}"] for s in SIGNALS}, macs=arrays["macs"],
                   params=arrays["params"], source=arrays["source"].astype(np.int64),
                   seed=arrays["seed"].astype(np.int64), target=arrays["target"].astype(np.float64),
                   sensitivities=sens)

    def subset(self, rows: np.ndarray) -> SurrogateData:
        """The same data set restricted to ``rows`` (a boolean mask or indices), e.g. for a held-out split."""
        return SurrogateData(self.meta, self.keep[rows], {s: v[rows] for s, v in self.signals.items()},
                             self.macs[rows], self.params[rows], self.source[rows], self.seed[rows],
                             self.target[rows], self.sensitivities)

    def check_config(self, cfg: EnvConfig) -> None:
        """``ValueError`` naming every setting of ``cfg`` that changes a measurement and differs from the data's."""
        from pruning_env.core.config import flat_dict

        flat = flat_dict(cfg)
        wrong = {k: (flat[k], v) for k, v in self.meta["settings"].items() if flat.get(k) != v}
        if wrong:
            raise ValueError("the surrogate data was measured with other env settings: " + ", ".join(
                f"{k}={mine!r} (data: {theirs!r})" for k, (mine, theirs) in sorted(wrong.items()))
                + "; these change what a plan measures, so a surrogate env keeps its data's (measure new data "
                f"with those settings: {_SOURCES_HINT})")


class SurrogateModel:
    """One LightGBM regressor per signal: ``acc`` (%), ``log kl``, ``log ce``, from per-layer keep ratios plus
    the MACs and parameter ratios of the plan.

    Deterministic (``deterministic=True``, one thread, seed 0, no bagging): the same data give the same trees.
    400 rounds at learning rate 0.1: on the shipped VGG-16 data the held-out Kendall tau of the KL is that of 800
    rounds at 0.05 to 0.001 at every target, at half the trees to walk per env step (200 rounds at 0.2 lose
    0.003-0.007; measured at issue 26).
    """

    PARAMS: Mapping[str, Any] = {"objective": "regression", "learning_rate": 0.1, "num_leaves": 31,
                                 "min_data_in_leaf": 5, "lambda_l2": 1.0, "deterministic": True,
                                 "force_row_wise": True, "num_threads": 1, "seed": 0, "verbose": -1}
    ROUNDS = 400
    EPS = 1e-6  # KL and cross-entropy are modelled as log(x + EPS)

    def __init__(self, boosters: dict[str, Any], widths: np.ndarray, base_macs: float, base_params: float) -> None:
        self.boosters, self.widths = boosters, np.asarray(widths, dtype=np.float64)
        self.base_macs, self.base_params = float(base_macs), float(base_params)
        self._rows: dict[str, _RowPredictor] | None = None  # made on the first predict_one

    @staticmethod
    def features(keep: np.ndarray, widths: np.ndarray, macs_ratio: np.ndarray, params_ratio: np.ndarray) -> np.ndarray:
        """``(N, L + 2)`` float64: keep ratios per layer, then the MACs and parameter ratios."""
        keep = np.atleast_2d(np.asarray(keep, dtype=np.float64))
        return np.column_stack([keep / widths, np.asarray(macs_ratio).reshape(-1),
                                np.asarray(params_ratio).reshape(-1)])

    @classmethod
    def fit(cls, data: SurrogateData, rounds: int | None = None) -> SurrogateModel:
        """Fit on every record of ``data`` (seconds for 20,000 plans)."""
        base_macs, base_params = _base_counts(data)
        return cls({s: cls.fit_signal(data, s, rounds=rounds) for s in SIGNALS}, data.widths, base_macs, base_params)

    @classmethod
    def fit_signal(cls, data: SurrogateData, signal: str, *, rounds: int | None = None,
                   params: Mapping[str, Any] | None = None) -> Any:
        """The LightGBM booster of one signal (``acc`` as it is, ``kl`` and ``ce`` as ``log(x + EPS)``) on every
        record of ``data``; ``params`` override :attr:`PARAMS` (e.g. ``num_leaves``, for a study of capacity)."""
        import lightgbm as lgb

        if len(data) < 20:
            raise ValueError(f"a surrogate needs at least 20 measured plans, the data has {len(data)}")
        if signal not in SIGNALS:
            raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")
        base_macs, base_params = _base_counts(data)
        x = cls.features(data.keep, data.widths, data.macs / base_macs, data.params / base_params)
        y = data.signals[signal] if signal == "acc" else np.log(data.signals[signal] + cls.EPS)
        return lgb.train({**cls.PARAMS, **(params or {})}, lgb.Dataset(x, y, free_raw_data=True),
                         num_boost_round=rounds or cls.ROUNDS)

    def predict(self, keep: np.ndarray, macs: np.ndarray, params: np.ndarray) -> dict[str, np.ndarray]:
        """``{acc | kl | ce: (N,)}`` for ``(N, L)`` keep counts and their exact MACs and parameters."""
        x = self.features(keep, self.widths, np.asarray(macs) / self.base_macs, np.asarray(params) / self.base_params)
        return {s: self.decode(s, self.boosters[s].predict(x, num_threads=1)) for s in SIGNALS}

    @classmethod
    def decode(cls, signal: str, raw: np.ndarray) -> np.ndarray:
        """A booster's ``(N,)`` raw scores as the signal: accuracy clipped to [0, 100] %, KL and cross-entropy
        ``exp(raw) - EPS`` (at least 0)."""
        return np.clip(raw, 0.0, 100.0) if signal == "acc" else np.maximum(np.exp(raw) - cls.EPS, 0.0)

    def __getstate__(self) -> dict[str, Any]:  # pickle / deepcopy: the single-row predictors are made again
        return {**self.__dict__, "_rows": None}

    def predict_one(self, keep: np.ndarray, macs: int, params: int) -> dict[str, float]:
        """:meth:`predict` of ONE plan (``(L,)`` keep counts), value for value, through LightGBM's single-row
        fast path (about 20x less overhead per call than ``Booster.predict``): what an env step needs."""
        if self._rows is None:
            self._rows = {s: _RowPredictor(b, len(self.widths) + 2) for s, b in self.boosters.items()}
        row = np.empty(len(self.widths) + 2)  # :meth:`features` of one plan, the same float64 arithmetic
        np.divide(np.asarray(keep).reshape(-1), self.widths, out=row[:-2])
        row[-2], row[-1] = macs / self.base_macs, params / self.base_params
        rows = self._rows
        acc = rows["acc"](row)
        logs = np.exp(np.array([rows["kl"](row), rows["ce"](row)]))
        return {"acc": min(max(acc, 0.0), 100.0), "kl": max(float(logs[0]) - self.EPS, 0.0),
                "ce": max(float(logs[1]) - self.EPS, 0.0)}

    def digest(self) -> str:
        """SHA-256 (16 hex digits) of :meth:`to_text`: names the fitted trees (a result computed with the model
        depends on them)."""
        return hashlib.sha256(self.to_text().encode()).hexdigest()[:16]

    def to_text(self) -> str:
        """The model as text (LightGBM's model format per signal, in a JSON envelope): no pickle."""
        return json.dumps({"widths": self.widths.tolist(), "base_macs": self.base_macs, "base_params": self.base_params,
                           "boosters": {s: b.model_to_string() for s, b in self.boosters.items()}})

    @classmethod
    def from_text(cls, text: str) -> SurrogateModel:
        import lightgbm as lgb

        d = json.loads(text)
        return cls({s: lgb.Booster(model_str=m) for s, m in d["boosters"].items()}, np.asarray(d["widths"]),
                   d["base_macs"], d["base_params"])

    @classmethod
    def load_or_fit(cls, data: SurrogateData, *, cache: bool = True) -> SurrogateModel:
        """The model of ``data``: read from the cache, else fitted and cached (``<cache>/surrogate/``)."""
        import lightgbm as lgb

        key = hashlib.sha256(json.dumps([data.digest(), dict(cls.PARAMS), cls.ROUNDS, cls.EPS, lgb.__version__],
                                        sort_keys=True).encode()).hexdigest()[:16]
        path = cache_dir() / "surrogate" / f"model-{key}.json"
        if cache and path.is_file():
            try:
                return cls.from_text(path.read_text())
            except (ValueError, KeyError, lgb.basic.LightGBMError):
                path.unlink(missing_ok=True)  # a damaged cache entry: fitted again below
        model = cls.fit(data)
        if cache:
            from pruning_env.core.checkpoint import atomic_write_text

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, model.to_text())
        return model


class _RowPredictor:
    """One booster's raw prediction of one feature row through LightGBM's C API for single rows
    (``LGBM_BoosterPredictForMatSingleRowFast``: the predictor is configured once, not per call); the same
    trees and arithmetic as ``Booster.predict``. Falls back to ``Booster.predict`` where that API is missing."""

    def __init__(self, booster: Any, ncol: int) -> None:
        import ctypes

        self.booster, self.ncol = booster, ncol
        self._fast = None
        try:
            from lightgbm.basic import _LIB, _c_str, _safe_call

            handle = ctypes.c_void_p()
            _safe_call(_LIB.LGBM_BoosterPredictForMatSingleRowFastInit(
                booster._handle, ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(-1), ctypes.c_int(1),  # normal,
                ctypes.c_int32(ncol), _c_str("num_threads=1"), ctypes.byref(handle)))  # all trees, float64 rows
            # our own prototype of the same symbol (plain addresses in, no per-call ctypes conversions); lightgbm's
            # handle on the library is left as it is
            address = ctypes.cast(_LIB.LGBM_BoosterPredictForMatSingleRowFast, ctypes.c_void_p).value
            fast = ctypes.CFUNCTYPE(ctypes.c_int, *[ctypes.c_void_p] * 4)(address)
        except Exception:  # any failure (an old LightGBM, no such symbol): Booster.predict
            return
        self._handle, self._lib, self._safe_call = handle, _LIB, _safe_call
        self._fast, self._handle_value = fast, handle.value

    def __call__(self, row: np.ndarray) -> float:
        """The raw score of one ``(ncol,)`` float64 row."""
        row = np.ascontiguousarray(row, dtype=np.float64)
        if row.shape != (self.ncol,):
            raise ValueError(f"a feature row has {self.ncol} values, got shape {row.shape}")
        if self._fast is None:
            return float(self.booster.predict(row[None, :], num_threads=1)[0])
        out = np.empty(2, dtype=np.float64)  # per call (safe from several threads): [0] the score, [1] its length
        address = out.ctypes.data
        self._safe_call(self._fast(self._handle_value, row.ctypes.data, address + 8, address))
        return float(out[0])

    def __del__(self) -> None:
        if getattr(self, "_fast", None) is not None:
            with contextlib.suppress(Exception):  # at interpreter exit the library may be gone already
                self._lib.LGBM_FastConfigFree(self._handle)


def _base_counts(data: SurrogateData) -> tuple[float, float]:
    base = data.meta["base"]
    return float(base["macs"]), float(base["params"])


@dataclass(frozen=True)
class BatchParts:
    """A surrogate env's parts that stepping many of its episodes at once reuses
    (:meth:`SurrogatePruningEnv.batch_parts`).

    Attributes:
        widths: ``(L,)`` int64 filters of the unpruned layers, agent order.
        input_layer: per layer, the index of the prunable layer feeding it (-1: none).
        static: the observation's static columns (``{name: (L,) float32}``).
        feature_names: the observation's columns, in order.
        full: the unpruned plan.
        record: the meter's :meth:`~pruning_env.envs.measure.PlanMeter.record` (ratios and objective).
        base_signals: the unpruned network's signals.
        static_dsfp: the memoised DSFP order and statistics of every kept-filter set.
    """

    widths: np.ndarray
    input_layer: tuple[int, ...]
    static: Mapping[str, np.ndarray]
    feature_names: tuple[str, ...]
    full: PruningPlan
    record: Any
    base_signals: Signals
    static_dsfp: StaticDsfp


class SurrogateMeter(PlanMeter):
    """A :class:`~pruning_env.envs.measure.PlanMeter` whose signals of a pruned network are predicted."""

    def __init__(self, data: SurrogateData, model: SurrogateModel, layers: list[PrunableLayer], cfg: EnvConfig,
                 keep_count: Any, macs_model: MacsModel) -> None:  # no network, no data: only PlanMeter's plan fields
        self._plan_fields(layers, cfg, keep_count, macs_model)
        self.model, self._sens = model, data.sensitivities
        self._static = StaticDsfp(self._sens, self.names, cfg.scoring.direction, self.rates, keep_count)
        base = data.meta["base"]
        self._base = Signals(acc=float(base["acc"]), kl=float(base["kl"]), ce=float(base["ce"]))

    @property
    def base_signals(self) -> Signals:
        return self._base

    @property
    def static_dsfp(self) -> StaticDsfp:
        """The memoised DSFP order and statistics of the unpruned network's filters, per kept-filter set."""
        return self._static

    def sensitivities(self) -> dict[str, dict[str, torch.Tensor]]:
        return self._sens

    def measure(self, plan: PruningPlan) -> Measurement:
        t0 = time.perf_counter()
        counts = np.array([plan.keep_count(n) for n in self.names])
        macs, params = self.macs_model.predict_array(counts)
        if np.array_equal(counts, self.widths):
            signals = self._base
        else:
            signals = Signals(**self.model.predict_one(counts, macs, params))
        order, feats = self._static(plan)
        self.timings["surrogate"] = self.timings.get("surrogate", 0.0) + time.perf_counter() - t0
        return self.record(plan, signals.acc, signals.quality(self.cfg.proxy.proxy, self._base), int(macs),
                           int(params), signals=signals, scores=order, features=feats)


def shipped_data() -> dict[str, Path]:
    """``{env id: data file}`` of the surrogate data sets shipped with the package."""
    from pruning_env.envs.registry import NAMESPACE, VERSION

    return {f"{NAMESPACE}/{p.stem}-Surrogate-v{VERSION}": p for p in sorted(DATA_DIR.glob("*.npz"))}


def data_name(net: str, dataset: str, width: float) -> str:
    """The file stem of a network's surrogate data set, hence its env id ``pruning_env/<stem>-Surrogate-v1``:
    ``VGG16-CIFAR10-w0.25`` (the real env's id without its version, plus the width when it is not 1)."""
    from pruning_env.envs.registry import real_env_id

    stem = real_env_id(net, dataset).split("/", 1)[1].rsplit("-v", 1)[0]
    return stem if float(width) == 1.0 else f"{stem}-w{width:g}"


def data_command(net: str, dataset: str, width: float) -> str:
    """The command that measures a surrogate data set of a network (with its trained ``--checkpoint``)."""
    return (f"python -m benchmarks.surrogate_data --net {net} --dataset {dataset} --width {width:g} "
            f"--checkpoint YOUR.pt --out {data_name(net, dataset, width)}.npz (from a checkout of the repository)")


def find_data(net: str, dataset: str, width: float = 1.0) -> Path:
    """The shipped data set of ``net`` at ``width`` on ``dataset``; else ``ValueError`` naming the shipped ones
    and the command that makes one (then pass its file to :class:`SurrogatePruningEnv`)."""
    shipped = {}
    for env_id, path in shipped_data().items():
        meta = SurrogateData.load(path).meta
        shipped[env_id] = (meta["net"], meta["dataset"], float(meta["width"]))
        if shipped[env_id] == (net, dataset, float(width)):
            return path
    listed = ", ".join(f"{i} ({n} width {w:g} on {d})" for i, (n, d, w) in shipped.items()) or "none"
    raise ValueError(f"no surrogate data for {net} (width {width:g}) on {dataset}; shipped: {listed}. Measure it "
                     f"on the real env: {data_command(net, dataset, width)}, then "
                     "SurrogatePruningEnv('<that file>')")


class SurrogatePruningEnv(FilterPruningEnv):
    """The pruning env on a surrogate data set (see the module docstring for exactly where it differs).

    Args:
        data: a :class:`SurrogateData` or the path of its ``.npz``.
        config, max_cycles, render_mode, plan_info, overrides: as :class:`FilterPruningEnv`'s. Without
            ``config`` the settings default to the data's measurement settings (``dynamic=False`` among them); a
            ``config`` or override that contradicts them is an error.
        model: a fitted :class:`SurrogateModel` (default: the data's, from the cache or fitted now).
    """

    metadata: ClassVar[dict[str, Any]] = {**FilterPruningEnv.metadata, "name": "filter_pruning_surrogate_v1"}

    def __init__(self, data: SurrogateData | str | Path, config: EnvConfig | None = None, *,
                 max_cycles: int | None = None, render_mode: str | None = None, plan_info: bool = False,
                 model: SurrogateModel | None = None, **overrides: Any) -> None:
        from pruning_env.core.config import with_overrides

        data = data if isinstance(data, SurrogateData) else SurrogateData.load(data)
        # the data's measurement settings are the defaults; a given config must agree with them (checked below)
        base = config if config is not None else with_overrides(EnvConfig(), **data.meta["settings"])
        cfg = self._init_settings(base, max_cycles, render_mode, "cpu", plan_info, overrides)
        data.check_config(cfg)
        meta = data.meta
        self.surrogate_data = data
        self.splits = None
        self.input_shape = tuple(meta["input_shape"])
        self._base = None
        # an untrained network of the architecture: only its shapes are read (layers, MACs, static features)
        net = build(meta["net"], num_classes=int(meta["num_classes"]), in_channels=self.input_shape[0],
                    width=float(meta["width"])).eval()
        layers = prunable_layers(net, self.input_shape)
        if [layer.name for layer in layers] != data.layers or [lay.out_channels for lay in layers] != \
                data.widths.tolist():
            raise ValueError(f"the surrogate data's layers do not match {meta['net']} at width {meta['width']}")
        macs_model = MacsModel.from_model(net, self.input_shape, layers=layers)
        self.surrogate_model = model if model is not None else SurrogateModel.load_or_fit(data)
        self._init_problem(net, layers, lambda: SurrogateMeter(data, self.surrogate_model, layers, cfg,
                                                               self._keep_count, macs_model))

    def batch_parts(self) -> BatchParts:
        """What :class:`~pruning_env.envs.surrogate_vector.SurrogateVectorEnv` needs to step many episodes exactly
        as this env steps one: this env's own objects, read-only."""
        meter = self._meter
        return BatchParts(widths=np.asarray(self._orig, dtype=np.int64), input_layer=tuple(self._input_layer),
                          static=self._static, feature_names=tuple(self._feature_names), full=self._full_plan(),
                          record=meter.record, base_signals=meter.base_signals, static_dsfp=meter.static_dsfp)

    def _no_network(self, what: str) -> RuntimeError:
        real = self.surrogate_data.meta.get("real_env", "the real env")
        return RuntimeError(f"{what}: the surrogate env has no network (it predicts measurements); make {real} "
                            "with dynamic=False for that")

    @property
    def base_model(self) -> torch.nn.Module:
        raise self._no_network("base_model")

    @property
    def calibration_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise self._no_network("calibration_batch")

    def build_network(self, plan: PruningPlan, **_: Any) -> torch.nn.Module:
        raise self._no_network("build_network")

    def measure_network(self, model: torch.nn.Module) -> Measurement:
        raise self._no_network("measure_network")


def predict_measurements(env: SurrogatePruningEnv, keep: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """The surrogate's signals of many plans at once: ``{acc | kl | ce: (N,)}`` for ``(N, L)`` keep counts."""
    keep = np.asarray(keep, dtype=np.int64).reshape(-1, len(env.layer_names))
    macs, params = env.macs_model.predict_batch(keep)
    return env.surrogate_model.predict(keep, macs, params)
