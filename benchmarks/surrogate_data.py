"""Measure plans on the real env for a surrogate data set (:mod:`pruning_env.envs.surrogate`).

The real env is the benchmark problem with the surrogate's settings (``dynamic=False``, the DSFP criterion,
everything else the env's defaults). Plans come from these sources, for every MACs target (exact budgets):

* ``uniform``: one rate for every layer, projected onto the target;
* ``profile``: per-layer profiles (each layer alone at the largest rate, ramps over depth), projected likewise;
* ``allocation``: random per-layer rates (uniform in [0, max rate]), projected likewise;
* ``search:<algo>``: every plan (intermediate steps included) that each search method visits in
  ``--search-plans``-plan searches, for every seed of ``--search-seeds`` (other seeds stay out of the data, for
  held-out validation);

then ``random`` searches with further seeds until ``--plans`` distinct plans are measured. A plan measured twice
(by two sources) is recorded once, under its first source.

Each unit (one source at one target, or one search) is written to ``--work-dir`` when done: an interrupted run
continues with ``--resume`` (same settings). ``--workers N`` measures the searches' plans on Ray workers.

    python -m benchmarks.surrogate_data --data-dir ../shared/data     # VGG-16 w0.25, CIFAR-10, 20,000+ plans
    python -m benchmarks.surrogate_data --env pruning_env/Tiny-v1 --plans 1500 --search-plans 60 \\
        --out pruning_env/envs/surrogate_data/Tiny.npz                  # the shipped Tiny data set, a minute
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import agents
import pruning_env
from benchmarks.common import command_line, commit, hold_outputs, machine, parse_config
from pruning_env.cli.options import print_json
from pruning_env.core import checkpoint as ckpt
from pruning_env.core.config import flat_dict, nested, option, seed_everything, without_run_only
from pruning_env.envs.config import changed_settings
from pruning_env.envs.env import FilterPruningEnv
from pruning_env.envs.measure import Measurement
from pruning_env.envs.registry import NETWORK_NAMES, TINY_ID, make_benchmark_env, real_env_id
from pruning_env.envs.surrogate import DATA_DIR, MEASURED_SETTINGS, SIGNALS, SurrogateData, data_name
from pruning_env.search import Search, SearchConfig, algorithm_env, algorithm_overrides
from pruning_env.search.parallel import WorkersConfig, ray_session, scale_out

SEARCH_ALGOS = ["qmix", "vdn", "iql", "amc", "random"]


@dataclass
class SurrogateDataConfig:
    """Every flag of ``python -m benchmarks.surrogate_data``."""

    net: str = option("vgg16", "network (with --width, --dataset; ignored with --env)", choices=sorted(NETWORK_NAMES))
    width: float = option(0.25, "channel width of the cached baseline", min=0, min_exclusive=True)
    dataset: str = option("cifar10", "data set of the baseline", choices=["cifar10", "cifar100"])
    env: str | None = option(None, f"{TINY_ID} instead of --net (the shipped Tiny data set)")
    checkpoint: str | None = option(None, "trained baseline (default: the cached one of --net/--width, 30 epochs)")
    data_dir: str | None = option(None, "data directory (default: $PRUNING_ENV_DATA, else the cache)", run_only=True)
    targets: list[float] = option([0.5, 0.3, 0.2], "MACs targets (exact budgets) the plans are made for", min=0,
                                  max=1, min_exclusive=True)
    plans: int = option(20000, "distinct plans to measure in all (random searches fill up to it; a larger value "
                        "continues a finished run with --resume)", min=20, run_only=True)
    allocations: int = option(1000, "random per-layer allocations per target", min=0)
    search_algos: list[str] = option(list(SEARCH_ALGOS), "search methods whose visited plans are recorded")
    search_seeds: list[int] = option([0, 1], "seeds of those searches (others stay out, for held-out validation)")
    search: SearchConfig = nested(SearchConfig, "the budget of every recorded search", prefix="search",
                                  default=SearchConfig(plans=300))
    problem: pruning_env.EnvConfig = nested(pruning_env.EnvConfig, "the real env (here dynamic is off, and the reward "
                                            "is budget with an exact budget at each of --targets)")
    parallel: WorkersConfig = nested(WorkersConfig, "parallel plan measurement on Ray (--workers)")
    seed: int = option(0, "seed of the random allocations (the fill-up searches use seeds 1000+)", min=0)
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)", run_only=True)
    out: str | None = option(None, "the data set file to write (.npz; default: the package's "
                             "surrogate_data/<data_name>.npz, e.g. VGG16-CIFAR10-w0.25.npz)", run_only=True)
    work_dir: str = option("runs/surrogate_data", "folder of the finished units (for --resume)", run_only=True)
    resume: bool = option(False, "continue the units in --work-dir (same settings)", run_only=True)
    finished_only: bool = option(False, "write --out from the units finished in --work-dir, measuring nothing "
                                 "(e.g. of an interrupted run)", run_only=True)
    progress: bool = option(True, "show progress", run_only=True)


def _check(cfg: SurrogateDataConfig) -> None:
    unknown = [a for a in cfg.search_algos if a not in agents.list_algorithms()]
    if unknown:
        raise ValueError(f"--search-algos: unknown {unknown}; registered: {', '.join(agents.list_algorithms())}")
    if cfg.problem.scoring.criterion != "dsfp" or cfg.problem.kl_per_step is not None:
        raise ValueError("a surrogate env exists for the DSFP criterion with static sensitivities only: leave "
                         "--criterion dsfp and --kl-per-step unset")
    if cfg.env is not None and cfg.env != TINY_ID:
        raise ValueError(f"--env must be {TINY_ID} (or use --net / --width / --dataset)")


def real_env(cfg: Any, target: float, splits: Any, cache_size: int = 100_000) -> FilterPruningEnv:
    """A fresh real env of the surrogate's settings at MACs ``target`` (``cfg``: the problem fields of
    :class:`SurrogateDataConfig`: ``net``, ``dataset``, ``width``, ``env``, ``checkpoint``, ``data_dir``,
    ``problem``)."""
    settings = {**changed_settings(cfg.problem), "dynamic": False, "macs_target": target, "reward": "budget",
                "exact_budget": True, "cache_size": cache_size}
    if cfg.env == TINY_ID:
        return pruning_env.make(TINY_ID, **settings)
    return make_benchmark_env(cfg.net, cfg.dataset, width=cfg.width, checkpoint=cfg.checkpoint, splits=splits,
                              data_dir=cfg.data_dir, **settings)


def run_search(env: FilterPruningEnv, algo_name: str, seed: int, search_cfg: SearchConfig,
               parallel: WorkersConfig) -> Search:
    """One search of ``algo_name`` with ``seed`` on ``env``, run to its budget (plans measured on Ray workers
    with ``parallel.workers > 1``)."""
    seed_everything(seed)
    cls = agents.get_algorithm(algo_name)
    overrides = algorithm_overrides(cls, algo_name, search_cfg, env.config.episode_length)
    algo = agents.make_algorithm(algo_name, algorithm_env(cls, env), seed=seed, device="cpu", **overrides)
    search = Search(algo, env, search_cfg, progress=False, desc=f"{algo_name} seed {seed}")
    evaluator = scale_out(search, parallel)
    try:
        search.run()
    finally:
        if evaluator is not None:
            evaluator.close()
    return search


def _units(cfg: SurrogateDataConfig) -> list[dict[str, Any]]:
    """The units in the order they run: every target's uniform, profile and allocation units, then the searches
    seed by seed, each over every method and target (a partial run covers every target and method)."""
    units = []
    for t in cfg.targets:
        units += [{"name": f"uniform@{t:g}", "kind": "uniform", "target": t},
                  {"name": f"profile@{t:g}", "kind": "profile", "target": t}]
        if cfg.allocations:
            units.append({"name": f"allocation@{t:g}", "kind": "allocation", "target": t})
    units += [{"name": f"search:{a}:s{s}@{t:g}", "kind": "search", "algo": a, "seed": s, "target": t}
              for s in cfg.search_seeds for a in cfg.search_algos for t in cfg.targets]
    return units


def _rates(env: FilterPruningEnv, kind: str, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The per-layer rate proposals of a non-search unit (projected onto the budget by ``plan_from_rates``)."""
    top, layers = float(max(env.config.rates)), len(env.layer_names)
    if kind == "uniform":
        return [np.full(layers, top / 2)]
    if kind == "profile":
        depth = np.linspace(0.0, 1.0, layers)
        alone = [np.where(np.arange(layers) == i, top, 0.0) for i in range(layers)]
        ramps = [np.clip(top * (a + b * depth), 0.0, top) for a, b in ((0.1, 0.8), (0.9, -0.8), (0.3, 0.4),
                                                                         (0.7, -0.4), (0.0, 1.0), (1.0, -1.0))]
        return alone + ramps
    return [rng.uniform(0.0, top, size=layers) for _ in range(n)]


