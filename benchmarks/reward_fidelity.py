"""Reward fidelity: how well each cheap reward proxy ranks plans the way a fine-tune does.

For every MACs target (``--targets``, default 0.5 and 0.3) the benchmark builds ``--plans-per-target``
plans, each projected onto the target by the env's exact budget rule
(:meth:`~pruning_env.envs.env.FilterPruningEnv.plan_from_rates`, so each sits at or just below it),
with diverse per-layer profiles:

* ``uniform``: DSFP-uniform at the budget;
* ``front`` / ``back``: pruning concentrated in the early / late layers (rate ~ (1 - depth)^g or depth^g);
* ``macs`` / ``params``: rates in proportion to the layer's share of the MACs / parameters;
* ``search``: the best final plans a short QMIX search found on the env (``--search-plans``);
* ``random``: independent uniform random rates per layer (the rest).

**Truth** for each plan: VALIDATION accuracy (all validation images) after one fixed knowledge-
distillation fine-tune (``--truth-*`` flags: 2 epochs of the training split minus validation by
default), after a BN re-estimation on ``--truth-bn-batches`` batches. A second fine-tune seed on
``--noise-plans`` plans per target gives the truth's own noise floor.

**Proxies**, each timed from surgery to its signal (seconds per plan): accuracy / KL to the unpruned
network's outputs / cross-entropy after BN re-estimation on ``--bn-batches`` (2 and 16) batches, on
``--eval-sizes`` (1,000 and 5,000) validation images; and accuracy / KL on 1,000 images after ``n`` KD
steps for ``n`` in ``--kd-steps`` (50, 200), starting from the 2-batch network. ``env_seconds`` is what
the env's step costs today for the plan (its default proxy plus the DSFP scoring of the transition).

Report: Kendall tau and Spearman rho of each proxy with the truth per target, with bootstrap intervals
(plans resampled), seconds per plan and the cost relative to today's env measurement; written to
``reward_fidelity.md`` and ``reward_fidelity.json``. Every measured plan is cached in
``--work-dir`` (one file per target) after it finishes: ``--resume`` continues an interrupted run
(hours of CPU), targets may run side by side in two processes, and ``--report-only`` writes the
report of what is cached so far. A resume with more proxies (other ``--kd-steps``, ``--bn-batches`` or
``--eval-sizes``) measures only the proxies the cached plans lack; other settings refuse to resume.

    python -m benchmarks.reward_fidelity                          # VGG-16 w0.25, CIFAR-10 (cached baseline)
    python -m benchmarks.reward_fidelity --resume                 # continue an interrupted run
    python -m benchmarks.reward_fidelity --targets 0.3 --threads 1 &   # one process per target ...
    python -m benchmarks.reward_fidelity --targets 0.5 --threads 1     # ... then the report of both:
    python -m benchmarks.reward_fidelity --report-only
    python -m benchmarks.reward_fidelity --env pruning_env/Tiny-v1 --plans-per-target 6 --search-plans 12 \\
        --truth-epochs 1 --kd-steps 2 4 --out-dir /tmp/fid       # smoke, seconds
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

import agents
from benchmarks.common import (
    RESULTS,
    atomic_write_text,
    command_line,
    commit,
    hold_outputs,
    log,
    machine,
    mean_std,
    parse_config,
    write_markdown,
)
from pruning_env.cli.options import print_json
from pruning_env.core.checkpoint import run_lock
from pruning_env.core.config import flat_dict, nested, option, resolve_device, without_run_only
from pruning_env.core.data import load_splits
from pruning_env.engine.bn import BNRecalConfig
from pruning_env.engine.plan import PruningPlan
from pruning_env.envs.env import FilterPruningEnv
from pruning_env.envs.registry import TINY_ID, make_benchmark_env, make_tiny_env
from pruning_env.search import Search, SearchConfig, algorithm_env, algorithm_overrides
from pruning_env.training.finetune import FinetuneConfig, finetune
from pruning_env.training.proxy import RewardImages, kd_steps
from pruning_env.training.teacher import TeacherCache

SIGNALS = ("acc", "kl", "ce")


@dataclass
class FidelityConfig:
    """Every flag of benchmarks/reward_fidelity.py."""

    net: str = option("vgg16", "network (with --width, --dataset; ignored with --env)")
    width: float = option(0.25, "channel width of the cached baseline", min=0, min_exclusive=True)
    dataset: str = option("cifar10", "data set of the baseline")
    env: str | None = option(None, f"{TINY_ID} for a smoke run instead of --net")
    checkpoint: str | None = option(None, "trained baseline (default: the cached one of --net/--width, 30 epochs)")
    data_dir: str | None = option(None, "data directory (default: $PRUNING_ENV_DATA, else the cache)", run_only=True)
    targets: list[float] = option([0.5, 0.3], "MACs targets (ratios); plans are made for each", min=0, max=1,
                                  min_exclusive=True, run_only=True)
    plans_per_target: int = option(40, "plans per target (the profiles, search plans, then random ones)", min=4)
    search_plans: int = option(150, "budget of the QMIX search whose best plans join (0: no search)", min=0)
    search_top: int = option(4, "best distinct search plans taken per target", min=0)
    bn_batches: list[int] = option([2, 16], "BN re-estimation batches of the BN proxies", min=0)
    eval_sizes: list[int] = option([1000, 5000], "validation images of the BN proxies", min=1)
    kd_steps: list[int] = option([50, 200], "KD steps of the KD proxies (one run, measured at each)", min=1)
    kd_lr: float = option(0.01, "constant learning rate of the proxy KD steps", min=0, min_exclusive=True)
    truth: FinetuneConfig = nested(FinetuneConfig, "the truth's fine-tune (identical for every plan)",
                                   prefix="truth", default=FinetuneConfig(epochs=2))
    truth_bn_batches: int = option(20, "BN re-estimation batches before the truth's fine-tune", min=0)
    noise_plans: int = option(6, "plans per target fine-tuned with a second seed (truth noise)", min=0)
    bootstrap: int = option(2000, "bootstrap resamples of the rank correlations", min=100, run_only=True)
    seed: int = option(0, "seed of the random plans and the search", min=0)
    device: str = option("auto", "auto, cpu or cuda", run_only=True)
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)", run_only=True)
    out_dir: str = option(str(RESULTS), "folder of reward_fidelity.md / .json", run_only=True)
    work_dir: str = option("runs/reward_fidelity", "folder of the per-plan cache (for --resume)", run_only=True)
    resume: bool = option(False, "continue from the per-plan cache of a run with the same settings", run_only=True)
    report_only: bool = option(False, "measure nothing: report the plans cached in --work-dir so far", run_only=True)
    progress: bool = option(True, "show progress", run_only=True)


# which proxies are measured: a resumed run with other values measures only the proxies its plans lack
_PROXY_SET = ("bn_batches", "eval_sizes", "kd_steps")


def _settings_key(cfg: FidelityConfig) -> dict[str, Any]:
    return _comparable(without_run_only(FidelityConfig, flat_dict(cfg)))


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a cached plan's numbers depend on: all but the proxy set, whose names say what they measure
    (``bn2_kl@1000``, ``kd50_acc@1000``); the KD proxies start from the network of the fewest BN batches, so
    that number stays in. Also reads the keys of caches written before proxies could be added on resume."""
    out = {k: v for k, v in settings.items() if k not in _PROXY_SET}
    if "bn_batches" in settings:
        out["kd_start_bn_batches"] = min(settings["bn_batches"])
    return out


