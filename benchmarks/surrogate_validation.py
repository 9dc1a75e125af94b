"""Validate a surrogate data set and its env against the real env: ``surrogate.md`` / ``surrogate.json``.

1. **Held-out plans.** A fixed random ``--heldout-fraction`` of the data's plans is left out of a fit; per MACs
   target, Kendall tau and R^2 of the predicted against the measured reward signal (``quality``: the env's rule
   for ``--proxy``, ``exp(-KL)`` by default) and accuracy. Also the plans that searches with seeds absent from the
   data visit on the real env (part 2), which the shipped model never saw. A learning curve (tau at shares of the
   training plans) shows how the error shrinks with more data, and other regressors (scikit-learn's histogram
   gradient boosting, when installed) are compared with LightGBM on the same split.
2. **Searches on both envs.** Every ``--algos`` method, ``--seeds`` (not the data's search seeds) x ``--plans``,
   per target, on the real env and on the surrogate env (same settings, same seeds). The methods are ranked by the
   best REAL objective they found: on the real env as measured, on the surrogate by measuring its best plan on the
   real env. Kendall tau between the two rankings, and the surrogate's predicted objective of its best plans
   against their real measurement (and the real objective's seed-to-seed spread).
3. **Speed.** Steps per second of both envs (random joint actions, new plans), measured side by side in one run.

Each search is written to ``--work-dir`` when done (``--resume`` continues).

    python -m benchmarks.surrogate_validation --data-dir ../shared/data     # VGG-16 w0.25: hours (real searches)
    python -m benchmarks.surrogate_validation --env pruning_env/Tiny-v1 \\
        --data pruning_env/envs/surrogate_data/Tiny.npz --plans 60 --out-dir /tmp/sv   # minutes
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import kendalltau

from benchmarks.common import RESULTS, command_line, commit, hold_outputs, machine, parse_config, write_markdown
from benchmarks.surrogate_data import SEARCH_ALGOS, default_out, real_env, run_search
from pruning_env.cli.options import print_json
from pruning_env.core import checkpoint as ckpt
from pruning_env.core.config import flat_dict, nested, option, without_run_only
from pruning_env.envs.config import EnvConfig
from pruning_env.envs.env import FilterPruningEnv
from pruning_env.envs.registry import NETWORK_NAMES, TINY_ID
from pruning_env.envs.surrogate import SurrogateData, SurrogateModel, SurrogatePruningEnv
from pruning_env.envs.surrogate_vector import SurrogateVectorEnv
from pruning_env.search import SearchConfig
from pruning_env.search.parallel import WorkersConfig, ray_session
from pruning_env.training.proxy import Signals


@dataclass
class ValidationConfig:
    """Every flag of ``python -m benchmarks.surrogate_validation``."""

    data: str | None = option(None, "the surrogate data set (.npz) to validate (default: the package's of --net, "
                              "--dataset, --width)")
    net: str = option("vgg16", "the real env's network (with --width, --dataset; ignored with --env)",
                      choices=sorted(NETWORK_NAMES))
    width: float = option(0.25, "channel width of the cached baseline", min=0, min_exclusive=True)
    dataset: str = option("cifar10", "data set of the baseline", choices=["cifar10", "cifar100"])
    env: str | None = option(None, f"{TINY_ID} instead of --net")
    checkpoint: str | None = option(None, "trained baseline (default: the cached one); must be the data's")
    data_dir: str | None = option(None, "data directory (default: $PRUNING_ENV_DATA, else the cache)", run_only=True)
    targets: list[float] = option([0.5, 0.3, 0.2], "MACs targets", min=0, max=1, min_exclusive=True)
    search_targets: list[float] | None = option(None, "MACs targets of part 2, the searches (default: --targets)",
                                                min=0, max=1, min_exclusive=True)
    algos: list[str] = option(list(SEARCH_ALGOS), "search methods compared on both envs")
    seeds: list[int] = option([2, 3, 4], "search seeds (not among the data's, so their plans are held out)")
    search: SearchConfig = nested(SearchConfig, "the budget of every search", prefix="search",
                                  default=SearchConfig(plans=300))
    problem: EnvConfig = nested(EnvConfig, "the real env (dynamic off, budget reward at each target)")
    parallel: WorkersConfig = nested(WorkersConfig, "parallel plan measurement of the real searches (--workers)")
    searches: bool = option(True, "part 2, the searches on both envs (hours; needs the data's baseline); "
                            "--no-searches: the held-out sets of the data and the speed only")
    heldout_fraction: float = option(0.1, "share of the data's plans left out of the held-out fit", min=0.01,
                                     max=0.5)
    capacity_leaves: list[int] = option([31, 127, 255], "leaves per tree of the capacity study (the model's "
                                        "default is 31): held-out tau of the reward's signal at each", min=2,
                                        run_only=True)
    speed_steps: int = option(200, "env steps per env in the speed measurement", min=10)
    vector_envs: int = option(256, "episodes the SurrogateVectorEnv of the speed measurement steps at once",
                              min=1, run_only=True)
    out_dir: str = option(str(RESULTS), "folder of surrogate.md / surrogate.json", run_only=True)
    work_dir: str = option("runs/surrogate_validation", "folder of the finished searches (for --resume)",
                           run_only=True)
    resume: bool = option(False, "reuse the searches in --work-dir (same settings)", run_only=True)
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)", run_only=True)
    progress: bool = option(True, "show progress", run_only=True)


def _scores(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    r2 = 1.0 - float(np.sum((true - pred) ** 2)) / max(float(np.sum((true - true.mean()) ** 2)), 1e-12)
    return {"kendall_tau": float(kendalltau(pred, true).statistic), "r2": r2, "plans": int(true.size)}


def _quality(signals: dict[str, Any], proxy: str, base: Signals) -> np.ndarray:
    """The reward's quality signal (:meth:`Signals.quality`, the run's ``--proxy``) of every plan."""
    return np.array([Signals(acc=float(a), kl=float(k), ce=float(c)).quality(proxy, base)
                     for a, k, c in zip(signals["acc"], signals["kl"], signals["ce"])])


def _booster_quality(booster: Any, data: SurrogateData, keep: np.ndarray, macs: np.ndarray, params: np.ndarray,
                     signals: dict[str, Any], proxy: str) -> np.ndarray:
    """The quality of plans by one signal's ``booster`` (a model fitted in a study), the other signals as given."""
    base = data.meta["base"]
    x = SurrogateModel.features(keep, data.widths, np.asarray(macs) / base["macs"], np.asarray(params) / base["params"])
    raw = booster.predict(x, num_threads=1)
    return _quality({**signals, proxy: SurrogateModel.decode(proxy, raw)}, proxy, _base(data))