def _run_unit(cfg: SurrogateDataConfig, unit: dict[str, Any], env: FilterPruningEnv) -> list[Measurement]:
    """The measurements of one unit on a fresh ``env`` (its cache holds only this unit's plans)."""
    if unit["kind"] != "search":
        rng = np.random.default_rng([cfg.seed, round(unit["target"] * 1000)])
        for rates in _rates(env, unit["kind"], cfg.allocations, rng):
            env.measure(env.plan_from_rates(np.minimum(rates, 0.999)))
    else:
        run_search(env, unit["algo"], unit["seed"], cfg.search, cfg.parallel)
    return [m for m in env.measured_plans() if m.plan is not None]


def records(ms: list[Measurement], layers: list[str]) -> dict[str, np.ndarray]:
    """``keep`` ``(N, L)``, the signals, ``macs`` and ``params`` of measurements (the data set's columns)."""
    keep = np.array([[m.plan.keep_count(n) for n in layers] for m in ms], dtype=np.int64)
    return {"keep": keep.reshape(-1, len(layers)),
            **{s: np.array([getattr(m.signals, s) for m in ms], dtype=np.float64) for s in SIGNALS},
            "macs": np.array([m.macs for m in ms], dtype=np.int64), "params": np.array([m.params for m in ms],
                                                                                     dtype=np.int64)}