def proxy_names(cfg: FidelityConfig) -> list[str]:
    """The names of the proxies ``cfg`` measures for every plan."""
    small = min(cfg.eval_sizes)
    return ([f"bn{nb}_{s}@{size}" for nb in cfg.bn_batches for size in sorted(cfg.eval_sizes) for s in SIGNALS]
            + [f"kd{n}_{s}@{small}" for n in cfg.kd_steps for s in ("acc", "kl")])


# ----------------------------------------------------------------------------- plans


def _profiles(env: FilterPruningEnv) -> dict[str, np.ndarray]:
    depth = np.linspace(0.0, 1.0, len(env.layers))
    static = env.static_features
    prof = {"uniform": np.full(len(depth), 0.5)}
    for g in (0.5, 1.0, 2.0):
        prof[f"front{g:g}"] = 0.9 * (1.0 - depth) ** g
        prof[f"back{g:g}"] = 0.9 * depth ** g
    for key in ("macs", "params"):
        share = static[f"{key}_share"].astype(np.float64)
        prof[key] = 0.9 * share / share.max()
    return prof


def _search_plans(env_factory, cfg: FidelityConfig, target: float) -> list[tuple[str, PruningPlan]]:
    if cfg.search_plans == 0 or cfg.search_top == 0:
        return []
    env = env_factory(target)
    cls = agents.get_algorithm("qmix")
    search_cfg = SearchConfig(plans=cfg.search_plans)
    overrides = algorithm_overrides(cls, "qmix", search_cfg, env.config.episode_length)
    algo = agents.make_algorithm("qmix", algorithm_env(cls, env), seed=cfg.seed, device=str(env.device), **overrides)
    Search(algo, env, search_cfg, progress=cfg.progress, desc=f"qmix search (target {target})").run()
    finals = [m for m in env.measured_plans() if m.macs_ratio <= target + 1e-9]
    finals.sort(key=lambda m: -m.objective)
    out, seen = [], set()
    for m in finals:
        if m.plan.key() not in seen:
            seen.add(m.plan.key())
            out.append((f"search{len(out)}", m.plan))
        if len(out) == cfg.search_top:
            break
    return out


