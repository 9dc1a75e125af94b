"""Plans per second on Ray workers, the Ray path's per-plan overhead, and a cost model for K machines.

What it measures, on one problem (default VGG-16 width 0.25 on the real CIFAR-10, its trained baseline):

* **bare**: ``--plans`` distinct random plans measured in this process (``FilterPruningEnv.measure``: surgery,
  BN re-estimation, evaluation, next-step scores) with all ``--cores`` torch threads;
* **Ray, N workers** for each N of ``--workers``: the same plans through
  :class:`pruning_env.search.parallel.PlanEvaluator` (N actors, ``cores // N`` threads each so the cores are not
  oversubscribed; their start-up, an env replica each, is timed apart), plus 1 worker at the fewest threads any N
  gets. Plans/s and two speed-ups: over the best single worker (all the cores' threads) and over 1 worker with the
  same threads each (the scaling that carries over to more cores and machines);
* **overhead** of the Ray path per plan: (wall time per plan x N - measuring time inside the workers per plan)
  / measuring time per plan, i.e. serialisation, transfer and scheduling as a share of a plan's time;
* **learner**: the serial part of a search, the seconds per training episode a QMIX learner spends outside plan
  measurement (acting and updates; measured on the same env for ``--learner-episodes`` episodes);
* **cost model** for K machines of ``--cores`` cores (Amdahl): a search of P plans in E = P / T episodes takes
  ``P * t_plan / W + P * t_overhead + E * t_learn`` with W = min(K * cores / threads, lookahead) workers busy.

Writes ``scale_out.md`` (table, cost model, the conditions, the plot ``scale_out.png``) and ``scale_out.json``
to ``--out-dir``; ``--resume`` reuses the rows of ``scale_out.json`` measured with the same settings.

    python -m benchmarks.scale_out                              # VGG-16 w0.25, CIFAR-10, 1 and 2 workers
    python -m benchmarks.scale_out --checkpoint base.pt --plans 40
    python -m benchmarks.scale_out --smoke --out-dir /tmp/so    # Tiny-v1, seconds (what the test runs)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    atomic_write_text,
    command_line,
    commit,
    hold_outputs,
    log,
    machine,
    parse_config,
    parse_net,
    write_markdown,
)
from pruning_env.cli.options import print_json
from pruning_env.core.config import check_settings, flat_dict, option, without_run_only
from pruning_env.engine.plan import PruningPlan
from pruning_env.envs.env import FilterPruningEnv
from pruning_env.envs.plans import uniform_plan
from pruning_env.envs.registry import make_benchmark_env, make_tiny_env
from pruning_env.search.parallel import PlanEvaluator, WorkersConfig, ray_session, require_ray
from pruning_env.training.train import default_checkpoint_path

__all__ = ["ScaleOutConfig", "cost_model", "main", "random_plans"]

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ScaleOutConfig:
    """Every flag of ``python -m benchmarks.scale_out`` (the command line is generated from these fields)."""

    net: str = option("vgg16-0.25", "tiny (Tiny-v1) or <net>-<width> on CIFAR-10")
    checkpoint: str | None = option(None, "trained baseline (default: the cached <net>-cifar10-w<width>-e30-s0.pt)")
    data_dir: str | None = option(None, "data directory (default: $PRUNING_ENV_DATA, else the cache)", run_only=True)
    plans: int = option(24, "distinct random plans measured per setting (the same plans for every setting)", min=1)
    workers: tuple[int, ...] = option((1, 2), "numbers of Ray workers to time", min=1)
    cores: int = option(os.cpu_count() or 1, "cores of this machine (and of each machine of the cost model)", min=1)
    ray_address: str | None = option(None, "join this Ray cluster (auto, host:port) instead of a local Ray",
                                     run_only=True)
    learner_episodes: int = option(4, "QMIX episodes timed for the learner's serial part (0: skip)", min=0)
    machines: tuple[int, ...] = option((1, 2, 4, 8, 16, 32), "cluster sizes K of the cost model", min=1, run_only=True)
    search_plans: int = option(1200, "plans of the modelled search (the cpu preset's budget)", min=1, run_only=True)
    lookahead: int = option(64, "training episodes measured ahead per batch in the modelled search", min=1,
                            run_only=True)
    seed: int = option(0, "seed of the random plans", min=0)
    smoke: bool = option(False, "Tiny-v1, 4 plans, 1 learner episode: seconds, for the tests")
    out_dir: str = option(str(ROOT / "benchmarks" / "results"), "folder of scale_out.md, .json and .png", run_only=True)
    resume: bool = option(False, "reuse the rows of scale_out.json measured with the same settings", run_only=True)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.smoke:
            self.net, self.plans, self.learner_episodes = "tiny", min(self.plans, 4), min(self.learner_episodes, 1)
        if self.net != "tiny":
            parse_net(self.net, "-")
        WorkersConfig(workers=max(2, *self.workers), ray_address=self.ray_address)  # checks the address


def _env(cfg: ScaleOutConfig) -> tuple[FilterPruningEnv, str]:
    if cfg.net == "tiny":
        return make_tiny_env(), "Tiny-v1 (synthetic data)"
    net, width = parse_net(cfg.net, "-")
    path = Path(cfg.checkpoint) if cfg.checkpoint else default_checkpoint_path(net, "cifar10", width, 30)
    if not path.is_file():
        raise ValueError(f"no trained baseline at {path}; pass --checkpoint or train it (python -m pruning_env.train "
                         f"--net {net} --width {width:g} --epochs 30)")
    env = make_benchmark_env(net, "cifar10", width=width, checkpoint=str(path), data_dir=cfg.data_dir, device="cpu")
    return env, f"{net} width {width:g} on CIFAR-10 (`{path.name}`)"


def random_plans(env: FilterPruningEnv, n: int, seed: int) -> list[PruningPlan]:
    """``n`` distinct plans of one env step from the unpruned network at random per-layer grid rates (each layer as
    :func:`pruning_env.envs.plans.uniform_plan` prunes it at its rate)."""
    rng = np.random.default_rng(seed)
    rates = [r for r in env.config.rates if r > 0]
    uniform = {r: uniform_plan(env, r) for r in rates}
    plans: dict[str, PruningPlan] = {}
    for _ in range(100 * n):
        if len(plans) == n:
            break
        pick = rng.choice(len(rates), size=len(env.layer_names))
        plan = PruningPlan({name: uniform[rates[k]].keep[name] for name, k in zip(env.layer_names, pick)},
                           env.plan.widths)
        plans.setdefault(plan.key(), plan)
    return list(plans.values())


def _warm_up(env: FilterPruningEnv, n: int) -> list[PruningPlan]:
    """``n`` uniform plans outside the random ones (one warm-up measurement per worker, not timed)."""
    return [uniform_plan(env, r) for r in sorted((r for r in env.config.rates if r > 0), reverse=True)[:n]]


def _bare(env: FilterPruningEnv, plans: list[PruningPlan], threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    replica = FilterPruningEnv(env.base_model, env.splits, env.config)  # an empty cache
    replica.measure(_warm_up(env, 1)[0])
    t0 = time.perf_counter()
    for plan in plans:
        replica.measure(plan)
    wall = time.perf_counter() - t0
    return {"setting": "bare", "workers": 0, "threads": threads, "plans": len(plans), "wall_s": wall,
            "plans_per_s": len(plans) / wall, "measure_s_per_plan": wall / len(plans)}


def _ray(env: FilterPruningEnv, plans: list[PruningPlan], workers: int, threads: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    with PlanEvaluator(env, workers, threads=threads) as evaluator:
        startup = time.perf_counter() - t0
        evaluator.measure(_warm_up(env, workers))
        measured, inside_before = evaluator.measured, evaluator.worker_seconds
        t1 = time.perf_counter()
        evaluator.measure(plans)
        wall = time.perf_counter() - t1
        assert evaluator.measured - measured == len(plans)
        inside = (evaluator.worker_seconds - inside_before) / len(plans)
    overhead = wall / len(plans) * workers - inside  # worker-seconds per plan not spent measuring
    return {"setting": f"ray x{workers}", "workers": workers, "threads": threads, "plans": len(plans),
            "wall_s": wall, "plans_per_s": len(plans) / wall, "measure_s_per_plan": inside,
            "overhead_s_per_plan": overhead, "overhead_share": overhead / inside, "startup_s": startup}


def _settings(cfg: ScaleOutConfig) -> list[tuple[int, int]]:
    """(workers, torch threads each) to time: each N of ``--workers`` with ``cores // N`` threads (the cores filled,
    not oversubscribed), and, when 1 worker is timed, 1 worker also at the fewest threads any N gets: the reference
    of equal threads per worker (what the extra worker processes add, the scaling that carries over to more cores
    and machines)."""
    settings = [(n, max(1, cfg.cores // n)) for n in cfg.workers]
    reference = (1, min(t for _, t in settings))
    if 1 in cfg.workers and reference not in settings:
        settings.insert(cfg.workers.index(1) + 1, reference)
    return settings


def _setting_name(workers: int, threads: int, cores: int) -> str:
    """``ray xN``, with the threads named where a worker gets fewer than the cores' share (``ray x1, 1 thread``)."""
    if threads == max(1, cores // workers):
        return f"ray x{workers}"
    return f"ray x{workers}, {threads} thread{'s' if threads > 1 else ''}"


def _single(rows: list[dict[str, Any]], cores: int) -> dict[str, Any] | None:
    """The 1-worker row with all the cores' threads (else any 1-worker row): the best single process."""
    ones = [r for r in rows if r["workers"] == 1]
    return next((r for r in ones if r["threads"] == cores), ones[0] if ones else None)


def _speedups(row: dict[str, Any], rows: list[dict[str, Any]], cores: int) -> tuple[float | None, float | None]:
    """A Ray row's plans/s over (the best single worker, a single worker with the same threads each)."""
    single = _single(rows, cores)
    same = next((r for r in rows if r["workers"] == 1 and r["threads"] == row["threads"]), None)
    return (row["plans_per_s"] / single["plans_per_s"] if single else None,
            row["plans_per_s"] / same["plans_per_s"] if same else None)


def _learner_seconds(env: FilterPruningEnv, episodes: int, seed: int) -> float | None:
    """Seconds per QMIX training episode outside plan measurement (the serial part of a search)."""
    if episodes == 0:
        return None
    import agents

    replica = FilterPruningEnv(env.base_model, env.splits, env.config)
    algo = agents.make_algorithm("qmix", replica, seed=seed, learning_starts=1, batch_size=4)
    before = sum(replica.timings.values())
    t0 = time.perf_counter()
    for _ in range(episodes):
        algo.train_episode()
    return (time.perf_counter() - t0 - (sum(replica.timings.values()) - before)) / episodes


def cost_model(t_plan: float, t_overhead: float, t_learn: float, *, plans: int, episode_length: int, machines: int,
               cores: int, threads: int, lookahead: int) -> dict[str, float]:
    """Modelled wall time (s) and speed-up of a search of ``plans`` plans on ``machines`` machines.

    ``t_plan``: seconds to measure a plan on ``threads`` threads; ``t_overhead``: the Ray path's seconds per plan;
    ``t_learn``: serial seconds per training episode. Workers busy: ``min(machines * cores // threads, lookahead)``
    (a prefetch round measures one plan per episode ahead).
    """
    workers = max(1, min(machines * cores // threads, lookahead))
    episodes = plans / episode_length
    serial = plans * t_plan + episodes * t_learn
    parallel = plans * t_plan / workers + plans * t_overhead + episodes * t_learn
    return {"machines": machines, "workers": workers, "seconds": parallel, "speedup": serial / parallel}


def _plot(rows: list[dict[str, Any]], model: list[dict[str, float]], path: Path, cores: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ray_rows = [r for r in rows if r["workers"] > 0]
    filled = [r for r in ray_rows if r["threads"] == max(1, cores // r["workers"])]  # the cores filled
    left.plot([r["workers"] for r in filled], [r["plans_per_s"] for r in filled], "o-",
              label="Ray workers (cores / N threads each)")
    for r in ray_rows:
        if r not in filled:
            left.plot([r["workers"]], [r["plans_per_s"]], "s", label=r["setting"])
    bare = next((r for r in rows if r["workers"] == 0), None)
    if bare:
        left.axhline(bare["plans_per_s"], color="gray", ls="--", label=f"bare, {bare['threads']} threads")
    left.set_xlabel("workers")
    left.set_ylabel("plans / s (measured)")
    left.legend()
    right.plot([m["machines"] for m in model], [m["speedup"] for m in model], "o-", label="model")
    right.set_xscale("log", base=2)
    right.set_xlabel("machines K")
    right.set_ylabel("search speed-up over 1 process (model)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(cfg: ScaleOutConfig, state: dict[str, Any]) -> str:
    rows, model, h = state["rows"], state["model"], state["header"]
    lines = [f"# Scale out: plans per second on Ray workers ({h['problem']})", "",
             f"Command: `{h['command']}`; commit {h['commit']}; {h['date']}.", "", f"Machine: {h['machine']}.", "",
             f"Conditions: {h['conditions']}", "",
             "Speed-ups: over the best single worker (1 worker with all the cores' threads), and over 1 worker with "
             "the same threads each (what the extra worker processes add: the scaling that carries over to more "
             "cores and machines).", "",
             "| setting | threads each | plans | wall (s) | plans/s | speed-up vs best 1 worker "
             "| speed-up vs 1 worker, same threads | measuring s/plan | Ray overhead s/plan | overhead share "
             "| start-up (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratios = _speedups(r, rows, cfg.cores) if r["workers"] else (None, None)
        speed = " | ".join(f"{x:.2f}x" if x is not None else "-" for x in ratios)
        over = (f"{r['overhead_s_per_plan']:.4f}", f"{100 * r['overhead_share']:.1f} %", f"{r['startup_s']:.1f}") \
            if r["workers"] else ("-", "-", "-")
        lines.append(f"| {r['setting']} | {r['threads']} | {r['plans']} | {r['wall_s']:.2f} | {r['plans_per_s']:.2f} "
                     f"| {speed} | {r['measure_s_per_plan']:.4f} | {over[0]} | {over[1]} | {over[2]} |")
    t_learn = state["learner_s_per_episode"]
    lines += ["", "## Cost model", "",
              f"A search of {cfg.search_plans} plans (episodes of {state['episode_length']} steps) on K machines of "
              f"{cfg.cores} cores, from the measured numbers above: t_plan = {state['t_plan']:.4f} s "
              f"({state['threads']} threads), Ray overhead {state['t_overhead']:.4f} s/plan, serial learner time "
              + (f"{t_learn:.4f} s per episode (QMIX, measured)" if t_learn is not None else "not measured (0)")
              + f"; at most {cfg.lookahead} plans per prefetch round.", "",
              "| machines K | workers busy | modelled search time (s) | speed-up |", "|---|---|---|---|",
              *[f"| {m['machines']} | {m['workers']} | {m['seconds']:.1f} | {m['speedup']:.2f}x |" for m in model], "",
              "What stays serial: the learner's acting and updates (one policy) and the driver's own bookkeeping; "
              "what scales: plan measurement (BN re-estimation, evaluation, scoring). Plans go to workers for "
              "episodes known ahead: random search, the DSFP-uniform sweep and QMIX/VDN/IQL with "
              "episodes_per_snapshot = B > 1 (then at most B plans per round, so W <= B); with B = 1 and for AMC "
              "they are measured in the driver (speed-up 1).", "", "![scale out](scale_out.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ScaleOutConfig, argv, "scale_out", __doc__)
    try:
        require_ray()
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json_path = Path(cfg.out_dir) / "scale_out.json"
    with hold_outputs("scale_out", files=[("--out-dir", json_path)]):
        return _main(cfg, argv, json_path)


def _main(cfg: ScaleOutConfig, argv: list[str] | None, json_path: Path) -> int:
    out_dir = json_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = json.loads(json.dumps(without_run_only(ScaleOutConfig, flat_dict(cfg))))
    old = json.loads(json_path.read_text()) if (cfg.resume and json_path.is_file()) else {}
    same = without_run_only(ScaleOutConfig, old.get("settings", {})) == keys
    done = {r["setting"]: r for r in old.get("rows", [])} if same else {}
    try:
        env, problem = _env(cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    load_before = os.getloadavg()[0]
    plans = random_plans(env, cfg.plans, cfg.seed)
    rows: list[dict[str, Any]] = [done.get("bare") or _bare(env, plans, cfg.cores)]
    log(f"bare: {rows[0]['plans_per_s']:.2f} plans/s")
    with ray_session(WorkersConfig(workers=max(2, *cfg.workers), ray_address=cfg.ray_address)):
        for n, threads in _settings(cfg):
            name = _setting_name(n, threads, cfg.cores)
            row = done.get(name) or _ray(env, plans, n, threads)
            row["setting"] = name
            log(f"{name}: {row['plans_per_s']:.2f} plans/s, overhead {100 * row['overhead_share']:.1f} %")
            rows.append(row)
    t_learn = old.get("learner_s_per_episode") if done else _learner_seconds(env, cfg.learner_episodes, cfg.seed)
    single = _single(rows, cfg.cores)
    one = single or rows[1]  # the model's per-plan numbers: 1 worker's, else the first Ray row's
    model = [cost_model(one["measure_s_per_plan"], one["overhead_s_per_plan"], t_learn or 0.0,
                        plans=cfg.search_plans, episode_length=env.config.episode_length, machines=k, cores=cfg.cores,
                        threads=one["threads"], lookahead=cfg.lookahead) for k in cfg.machines]
    load = os.getloadavg()[0]
    state = {"settings": keys, "rows": rows, "learner_s_per_episode": t_learn, "model": model,
             "t_plan": one["measure_s_per_plan"], "t_overhead": one["overhead_s_per_plan"], "threads": one["threads"],
             "episode_length": env.config.episode_length,
             "header": {"command": command_line("scale_out", argv), "commit": commit(), "machine": machine(),
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "problem": problem,
                        "conditions": f"1-minute load average {load_before:.2f} before and {load:.2f} after the "
                                      f"measurements on {cfg.cores} cores (the run itself adds up to {cfg.cores}; "
                                      "more before it means other jobs shared the cores and the timings are "
                                      "contended)"}}
    atomic_write_text(json_path, json.dumps(state, indent=2))
    _plot(rows, model, out_dir / "scale_out.png", cfg.cores)
    write_markdown(out_dir / "scale_out.md", _markdown(cfg, state))
    two = next((_speedups(r, rows, cfg.cores) for r in rows if r["workers"] == 2), (None, None))
    print_json({"out_dir": str(out_dir), "rows": [{k: r[k] for k in ("setting", "plans_per_s")} for r in rows],
                "speedup_2_vs_1": two[0], "speedup_2_vs_1_same_threads": two[1], "config": dataclasses.asdict(cfg)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