def run(cfg: SurrogateDataConfig, argv: list[str] | None) -> dict[str, Any]:
    _check(cfg)
    work = Path(cfg.work_dir)
    settings = without_run_only(SurrogateDataConfig, flat_dict(cfg))
    key_file = work / "settings.json"
    if work.exists() and any(work.glob("*.npz")):
        if not (cfg.resume or cfg.finished_only):
            raise ValueError(f"--work-dir {work} holds units of an earlier run: pass --resume to continue it, or "
                             "another --work-dir")
        old = json.loads(key_file.read_text()) if key_file.is_file() else None
        if old != settings:
            diff = sorted(k for k in set(settings) | set(old or {}) if (old or {}).get(k) != settings.get(k))
            raise ValueError(f"--work-dir {work} holds units of other settings ({', '.join(diff)}): pass another "
                             "--work-dir")
    elif cfg.finished_only:
        raise ValueError(f"--finished-only: --work-dir {work} holds no finished unit")
    work.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(key_file, json.dumps(settings, indent=1))
    splits = None
    if cfg.env is None:
        from pruning_env.core.data import load_splits

        splits = load_splits(cfg.dataset, cfg.data_dir)
    t0 = time.perf_counter()
    first = real_env(cfg, cfg.targets[0], splits)
    layers, base = first.layer_names, first.measure(first.plan)
    units = _units(cfg)
    seen: set[tuple[int, ...]] = set()
    bar = tqdm(total=cfg.plans, desc="surrogate data", unit="plan", disable=not cfg.progress, file=sys.stderr)
    fill_seed = 1000
    with ray_session(cfg.parallel):
        i = 0
        while i < len(units) or len(seen) < cfg.plans:
            if i >= len(units):  # fill up with random searches of new seeds
                t = cfg.targets[fill_seed % len(cfg.targets)]
                units.append({"name": f"search:random:s{fill_seed}@{t:g}", "kind": "search", "algo": "random",
                              "seed": fill_seed, "target": t, "fill": True})
                fill_seed += 1
            unit = units[i]
            path = work / (unit["name"].replace(":", "_").replace("@", "_at_") + ".npz")
            if not path.is_file() and cfg.finished_only:
                units.pop(i)
                if unit.get("fill"):  # the fill-up searches run in seed order: none further is finished
                    break
                continue
            if not path.is_file():
                rec = records(_run_unit(cfg, unit, real_env(cfg, unit["target"], splits)), layers)
                tmp = path.with_name(path.name + ".tmp.npz")
                np.savez_compressed(tmp, **rec)
                tmp.replace(path)
            with np.load(path, allow_pickle=False) as z:
                unit["records"] = {k: z[k] for k in z.files}
            new = {tuple(k) for k in unit["records"]["keep"].tolist()} - seen
            seen |= new
            bar.update(min(len(new), max(0, cfg.plans - bar.n)))
            i += 1
    bar.close()
    if not units:
        raise ValueError(f"--work-dir {work} holds no finished unit of these settings")
    data = _merge(cfg, units, layers, first, base, argv, time.perf_counter() - t0)
    data.save(cfg.out)
    return {"out": cfg.out, "plans": len(data), "units": len(units), "layers": len(layers)}