def make_plans(env_factory, cfg: FidelityConfig, target: float) -> list[tuple[str, PruningPlan]]:
    """The target's plans (name, plan), each at or just below ``target`` MACs, no plan twice."""
    env = env_factory(target)
    rng = np.random.default_rng([cfg.seed, round(target * 1000)])
    named = [(name, env.plan_from_rates(rates)) for name, rates in _profiles(env).items()]
    named += _search_plans(env_factory, cfg, target)
    tries = 0
    while len(named) < cfg.plans_per_target and tries < 50 * cfg.plans_per_target:
        tries += 1
        named.append((f"random{tries}", env.plan_from_rates(rng.uniform(0.0, 0.9, len(env.layers)))))
        keys = [p.key() for _, p in named]
        if len(set(keys)) < len(keys):
            named.pop()
    return named[: cfg.plans_per_target]


# ----------------------------------------------------------------------------- measurements


def _measure_proxies(env: FilterPruningEnv, plan: PruningPlan, cfg: FidelityConfig,
                     images: dict[int, RewardImages], teacher: TeacherCache,
                     want: set[str] | None = None) -> dict[str, dict[str, float]]:
    """``{proxy name: {"value", "seconds"}}`` for one plan: every proxy of ``cfg``, or those named in ``want``
    (proxies added to a cached plan on resume; each is timed as it would be alone).

    The KD proxies' teacher outputs come from ``teacher`` (every plan replays the same batches), so their
    seconds are those of a search whose env shares one cache across plans. The KD steps are seeded and run at a
    constant learning rate, so the network after ``n`` steps is the same in a run of any length."""
    want = set(proxy_names(cfg)) if want is None else want
    base, splits, dev = env.base_model, env.splits, env.device
    out: dict[str, dict[str, float]] = {}
    small = min(images)
    steps = [n for n in cfg.kd_steps if any(w.startswith(f"kd{n}_") for w in want)]
    kd_start = None
    for nb in cfg.bn_batches:
        if not (any(w.startswith(f"bn{nb}_") for w in want) or (steps and nb == min(cfg.bn_batches))):
            continue
        t0 = time.perf_counter()
        model = env.build_network(plan, bn=BNRecalConfig(bn_recal_batches=nb))
        t_ready = time.perf_counter() - t0
        for size, imgs in sorted(images.items()):
            t1 = time.perf_counter()
            sig = imgs.measure(model)
            dt = t_ready + time.perf_counter() - t1
            for s in SIGNALS:
                out[f"bn{nb}_{s}@{size}"] = {"value": getattr(sig, s), "seconds": dt}
        if nb == min(cfg.bn_batches):
            kd_start, kd_ready = model, t_ready
    if not steps:
        return {k: v for k, v in out.items() if k in want}
    assert kd_start is not None
    t_kd = time.perf_counter()

    def at(n: int) -> None:
        t1 = time.perf_counter()
        sig = images[small].measure(kd_start)
        dt = kd_ready + (t1 - t_kd) + (time.perf_counter() - t1)
        for s in ("acc", "kl"):
            out[f"kd{n}_{s}@{small}"] = {"value": getattr(sig, s), "seconds": dt}

    kd_steps(kd_start, base, splits, max(steps), lr=cfg.kd_lr, batch_size=128, seed=0, device=dev,
             checkpoints=tuple(steps), on_checkpoint=at, teacher_cache=teacher)
    return {k: v for k, v in out.items() if k in want}