def _base(data: SurrogateData) -> Signals:
    b = data.meta["base"]
    return Signals(acc=float(b["acc"]), kl=float(b["kl"]), ce=float(b["ce"]))


def heldout(data: SurrogateData, cfg: ValidationConfig) -> dict[str, Any]:
    """Part 1 on the data: per target, tau / R^2 of quality and accuracy on a random held-out share."""
    rng = np.random.default_rng(0)
    test = rng.random(len(data)) < cfg.heldout_fraction
    train, held = data.subset(~test), data.subset(test)
    model = SurrogateModel.fit(train)
    pred = model.predict(held.keep, held.macs, held.params)
    proxy, base = cfg.problem.proxy.proxy, _base(data)

    def quality(signals: dict[str, Any]) -> np.ndarray:
        return _quality(signals, proxy, base)

    def per_target(name: str, unseen: SurrogateData, p: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        q_pred, q_true = quality(p), quality(unseen.signals)
        return [{"target": t, "set": name, **_scores(q_pred[m], q_true[m]),
                 "acc": _scores(p["acc"][m], unseen.signals["acc"][m])}
                for t in cfg.targets if (m := np.isclose(unseen.target, t)).sum() >= 3]

    truth = quality(held.signals)
    rows = per_target("random held-out", held, pred)
    # whole searches left out: every plan one search seed of the data visited (all methods), as a new seed's are
    is_search = np.array([data.meta["sources"][i].startswith("search") for i in data.source])
    for s in sorted({int(x) for x in data.seed[is_search & (data.seed >= 0)]}):
        out_s = is_search & (data.seed == s)
        unseen = data.subset(out_s)
        p = SurrogateModel.fit(data.subset(~out_s)).predict(unseen.keep, unseen.macs, unseen.params)
        rows += per_target(f"search seed {s} left out of the fit", unseen, p)
    curve = []
    for share in (0.1, 0.25, 0.5, 1.0):
        sub = train.subset(np.random.default_rng(1).random(len(train)) < share) if share < 1 else train
        if len(sub) < 20:  # too few to fit
            continue
        p = SurrogateModel.fit(sub).predict(held.keep, held.macs, held.params)
        curve.append({"train_plans": len(sub), **_scores(quality(p), truth)})
    others = {"lightgbm": _scores(quality(pred), truth)}
    try:
        from sklearn.ensemble import HistGradientBoostingRegressor

        x_tr = SurrogateModel.features(train.keep, train.widths, train.macs / model.base_macs,
                                       train.params / model.base_params)
        x_te = SurrogateModel.features(held.keep, held.widths, held.macs / model.base_macs,
                                       held.params / model.base_params)
        hgb = HistGradientBoostingRegressor(max_iter=800, learning_rate=0.05, random_state=0)
        y = train.signals[proxy]  # the proxy's signal, on the scale the LightGBM model fits it
        hgb.fit(x_tr, y if proxy == "acc" else np.log(y + SurrogateModel.EPS))
        out = hgb.predict(x_te)
        out = out if proxy == "acc" else np.maximum(np.exp(out) - SurrogateModel.EPS, 0.0)
        others["sklearn_hist_gradient_boosting"] = _scores(quality({**pred, proxy: out}), truth)
    except ImportError:
        pass
    return {"rows": rows, "learning_curve": curve, "regressors": others, "capacity": capacity(data, cfg, test)}


def capacity(data: SurrogateData, cfg: ValidationConfig, test: np.ndarray) -> list[dict[str, Any]]:
    """The model of the reward's signal with more leaves per tree: tau on the random held-out plans (per target) and
    on every left-out search seed (mean and smallest). Larger trees fit plans near the data's better, not
    necessarily the plans of a new search."""
    proxy, base = cfg.problem.proxy.proxy, _base(data)

    def tau(train: SurrogateData, unseen: SurrogateData, leaves: int) -> dict[str, float]:
        booster = SurrogateModel.fit_signal(train, proxy, params={"num_leaves": leaves})
        pred = _booster_quality(booster, data, unseen.keep, unseen.macs, unseen.params, unseen.signals, proxy)
        truth = _quality(unseen.signals, proxy, base)
        return {f"{t:g}": float(kendalltau(pred[m], truth[m]).statistic) for t in cfg.targets
                if (m := np.isclose(unseen.target, t)).sum() >= 3}

    is_search = np.array([data.meta["sources"][i].startswith("search") for i in data.source])
    seeds = sorted({int(x) for x in data.seed[is_search & (data.seed >= 0)]})
    rows = []
    for leaves in cfg.capacity_leaves:
        left_out = [v for s in seeds for v in tau(data.subset(~(is_search & (data.seed == s))),
                                                  data.subset(is_search & (data.seed == s)), leaves).values()]
        rows.append({"num_leaves": leaves, "random_heldout": tau(data.subset(~test), data.subset(test), leaves),
                     "search_seed_left_out": {"mean": float(np.mean(left_out)) if left_out else None,
                                              "min": float(np.min(left_out)) if left_out else None,
                                              "sets": len(left_out)}})  # (seed, target) sets
    return rows


def _search_record(env: FilterPruningEnv, search: Any) -> dict[str, Any]:
    ms = [m for m in env.measured_plans() if m.plan is not None]
    return {"best_objective": search.best["objective"], "best_plan": search.best["plan"],
            "keep": [[m.plan.keep_count(n) for n in env.layer_names] for m in ms],
            "kl": [m.signals.kl for m in ms], "acc": [m.signals.acc for m in ms], "ce": [m.signals.ce for m in ms],
            "macs": [m.macs for m in ms],
            "params": [m.params for m in ms]}


def searches(cfg: ValidationConfig, data: SurrogateData, model: SurrogateModel, splits: Any) -> dict[str, Any]:
    """Part 2: every (target, method, seed) on both envs; the surrogate's best plan measured for real. A finished
    unit of --work-dir is read back; its surrogate side is run again when it ran on another model (its digest)."""
    from pruning_env.engine.plan import PruningPlan

    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    model_digest = model.digest()
    with ray_session(cfg.parallel):
        for t in _search_targets(cfg):
            for algo in cfg.algos:
                for seed in cfg.seeds:
                    path = work / f"{algo}-s{seed}-t{t:g}.json"
                    rec = json.loads(path.read_text()) if path.is_file() else None
                    if rec is not None and rec["surrogate"].get("model") == model_digest:
                        out[path.stem] = rec
                        continue
                    env = real_env(cfg, t, splits)
                    if rec is None:  # the real search (hours in all); it does not depend on the model
                        real = _search_record(env, run_search(env, algo, seed, cfg.search, cfg.parallel))
                        rec = {"target": t, "algo": algo, "seed": seed, "real": real}
                    # the surrogate's search: again whenever the model is not the one it ran on
                    sur_env = SurrogatePruningEnv(data, model=model, **_free_settings(cfg, t))
                    sur_search = run_search(sur_env, algo, seed, cfg.search, WorkersConfig())
                    plan = PruningPlan.from_dict(sur_search.best["plan"])
                    rec["surrogate"] = {"best_objective": sur_search.best["objective"],
                                        "best_real_objective": env.measure(plan).objective, "model": model_digest}
                    ckpt.atomic_write_text(path, json.dumps(rec))
                    out[path.stem] = rec
    return out


#: Settings that choose which searches run, or what is computed besides them, not how a search runs: a --resume
#: may change them (e.g. add --seeds), each finished search being one file of --work-dir.
_NOT_SEARCH_SETTINGS = ("algos", "seeds", "targets", "search_targets", "speed_steps", "heldout_fraction")


def _search_key(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a finished search of --work-dir was made under (what --resume must find unchanged)."""
    return {k: v for k, v in settings.items() if k not in _NOT_SEARCH_SETTINGS}


def _search_targets(cfg: ValidationConfig) -> list[float]:
    return list(cfg.targets if cfg.search_targets is None else cfg.search_targets)


def _free_settings(cfg: ValidationConfig, target: float) -> dict[str, Any]:
    """The real env's settings a surrogate env takes (its measurement settings are the data's)."""
    from pruning_env.envs.config import changed_settings
    from pruning_env.envs.surrogate import MEASURED_SETTINGS

    kept = {k: v for k, v in changed_settings(cfg.problem).items() if k not in MEASURED_SETTINGS}
    return {**kept, "macs_target": target, "reward": "budget", "exact_budget": True}


def ranking(runs: dict[str, Any], cfg: ValidationConfig) -> dict[str, Any]:
    """Methods ranked by their mean best real objective over seeds, on each env; tau between the rankings."""
    per = {}
    for side, key in (("real", lambda r: r["real"]["best_objective"]),
                      ("surrogate", lambda r: r["surrogate"]["best_real_objective"])):
        means = {a: float(np.mean([key(r) for r in runs.values() if r["algo"] == a])) for a in cfg.algos}
        per[side] = sorted(means, key=lambda a: -means[a])
        per[f"{side}_means"] = means
    real_rank = [per["real"].index(a) for a in cfg.algos]
    sur_rank = [per["surrogate"].index(a) for a in cfg.algos]
    per["kendall_tau"] = float(kendalltau(real_rank, sur_rank).statistic)
    gaps = [r["surrogate"]["best_objective"] - r["surrogate"]["best_real_objective"] for r in runs.values()]
    spread = [float(np.std([r["real"]["best_objective"] for r in runs.values() if r["algo"] == a
                            and r["target"] == t], ddof=1)) for a in cfg.algos for t in _search_targets(cfg)
              if sum(r["algo"] == a and r["target"] == t for r in runs.values()) > 1]
    per["predicted_minus_real_best"] = {"mean": float(np.mean(gaps)), "max_abs": float(np.max(np.abs(gaps)))}
    per["real_seed_spread"] = float(np.mean(spread)) if spread else None
    return per


def _new_search_plans(runs: dict[str, Any], data: SurrogateData, target: float) -> dict[str, list[Any]]:
    """The distinct plans the real searches at ``target`` measured that the data lacks, with their measurements."""
    known = {tuple(k) for k in data.keep.tolist()}
    cols: dict[str, list[Any]] = {c: [] for c in ("keep", "acc", "kl", "ce", "macs", "params")}
    for r in runs.values():
        if r["target"] != target:
            continue
        for j, k in enumerate(r["real"]["keep"]):
            if tuple(k) not in known:
                known.add(tuple(k))
                for c in cols:
                    cols[c].append(r["real"][c][j])
    return cols


def search_heldout(runs: dict[str, Any], data: SurrogateData, model: SurrogateModel,
                   targets: list[float], proxy: str) -> list[dict[str, Any]]:
    """Part 1 on the real searches' plans that the data lacks (seeds absent from it)."""
    rows = []
    for t in targets:
        cols = _new_search_plans(runs, data, t)
        if len(cols["keep"]) >= 3:
            pred = model.predict(np.array(cols["keep"]), np.array(cols["macs"]), np.array(cols["params"]))
            rows.append({"target": t, "set": "search seeds absent from the data",
                         **_scores(_quality(pred, proxy, _base(data)), _quality(cols, proxy, _base(data)))})
    return rows


TOP_FRACTIONS = (1.0, 0.5, 0.25, 0.1, 0.05, 0.01)


def _at_budget(runs: dict[str, Any], data: SurrogateData, target: float) -> dict[str, np.ndarray] | None:
    """:func:`_new_search_plans` that meet the budget (MACs at most the target), as arrays; None if under 3."""
    cols = _new_search_plans(runs, data, target)
    macs = np.array(cols["macs"], dtype=np.float64)
    within = np.flatnonzero(macs <= target * float(data.meta["base"]["macs"]))
    return {c: np.asarray(v)[within] for c, v in cols.items()} if len(within) >= 3 else None


#: Shares of the data that :func:`top_curve` fits on.
CURVE_FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def top_curve(runs: dict[str, Any], data: SurrogateData, targets: list[float], proxy: str) -> list[dict[str, Any]]:
    """How the error on the new searches' plans shrinks with more data: the model of the reward's signal fitted on
    random shares of the data (:data:`CURVE_FRACTIONS`, seed 0), its Kendall tau on their plans within the budget,
    on all of them and on the best 25 % and 10 % by measured quality."""
    base = _base(data)
    order = np.random.default_rng(0).permutation(len(data))
    rows = []
    for t in targets:
        plans = _at_budget(runs, data, t)
        if plans is None:
            continue
        q = _quality(plans, proxy, base)
        best = np.argsort(-q, kind="stable")
        for frac in CURVE_FRACTIONS:
            n = max(20, round(frac * len(data)))
            booster = SurrogateModel.fit_signal(data.subset(np.sort(order[:n])), proxy)
            q_pred = _booster_quality(booster, data, plans["keep"], plans["macs"], plans["params"], plans, proxy)
            taus = {}
            for share in (1.0, 0.25, 0.1):
                top = best[:max(3, round(share * len(q)))]
                taus[f"{share:g}"] = float(kendalltau(q_pred[top], q[top]).statistic)
            rows.append({"target": t, "train_plans": int(n), "kendall_tau": taus})
    return rows


def top_plans(runs: dict[str, Any], data: SurrogateData, model: SurrogateModel, targets: list[float],
              proxy: str) -> list[dict[str, Any]]:
    """Where the model fails: its fidelity among the BEST plans, which decide a search's best objective.

    Of the real searches' plans that the data lacks and that meet the budget (MACs at most the target), per
    :data:`TOP_FRACTIONS` share of the best by measured quality: Kendall tau of predicted against measured quality,
    the mean absolute error and the mean error (bias), and the share of the model's own top (as many plans, by
    predicted quality) that is in the measured top."""
    base = _base(data)
    rows = []
    for t in targets:
        plans = _at_budget(runs, data, t)
        if plans is None:
            continue
        q_pred = _quality(model.predict(plans["keep"], plans["macs"], plans["params"]), proxy, base)
        q = _quality(plans, proxy, base)
        best_measured, best_predicted = np.argsort(-q, kind="stable"), np.argsort(-q_pred, kind="stable")
        for frac in TOP_FRACTIONS:
            n = max(3, round(frac * len(q)))
            top = best_measured[:n]
            err = q_pred[top] - q[top]
            rows.append({"target": t, "top_fraction": frac, "plans": int(n),
                         "kendall_tau": float(kendalltau(q_pred[top], q[top]).statistic),
                         "mae": float(np.mean(np.abs(err))), "bias": float(np.mean(err)),
                         "quality_range": [float(q[top].min()), float(q[top].max())],
                         "overlap": len(set(best_predicted[:n].tolist()) & set(top.tolist())) / n})
    return rows


def speed(cfg: ValidationConfig, data: SurrogateData, model: SurrogateModel, splits: Any) -> dict[str, float]:
    """Steps per second of the real env, the surrogate env and the surrogate's vector env (``--vector-envs``
    episodes per call; one episode's step counts as one step), alternating blocks of random episodes in one run."""
    t = cfg.targets[0]
    surrogate = SurrogatePruningEnv(data, model=model, **_free_settings(cfg, t))
    envs = {"real": real_env(cfg, t, splits), "surrogate": surrogate,
            "surrogate_vector": SurrogateVectorEnv(SurrogatePruningEnv(data, model=model, **_free_settings(cfg, t)),
                                                   cfg.vector_envs)}
    seconds, steps = dict.fromkeys(envs, 0.0), dict.fromkeys(envs, 0)
    rng = np.random.default_rng(0)
    per_block = {"real": cfg.speed_steps // 4, "surrogate": 25 * cfg.speed_steps // 4,
                 "surrogate_vector": 250 * cfg.speed_steps // 4}
    for block in range(4):
        for name, env in envs.items():
            n = per_block[name]
            t0 = time.perf_counter()
            while steps[name] < (block + 1) * n:
                steps[name] += (_vector_episode if name == "surrogate_vector" else _episode)(
                    env, int(rng.integers(2**31)))
            seconds[name] += time.perf_counter() - t0
    return {name: steps[name] / seconds[name] for name in envs}


def _episode(env: FilterPruningEnv, seed: int) -> int:
    """One random episode of a PettingZoo env; its steps."""
    env.reset(seed=seed)
    steps = 0
    while env.agents:
        env.step({a: env.action_space(a).sample() for a in env.agents})
        steps += 1
    return steps


def _vector_episode(env: SurrogateVectorEnv, seed: int) -> int:
    """One random episode of every row of a vector env; its steps, each row's counted."""
    env.reset(seed=seed)
    for _ in range(env.env.config.episode_length):
        env.step(env.action_space.sample())
    return env.num_envs * env.env.config.episode_length


def run(cfg: ValidationConfig, argv: list[str] | None) -> dict[str, Any]:
    data = SurrogateData.load(cfg.data)
    overlap = sorted(set(cfg.seeds) & {int(s) for s in np.unique(data.seed) if s >= 0})
    if overlap:
        raise ValueError(f"--seeds {overlap} are search seeds of the data: their plans are not held out")
    key = _search_key(without_run_only(ValidationConfig, flat_dict(cfg)))
    key_file = Path(cfg.work_dir) / "settings.json"
    if key_file.is_file() and _search_key(json.loads(key_file.read_text())) != key and cfg.resume:
        raise ValueError(f"--work-dir {cfg.work_dir} holds searches of other settings: pass another --work-dir")
    if key_file.is_file() and not cfg.resume:
        raise ValueError(f"--work-dir {cfg.work_dir} holds an earlier run: pass --resume or another --work-dir")
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(key_file, json.dumps(key))
    splits = None
    if cfg.env is None:
        from pruning_env.core.data import load_splits

        splits = load_splits(cfg.dataset, cfg.data_dir)
    t0 = time.perf_counter()
    model = SurrogateModel.load_or_fit(data)
    probe = real_env(cfg, cfg.targets[0], splits)
    digest, data_digest = ckpt.weights_digest(probe.base_model), data.meta["provenance"].get("baseline_digest")
    if cfg.searches and digest != data_digest:
        raise ValueError(f"the real env's baseline (weights digest {digest}) is not the data's ({data_digest}): "
                         "pass the data's --checkpoint, or --no-searches for the held-out sets and the speed only")
    result: dict[str, Any] = {"benchmark": "surrogate_validation", "command": command_line("surrogate_validation",
                                                                                             argv),
                              "commit": commit(), "machine": machine(), "data": Path(cfg.data).name,
                              "data_plans": len(data), "proxy": cfg.problem.proxy.proxy,
                              "baseline_digest": digest, "data_baseline_digest": data_digest}
    result["steps_per_s"] = speed(cfg, data, model, splits)  # the weights do not change the cost of a step
    result["vector_envs"] = cfg.vector_envs
    part1 = heldout(data, cfg)
    runs = searches(cfg, data, model, splits) if cfg.searches else {}
    result["heldout"] = part1["rows"] + search_heldout(runs, data, model, _search_targets(cfg),
                                                              cfg.problem.proxy.proxy)
    result["top_plans"] = top_plans(runs, data, model, _search_targets(cfg), cfg.problem.proxy.proxy)
    result["top_curve"] = top_curve(runs, data, _search_targets(cfg), cfg.problem.proxy.proxy)
    result["learning_curve"], result["regressors"] = part1["learning_curve"], part1["regressors"]
    result["capacity"] = part1["capacity"]
    result["ranking"] = ranking(runs, cfg) if runs else None
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(out / "surrogate.json", json.dumps(result, indent=1))
    write_markdown(out / "surrogate.md", report(result))
    return result


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def report(r: dict[str, Any]) -> str:
    sp = r["steps_per_s"]
    rk = r["ranking"]
    md = [f"# Surrogate env validation ({r['data']}, {r['data_plans']} plans)", "",
          f"`{r['command']}` at commit {r['commit']}; {r['machine']}; {r['seconds']} s.", "",
          f"**Speed** (random episodes, side by side): real env {sp['real']:.2f} steps/s, surrogate "
          f"{sp['surrogate']:.1f} steps/s: **{sp['surrogate'] / sp['real']:.0f}x** (goal: 1,000x)"
          + (f"; its vector env (`SurrogateVectorEnv`, {r['vector_envs']} episodes per call, each episode's step "
             f"counted) {sp['surrogate_vector']:.0f} steps/s: **{sp['surrogate_vector'] / sp['real']:.0f}x**."
             if "surrogate_vector" in sp else "."), "",
          f"## Held-out plans: predicted against measured reward signal (quality of --proxy {r['proxy']})", "",
          "| MACs target | held-out set | plans | Kendall tau | R^2 | accuracy: Kendall tau |",
          "|---|---|---|---|---|---|"]
    md += [f"| {h['target']:g} | {h['set']} | {h['plans']} | {h['kendall_tau']:.3f} | {h['r2']:.3f} | "
           + (f"{h['acc']['kendall_tau']:.3f} |" if "acc" in h else "- |") for h in r["heldout"]]
    md += ["", "Goal: tau >= 0.9 at every target.", "", "Learning curve (random held-out set, all targets):", "",
           "| training plans | Kendall tau | R^2 |", "|---|---|---|"]
    md += [f"| {c['train_plans']} | {c['kendall_tau']:.3f} | {c['r2']:.3f} |" for c in r["learning_curve"]]
    md += ["", "Regressors on the same split: " + ", ".join(f"{k} tau {v['kendall_tau']:.3f} / R^2 {v['r2']:.3f}"
                                                         for k, v in r["regressors"].items()) + ".", ""]
    if r.get("capacity"):
        md += ["Capacity (leaves per tree of the reward signal's model; the env's model has "
               f"{SurrogateModel.PARAMS['num_leaves']}): Kendall tau on the random held-out plans per target, and over "
               "every left-out search seed and target", "",
               "| leaves | " + " | ".join(f"random held-out, {t}" for t in r["capacity"][0]["random_heldout"])
               + " | left-out search seeds: mean | smallest |",
               "|---|" + "---|" * (len(r["capacity"][0]["random_heldout"]) + 2)]
        md += [f"| {c['num_leaves']} | " + " | ".join(f"{v:.3f}" for v in c["random_heldout"].values())
               + f" | {_fmt(c['search_seed_left_out']['mean'])} | {_fmt(c['search_seed_left_out']['min'])} |"
               for c in r["capacity"]]
        md += [""]
    if r.get("top_plans"):
        md += ["## Where the model fails: the best plans", "",
               "The new real searches' plans within the budget, the best share of them by measured quality (what "
               "decides a search's best objective): predicted against measured quality.", "",
               "| MACs target | best share | plans | measured quality | Kendall tau | mean abs error | bias | "
               "model's top in the measured top |", "|---|---|---|---|---|---|---|---|"]
        md += [f"| {p['target']:g} | {100 * p['top_fraction']:g} % | {p['plans']} | {p['quality_range'][0]:.4f}-"
               f"{p['quality_range'][1]:.4f} | {p['kendall_tau']:.3f} | {p['mae']:.4f} | {p['bias']:+.4f} | "
               f"{100 * p['overlap']:.0f} % |" for p in r["top_plans"]]
        md += ["", "With more data (the model of the reward's signal fitted on a random share of the data): Kendall "
               "tau on the same plans, all of them and the best 25 % and 10 %", "",
               "| MACs target | training plans | all | best 25 % | best 10 % |", "|---|---|---|---|---|"]
        md += [f"| {c['target']:g} | {c['train_plans']} | {c['kendall_tau']['1']:.3f} | "
               f"{c['kendall_tau']['0.25']:.3f} | {c['kendall_tau']['0.1']:.3f} |" for c in r.get("top_curve", [])]
        md += [""]
    md += ["## The methods ranked on both envs (mean best REAL objective over seeds)", ""]
    if rk is None:
        other = r["baseline_digest"] != r["data_baseline_digest"]
        md += ["Not run (`--no-searches`)" + (f": the real env's baseline here (weights digest {r['baseline_digest']})"
               f" is not the data's ({r['data_baseline_digest']}), so its searches would measure another network; "
               "the speed above does not depend on the weights." if other else "."), ""]
        return "\n".join(md)
    md += [f"Real env: {' > '.join(rk['real'])}; surrogate: {' > '.join(rk['surrogate'])}; Kendall tau "
           f"{rk['kendall_tau']:.2f} (goal: same ranking, or tau >= 0.8).", "",
           f"Predicted minus real objective of the surrogate's best plans: mean "
           f"{rk['predicted_minus_real_best']['mean']:+.4f}, largest {rk['predicted_minus_real_best']['max_abs']:.4f};"
           f" the real best objective's seed-to-seed standard deviation: "
           + (f"{rk['real_seed_spread']:.4f}." if rk["real_seed_spread"] is not None else "-."), ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ValidationConfig, argv, "surrogate_validation", __doc__)
    if cfg.data is None:
        cfg.data = str(default_out(cfg))
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    outs = [("--out-dir", Path(cfg.out_dir) / "surrogate.json")]
    with hold_outputs("surrogate_validation", files=outs, folders=[("--work-dir", Path(cfg.work_dir))]):
        try:
            result = run(cfg, argv)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print_json({k: result[k] for k in ("steps_per_s", "heldout", "ranking")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