def _merge(cfg: SurrogateDataConfig, units: list[dict[str, Any]], layers: list[str], env: FilterPruningEnv,
           base: Measurement, argv: list[str] | None, seconds: float) -> SurrogateData:
    """One record per distinct plan (its first unit's), with the data set's metadata and provenance."""
    sources = sorted({u["name"].split("@")[0].split(":s")[0] for u in units})
    rows: dict[tuple[int, ...], tuple[int, dict[str, Any], int]] = {}
    for u in units:
        src = sources.index(u["name"].split("@")[0].split(":s")[0])
        rec = u["records"]
        for j, k in enumerate(map(tuple, rec["keep"].tolist())):
            if k not in rows:
                rows[k] = (src, u, j)
    keys = list(rows)
    pick = lambda field: np.array([rows[k][1]["records"][field][rows[k][2]] for k in keys])
    real = TINY_ID if cfg.env else f"{real_env_id(cfg.net, cfg.dataset)} (width {cfg.width:g}"
    real = real if cfg.env else real + (f", checkpoint {Path(cfg.checkpoint).name})" if cfg.checkpoint else ")")
    flat = flat_dict(env.config)
    meta = {"net": "tiny" if cfg.env else cfg.net, "width": 1.0 if cfg.env else cfg.width,
            "dataset": "synthetic" if cfg.env else cfg.dataset, "num_classes": int(env.splits.num_classes),
            "input_shape": list(env.input_shape), "layers": layers,
            "widths": [int(env.plan.keep_count(n)) for n in layers],
            "settings": {k: flat[k] for k in MEASURED_SETTINGS}, "real_env": real,
            "base": {"acc": base.signals.acc, "kl": base.signals.kl, "ce": base.signals.ce, "macs": env.base_macs,
                     "params": env.base_params},
            "sources": sources, "provenance": {
                "command": command_line("surrogate_data", argv), "commit": commit(), "machine": machine(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": round(seconds, 1),
                "checkpoint": Path(cfg.checkpoint).name if cfg.checkpoint else "cached baseline",
                "baseline_digest": ckpt.weights_digest(env.base_model)}}
    return SurrogateData(meta=meta, keep=pick("keep").reshape(-1, len(layers)),
                         signals={s: pick(s).astype(np.float64) for s in SIGNALS}, macs=pick("macs"),
                         params=pick("params"), source=np.array([rows[k][0] for k in keys]),
                         seed=np.array([rows[k][1].get("seed", -1) for k in keys]),
                         target=np.array([rows[k][1]["target"] for k in keys]),
                         sensitivities=env.base_sensitivities)


def default_out(cfg: Any) -> Path:
    """The package's data file of ``cfg``'s network (``--env``: ``Tiny.npz``): what the registry ships."""
    return DATA_DIR / ("Tiny.npz" if cfg.env else f"{data_name(cfg.net, cfg.dataset, cfg.width)}.npz")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(SurrogateDataConfig, argv, "surrogate_data", __doc__)
    if cfg.out is None:
        cfg.out = str(default_out(cfg))
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    with hold_outputs("surrogate_data", files=[("--out", Path(cfg.out))], folders=[("--work-dir", Path(cfg.work_dir))]):
        try:
            result = run(cfg, argv)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