def _truth(env: FilterPruningEnv, plan: PruningPlan, cfg: FidelityConfig, seed: int,
           teacher: TeacherCache) -> dict[str, float]:
    t0 = time.perf_counter()
    model = env.build_network(plan, bn=BNRecalConfig(bn_recal_batches=cfg.truth_bn_batches))
    ft = dataclasses.replace(cfg.truth, seed=seed, device=str(env.device), progress=cfg.progress)
    summary = finetune(model, env.splits, ft, teacher=env.base_model, teacher_cache=teacher)
    return {"val_acc": summary["history"][-1]["val_acc"] if summary["history"] else summary["val_acc"],
            "best_val_acc": summary["val_acc"], "seconds": time.perf_counter() - t0}


def _env_seconds(env: FilterPruningEnv, plan: PruningPlan) -> float:
    before = sum(env.timings.values())
    env.measure(plan)
    return sum(env.timings.values()) - before


# ----------------------------------------------------------------------------- statistics


def _rank_stats(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    tau = float(stats.kendalltau(x, y).statistic)
    rho = float(stats.spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    taus, rhos = [], []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), len(x))
        if len(set(x[idx].tolist())) < 2 or len(set(y[idx].tolist())) < 2:
            continue
        taus.append(stats.kendalltau(x[idx], y[idx]).statistic)
        rhos.append(stats.spearmanr(x[idx], y[idx]).statistic)
    lo_t, hi_t = np.nanpercentile(taus, [2.5, 97.5]) if taus else (float("nan"),) * 2
    lo_r, hi_r = np.nanpercentile(rhos, [2.5, 97.5]) if rhos else (float("nan"),) * 2
    return {"kendall_tau": tau, "kendall_tau_ci": [float(lo_t), float(hi_t)], "spearman": rho,
            "spearman_ci": [float(lo_r), float(hi_r)]}


def analyse(records: list[dict[str, Any]], cfg: FidelityConfig) -> dict[str, Any]:
    """Per proxy and target: rank correlations with the truth, seconds per plan, cost vs today's env."""
    proxies, noise, spread = [], [], []
    for target in cfg.targets:
        recs = [r for r in records if r["target"] == target and "truth" in r]
        if len(recs) < 3:
            continue
        truth = np.array([r["truth"]["0"]["val_acc"] for r in recs])
        # plans measured since the KD teacher's outputs are shared (TeacherCache, CPU) time the KD proxies and the
        # env step as an env with the cache runs them; older records computed the teacher for every plan
        timed = [r for r in recs if r.get("teacher_cache")] or recs
        env_s = float(np.mean([r["env_seconds"] for r in timed]))
        names = dict.fromkeys(n for r in recs for n in r["proxies"])  # in measuring order
        for name in names:
            has = [i for i, r in enumerate(recs) if name in r["proxies"]]
            if len(has) < 3:  # a proxy added on a resume that has reached too few plans yet
                continue
            vals = np.array([recs[i]["proxies"][name]["value"] for i in has])
            sign = -1.0 if name.split("_")[1].startswith(("kl", "ce")) else 1.0  # lower KL / CE = better
            clock = [r for r in timed if name in r["proxies"]] or [recs[i] for i in has]
            secs = float(np.mean([r["proxies"][name]["seconds"] for r in clock]))
            st = _rank_stats(sign * vals, truth[has], cfg.bootstrap, cfg.seed)
            proxies.append({"name": name, "target": target, **st, "seconds_per_plan": secs,
                            "cost_vs_env": secs / env_s if env_s > 0 else None, "plans": len(has)})
        pairs = [(r["truth"]["0"]["val_acc"], r["truth"]["1"]["val_acc"]) for r in recs if "1" in r["truth"]]
        if pairs:
            a, b = np.array(pairs).T
            noise.append({"target": target, "plans": len(pairs), "mean_abs_diff": float(np.mean(np.abs(a - b))),
                          "std_diff": mean_std([float(d) for d in a - b])[1],
                          "kendall_tau_seeds": float(stats.kendalltau(a, b).statistic) if len(pairs) > 2 else None})
        uni = [r["truth"]["0"]["val_acc"] for r in recs if r["name"] == "uniform"]
        best = max(recs, key=lambda r: r["truth"]["0"]["val_acc"])
        spread.append({"target": target, "plans": len(recs), "truth_min": float(truth.min()),
                       "truth_max": float(truth.max()), "uniform": uni[0] if uni else None,
                       "best_name": best["name"], "env_seconds_per_plan": env_s,
                       "macs_ratio_min": float(min(r["macs_ratio"] for r in recs)),
                       "macs_ratio_max": float(max(r["macs_ratio"] for r in recs))})
    return {"proxies": proxies, "noise": noise, "spread": spread}


# ----------------------------------------------------------------------------- report


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} %"


def write_report(result: dict[str, Any], out_dir: Path) -> None:
    lines = ["# Reward fidelity: which cheap signal ranks plans like a fine-tune", "",
             f"Command: `{result['command']}`  ", f"Commit: `{result['commit']}`  ", f"Machine: {result['machine']}  ",
             f"Truth: {result['truth']}  ", f"Env default proxy now: `{result['default']}`", ""]
    for sp in result["spread"]:
        t = sp["target"]
        lines += [f"## MACs target {t}", "",
                  f"{sp['plans']} plans, MACs ratios {sp['macs_ratio_min']:.4f}-{sp['macs_ratio_max']:.4f}; truth "
                  f"(validation accuracy after the fine-tune) {sp['truth_min']:.2f}-{sp['truth_max']:.2f} %, "
                  f"uniform {_pct(sp['uniform'])}, best "
                  f"`{sp['best_name']}`. Today's env measurement: {sp['env_seconds_per_plan']:.2f} s per plan.", "",
                  "| proxy | Kendall tau [95 % CI] | Spearman [95 % CI] | s / plan | cost vs env | tau per s |",
                  "|---|---|---|---|---|---|"]
        rows = sorted((p for p in result["proxies"] if p["target"] == t), key=lambda p: -p["kendall_tau"])
        for p in rows:
            ci, rci = p["kendall_tau_ci"], p["spearman_ci"]
            lines.append(f"| `{p['name']}` | {p['kendall_tau']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}] | "
                         f"{p['spearman']:.3f} [{rci[0]:.2f}, {rci[1]:.2f}] | {p['seconds_per_plan']:.2f} | "
                         f"{p['cost_vs_env']:.1f}x | {p['kendall_tau'] / max(p['seconds_per_plan'], 1e-9):.3f} |")
        for nz in (n for n in result["noise"] if n["target"] == t):
            lines += ["", f"Truth noise (second fine-tune seed on {nz['plans']} plans): mean |difference| "
                      f"{nz['mean_abs_diff']:.2f} points"
                      + (f", std {nz['std_diff']:.2f}" if nz["std_diff"] is not None else "")
                      + (f", Kendall tau between seeds {nz['kendall_tau_seeds']:.2f}"
                         if nz["kendall_tau_seeds"] is not None else "") + "."]
        lines.append("")
    if result.get("conclusion"):
        lines += ["## Conclusion", "", result["conclusion"], ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_markdown(out_dir / "reward_fidelity.md", "\n".join(lines))
    atomic_write_text(out_dir / "reward_fidelity.json", json.dumps(result, indent=1))


# ----------------------------------------------------------------------------- main


def _noise_subset(names: list[str], k: int) -> set[str]:
    """The plans whose truth gets a second fine-tune seed: ``k`` of them, evenly spaced in plan order."""
    if k == 0:
        return set()
    return set(names[:: max(1, len(names) // k)][:k])


class _TargetCache:
    """The measured plans of one target in ``<work-dir>/target-<t>.json`` (one file per target, so runs of
    different targets may go on side by side and a later run of several targets reads them all)."""

    def __init__(self, work: Path, target: float, key: dict[str, Any], resume: bool) -> None:
        self.path = self.file(work, target)
        self.key = key
        self.records: dict[str, dict[str, Any]] = {}
        self.plans: list | None = None
        if self.path.is_file():
            stored = json.loads(self.path.read_text())
            if not resume:
                raise ValueError(f"{self.path} exists from an earlier run: pass --resume to continue it (or "
                                 "--report-only), or delete it")
            had = _comparable(without_run_only(FidelityConfig, stored.get("settings", {})))
            if had != key:
                diff = sorted(k for k in key.keys() | had.keys() if had.get(k) != key.get(k))
                raise ValueError(f"--resume: {self.path} was made with other settings ({', '.join(diff)}); delete "
                                 "it or rerun with the same flags")
            self.records, self.plans = stored["records"], stored.get("plans")

    @staticmethod
    def file(work: Path, target: float) -> Path:
        """Where the plans of ``target`` are kept (a run locks it: runs of other targets may go on beside it)."""
        return work / f"target-{target:g}.json"

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"settings": self.key, "plans": self.plans,
                                                 "records": self.records}))


def run(cfg: FidelityConfig, argv: list[str] | None = None) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.env is not None and cfg.env != TINY_ID:
        raise ValueError(f"--env supports only {TINY_ID} (or use --net/--width)")
    work = Path(cfg.work_dir)
    key = _settings_key(cfg)
    caches = {t: _TargetCache(work, t, key, cfg.resume or cfg.report_only) for t in cfg.targets}
    splits = None if cfg.env else load_splits(cfg.dataset, cfg.data_dir)

    def env_factory(target: float) -> FilterPruningEnv:
        settings = dict(macs_target=target, cache_size=100_000)
        if cfg.env:
            return make_tiny_env(device=str(device), **settings)
        return make_benchmark_env(cfg.net, cfg.dataset, width=cfg.width, checkpoint=cfg.checkpoint, splits=splits,
                                  device=str(device), **settings)

    envs = {t: env_factory(t) for t in cfg.targets}
    first = envs[cfg.targets[0]]
    images = {n: RewardImages(first.base_model, first.splits.val, mean=first.splits.mean, std=first.splits.std,
                              limit=n, device=device) for n in cfg.eval_sizes}
    # every truth / KD proxy of a seed replays the same batches: each env's teacher runs once per batch
    teachers = {t: TeacherCache(e.base_model) for t, e in envs.items()}
    per_target: dict[float, list[tuple[str, PruningPlan]]] = {}
    for t, cache in caches.items():
        if cache.plans is None and not cfg.report_only:
            per_target[t] = make_plans(env_factory, cfg, t)
            cache.plans = [(n, p.to_dict()) for n, p in per_target[t]]
            cache.save()
        else:
            per_target[t] = [(n, PruningPlan.from_dict(d)) for n, d in (cache.plans or [])]
    todo: list[tuple[float, str, PruningPlan]] = []
    for i in range(cfg.plans_per_target):  # interleaved: a partial run covers every target alike
        todo += [(t, *per_target[t][i]) for t in cfg.targets if i < len(per_target[t])]
    noise_names = {t: _noise_subset([n for n, _ in per_target[t]], cfg.noise_plans) for t in cfg.targets}

    t_start = time.time()
    wanted = proxy_names(cfg)
    for i, (target, name, plan) in enumerate([] if cfg.report_only else todo):
        cache = caches[target]
        rid = plan.key()
        rec = cache.records.get(rid)
        seeds = ["0", "1"] if name in noise_names[target] else ["0"]
        missing = set(wanted) - set(rec["proxies"]) if rec is not None else set()
        if rec is not None and not missing and all(s in rec.get("truth", {}) for s in seeds):
            continue
        env = envs[target]
        if missing:  # proxies added since the plan was measured
            rec["proxies"].update(_measure_proxies(env, plan, cfg, images, teachers[target], want=missing))
        if rec is None:
            env_seconds = _env_seconds(env, plan)  # first: a cached plan would cost nothing
            rec = {"target": target, "name": name, "plan": plan.to_dict(),
                   "teacher_cache": env.device.type == "cpu",
                   "macs_ratio": env.measure(plan).macs_ratio, "env_seconds": env_seconds,
                   "proxies": _measure_proxies(env, plan, cfg, images, teachers[target]), "truth": {}}
        for s in seeds:
            if s not in rec["truth"]:
                rec["truth"][s] = _truth(env, plan, cfg, seed=int(s), teacher=teachers[target])
        cache.records[rid] = rec
        cache.save()
        if cfg.progress:
            bn_acc = rec["proxies"][f"bn{min(cfg.bn_batches)}_acc@{min(cfg.eval_sizes)}"]["value"]
            log(f"[{i + 1}/{len(todo)}] target {target} {name}: MACs {rec['macs_ratio']:.4f}  truth "
                f"{rec['truth']['0']['val_acc']:.2f} %  BN-proxy acc {bn_acc:.2f} %  ({time.time() - t_start:.0f} s)")
    records = [r for c in caches.values() for r in c.records.values()]
    result = {"command": command_line("reward_fidelity", argv), "commit": commit(), "machine": machine(),
              "seeds": {"plans_and_search": cfg.seed, "truth": [0, 1]}, "settings": key,
              "truth": (f"validation accuracy (all {len(first.splits.val)} validation images) after BN re-estimation "
                        f"on {cfg.truth_bn_batches} batches and {cfg.truth.epochs} epochs of KD fine-tuning "
                        f"(lr {cfg.truth.lr}, batch {cfg.truth.batch_size}) on the training split minus validation"),
              "default": _default_name(first), **analyse(records, cfg), "records": records}
    # the report is shared by the runs of other targets beside this one: written after any of them finishes writing it
    with run_lock(Path(cfg.out_dir) / "reward_fidelity.json", "--out-dir", file=True, wait=True):
        write_report(result, Path(cfg.out_dir))
    return result


def _default_name(env: FilterPruningEnv) -> str:
    c = env.config
    kd = f"kd{c.proxy.proxy_kd_steps}_" if c.proxy.proxy_kd_steps else f"bn{c.bn.bn_recal_batches}_"
    return f"{kd}{c.proxy.proxy}@{c.eval_size}"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(FidelityConfig, argv, "reward_fidelity", __doc__)
    caches = [("--work-dir", _TargetCache.file(Path(cfg.work_dir), t)) for t in cfg.targets]
    with hold_outputs("reward_fidelity", files=caches):
        return _main(cfg, argv)


def _main(cfg: FidelityConfig, argv: list[str] | None) -> int:
    try:
        result = run(cfg, argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_json({k: result[k] for k in ("default", "spread", "noise")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
