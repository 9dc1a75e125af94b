"""QMIX against the other searches and a practitioner's baseline, at the same budget and matched MACs.

Every algorithm (QMIX, VDN, IQL, AMC-style DDPG, random search, DSFP-uniform) searches the
SAME pruning env configuration (a fresh env per algorithm, same seed) with the SAME budget:
training episodes run until the env has measured ``--plans`` distinct plans
(``env.num_evaluations``, cache misses; greedy evaluations count too; the unpruned network
measured at construction does not). An episode is never cut, so an algorithm may end up to
``episode_length - 1`` plans over the budget; the exact figure is reported. An algorithm that
measures no new plan for ``--stall-episodes`` episodes in a row stops early (DSFP-uniform has
only one plan per grid rate) and is marked "exhausted".

The default reward is ``budget`` with ``--macs-target 0.3``: objective = accuracy ratio minus
``--budget-penalty`` (2) per unit of MACs ratio above the target, so every algorithm's best plan
sits near the same MACs ("matched MACs"). The penalty is soft, so a best plan may sit somewhat
above the target: the report flags MACs that differ by more than 0.05 and also compares, at
strictly matched MACs, the best validation accuracy of all plans measured at or under the target.

Outputs in ``--out-dir``:

* ``marl_curves.png``: best-so-far validation objective vs plans evaluated, one line per
  algorithm (mean over seeds, band = min..max);
* ``marl_pareto.png``: validation accuracy ratio vs MACs ratio of EVERY plan each algorithm
  measured (all seeds pooled) and its Pareto front; stars = best plans, X = Torch-Pruning;
* ``marl.md`` / ``marl.json``: search results per algorithm and seed; then the best plan of
  each algorithm (by validation objective) after IDENTICAL fine-tuning (knowledge
  distillation from the unpruned network, ``--finetune-epochs``), next to Torch-Pruning's
  global L1-magnitude pruning of the same convs down to the same MACs, with the same
  fine-tuning. TEST accuracy before/after fine-tuning, validation objective, MACs and
  params ratios, wall time; and a summary paragraph written from the numbers.

Resumable (``--resume``, on by default): every finished search and every finished fine-tune
is written to ``marl.json`` at once and skipped on a rerun with the same settings; an
interrupted fine-tune continues from its per-epoch checkpoint under ``--work-dir``.

    PYTHONPATH=. python benchmarks/marl.py --data-dir /path/to/data          # VGG-16 w0.25, CIFAR-10, 3 seeds
    PYTHONPATH=. python benchmarks/marl.py --seeds 0 --plans 300 --finetune-epochs 2 --finetune-limit 10000
    PYTHONPATH=. python benchmarks/marl.py --env pruning_env/Tiny-v0 --plans 12 --finetune-epochs 1 \\
        --algos qmix random dsfp-uniform --out-dir /tmp/marl                   # smoke, seconds
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import agents  # noqa: E402
import pruning_env  # noqa: E402
from pruning_env.core import checkpoint as ckpt  # noqa: E402
from pruning_env.cli.options import add_config_args, config_from_args  # noqa: E402
from pruning_env.core.config import option, resolve_device, seed_everything  # noqa: E402
from pruning_env.core.data import load_splits  # noqa: E402
from pruning_env.envs.env import FilterPruningEnv, config_dict, objective  # noqa: E402
from pruning_env.core.evaluation import evaluate  # noqa: E402
from pruning_env.training.finetune import FinetuneConfig, finetune  # noqa: E402
from pruning_env.engine.bn import recalibrate_bn  # noqa: E402
from pruning_env.engine.flops import count  # noqa: E402
from pruning_env.engine.plan import PruningPlan  # noqa: E402
from pruning_env.engine.surgery import apply  # noqa: E402
from pruning_env.envs.registry import NETWORK_NAMES, make_benchmark_env  # noqa: E402
from pruning_env.training.train import default_checkpoint_path  # noqa: E402
from pruning_env.core.provenance import git_commit, machine_description  # noqa: E402
from pruning_env.cli.marl import pareto_front  # noqa: E402


def _commit() -> str:
    return git_commit(Path(__file__).resolve().parents[1])


def _machine() -> str:
    return machine_description()


ALGOS = ["qmix", "vdn", "iql", "amc", "random", "dsfp-uniform"]
TP_NAME = "torch-pruning"
TINY_ID = "pruning_env/Tiny-v0"
LABELS = {"qmix": "QMIX", "vdn": "VDN", "iql": "IQL", "amc": "AMC (DDPG)", "random": "random search",
          "dsfp-uniform": "DSFP-uniform", TP_NAME: "Torch-Pruning global L1"}
# Settings that define the search problem and its results: a rerun with other values cannot reuse them.
SEARCH_KEYS = ("net", "dataset", "width", "env", "checkpoint", "baseline_epochs", "plans", "eval_every",
               "stall_episodes", "reward", "lam", "macs_target", "budget_penalty", "rates", "episode_length",
               "criterion", "direction", "kl", "eval_size", "calib_size", "anneal_fraction", "algo_config")
FINETUNE_KEYS = ("finetune_epochs", "finetune_limit", "finetune_lr", "kd", "tp_target", "tp_steps")


@dataclass
class BenchConfig:
    """Every flag of benchmarks/marl.py (the CLI is generated from these fields)."""

    net: str = option("vgg16", "network to prune (with --dataset, --width; ignored with --env)",
                      choices=sorted(NETWORK_NAMES))
    dataset: str = option("cifar10", "data set of the baseline: cifar10 or cifar100")
    width: float = option(0.25, "channel width of the baseline")
    env: str | None = option(None, "a registered env id instead of --net/--dataset, e.g. pruning_env/Tiny-v0 (smoke)")
    checkpoint: str | None = option(None, "trained baseline checkpoint (default: the cached "
                                    "<net>-<dataset>-w<width>-e<baseline-epochs>-s0.pt; never trained here)")
    baseline_epochs: int = option(30, "epochs of the cached baseline to look up")
    data_dir: str | None = option(None, "data directory (default: $PRUNING_ENV_DATA, else the cache)")
    algos: list[str] = option(list(ALGOS), "algorithms to compare (registered names)")
    plans: int = option(300, "budget: distinct plans each algorithm's env measures (greedy evaluations included)")
    seeds: list[int] = option([0, 1, 2], "seeds; every algorithm runs once per seed")
    eval_every: int = option(10, "greedy evaluation every N training episodes (counts toward the budget)")
    stall_episodes: int = option(100, "stop an algorithm early after this many episodes in a row without a new plan")
    reward: str = option("budget", "reward mode", choices=["linear", "budget", "amc"])
    lam: float = option(0.5, "linear reward: objective = acc_ratio - lam * macs_ratio")
    macs_target: float = option(0.3, "budget reward: target MACs ratio; also Torch-Pruning's target with "
                                "--tp-target target")
    budget_penalty: float = option(2.0, "budget reward: penalty per unit of MACs ratio above the target (larger = "
                                   "MACs matched more strictly)")
    rates: list[float] = option([round(0.1 * i, 1) for i in range(10)], "grid of pruning rates (the actions)")
    episode_length: int = option(3, "pruning steps per episode")
    criterion: str = option("dsfp", "filter ranking of the env's transition")
    direction: str = option("low", "dsfp: which end of the fused score is pruned", choices=["low", "high"])
    kl: str = option("exact", "KL component mode of the unpruned network's DSFP scores")
    eval_size: int = option(1000, "validation images per reward evaluation (not used by Tiny-v0)")
    calib_size: int = option(128, "calibration images for the sensitivity scores (not used by Tiny-v0)")
    anneal_fraction: float = option(0.5, "QMIX/VDN/IQL: epsilon reaches its floor after this share of the budget "
                                    "(eps_anneal_steps = fraction * plans); AMC: warm-up = 1/8 of the expected "
                                    "episodes (AMC's 100 of 800)")
    algo_config: str | None = option(None, "JSON of per-algorithm config overrides, applied last, e.g. "
                                     "'{\"qmix\": {\"lr\": 0.0005}}'")
    finetune_epochs: int = option(2, "fine-tuning epochs of every best plan and of Torch-Pruning's network")
    finetune_limit: int | None = option(None, "training images per fine-tuning epoch (a fixed subset; default all)")
    finetune_lr: float = option(0.01, "peak learning rate of the fine-tuning (SGD Nesterov, cosine to 0)")
    kd: bool = option(True, "fine-tune with knowledge distillation from the unpruned network")
    tp_target: str = option("qmix", "Torch-Pruning prunes until its MACs ratio <= that of the QMIX best plan of "
                            "the same seed (qmix; falls back to --macs-target without QMIX) or --macs-target "
                            "(target)", choices=["qmix", "target"])
    tp_steps: int = option(200, "Torch-Pruning iterative steps from 0 to the largest rate (finer = closer MACs)")
    device: str = option("auto", "device of the env and fine-tuning (agents run on the CPU): auto, cpu, cuda")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)")
    out_dir: str = option(str(ROOT / "benchmarks" / "results"), "folder of marl.md, marl.json and the plots")
    work_dir: str = option("runs/bench_marl", "folder of fine-tuning checkpoints (for resuming)")
    resume: bool = option(True, "reuse finished searches / fine-tunes recorded in marl.json (same settings)")
    progress: bool = option(True, "show progress bars")


# ----------------------------------------------------------------------------- set-up


def _check(cfg: BenchConfig) -> BenchConfig:
    """Validate every flag before any work starts (raises ValueError)."""
    unknown = [a for a in cfg.algos if a not in agents.list_algorithms()]
    if unknown:
        raise ValueError(f"unknown algorithm(s) {unknown}; choose from {', '.join(agents.list_algorithms())}")
    if len(set(cfg.algos)) != len(cfg.algos) or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError("--algos and --seeds must not repeat")
    if cfg.plans < 1 or cfg.eval_every < 1 or cfg.stall_episodes < 1 or cfg.tp_steps < 1:
        raise ValueError("--plans, --eval-every, --stall-episodes and --tp-steps must be >= 1")
    if cfg.finetune_epochs < 0 or (cfg.finetune_limit is not None and cfg.finetune_limit < 1):
        raise ValueError("--finetune-epochs must be >= 0 and --finetune-limit >= 1")
    if not 0.0 < cfg.anneal_fraction <= 1.0:
        raise ValueError("--anneal-fraction must be in (0, 1]")
    if cfg.algo_config:
        try:
            extra = json.loads(cfg.algo_config)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--algo-config is not valid JSON: {exc}") from None
        if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
            raise ValueError("--algo-config must be a JSON object {algorithm: {field: value}}")
    if cfg.env is not None:
        pruning_env.register_all()
        if cfg.env not in pruning_env.list_envs():
            raise ValueError(f"unknown env id {cfg.env!r}; registered: {', '.join(pruning_env.list_envs())}")
    elif cfg.dataset not in ("cifar10", "cifar100"):
        raise ValueError(f"--dataset must be cifar10 or cifar100, got {cfg.dataset!r} (or pass --env)")
    if cfg.reward == "budget" and not 0.0 < cfg.macs_target <= 1.0:
        raise ValueError(f"--macs-target is a MACs ratio in (0, 1], got {cfg.macs_target}")
    resolve_device(cfg.device)
    if cfg.env != TINY_ID:
        cfg = dataclasses.replace(cfg, checkpoint=str(_baseline_path(cfg)))
    return cfg


def _net_dataset(cfg: BenchConfig) -> tuple[str, str]:
    if cfg.env is None:
        return cfg.net, cfg.dataset
    label, data = cfg.env.split("/", 1)[1].rsplit("-v0", 1)[0].split("-")
    net = {v: k for k, v in NETWORK_NAMES.items()}[label]
    return net, data.lower()


def _baseline_path(cfg: BenchConfig) -> Path:
    """The trained baseline: --checkpoint, else the FINISHED cached one (a benchmark never trains it)."""
    if cfg.checkpoint:
        path = Path(cfg.checkpoint).expanduser()
        if not path.is_file():
            raise ValueError(f"--checkpoint {path} does not exist")
        return path.resolve()
    net, dataset = _net_dataset(cfg)
    path = default_checkpoint_path(net, dataset, cfg.width, cfg.baseline_epochs)
    if not path.is_file():
        raise ValueError(f"no trained baseline at {path}; train it first (python -m pruning_env.train --net {net} "
                         f"--dataset {dataset} --width {cfg.width:g} --epochs {cfg.baseline_epochs}) or pass "
                         "--checkpoint")
    try:
        metrics = ckpt.load(path).metrics
    except ckpt.CheckpointError as exc:
        raise ValueError(str(exc)) from None
    if "test_acc" not in metrics:
        raise ValueError(f"the baseline {path} is not finished training yet (no test_acc recorded); wait for it "
                         "or pass --checkpoint")
    return path


class Context:
    """Data loaded once per process and shared by the fresh envs (splits) and the fine-tuning (base env)."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self._splits = None
        self._env: FilterPruningEnv | None = None

    def make_env(self) -> FilterPruningEnv:
        """A fresh env of the benchmark's problem (its plan cache empty)."""
        cfg = self.cfg
        kwargs = dict(rates=tuple(cfg.rates), episode_length=cfg.episode_length, reward=cfg.reward, lam=cfg.lam,
                      macs_target=cfg.macs_target, budget_penalty=cfg.budget_penalty, criterion=cfg.criterion,
                      direction=cfg.direction, kl=cfg.kl,
                      # big enough that no measured plan is ever evicted (a re-measure would cost budget twice)
                      cache_size=max(4096, 4 * cfg.plans))
        if cfg.env == TINY_ID:
            env = pruning_env.make(TINY_ID, **kwargs)
        else:
            net, dataset = _net_dataset(cfg)
            if self._splits is None:
                self._splits = load_splits(dataset, cfg.data_dir)
            env = make_benchmark_env(net, dataset, width=cfg.width, checkpoint=cfg.checkpoint, splits=self._splits,
                                     device=str(self.device), eval_size=cfg.eval_size, calib_size=cfg.calib_size,
                                     **kwargs)
        if self._env is None:
            self._env = env
        return env

    @property
    def env(self) -> FilterPruningEnv:
        """Some env of the problem (for its base model, splits, layers and config)."""
        return self._env if self._env is not None else self.make_env()


def _algo_overrides(cfg: BenchConfig, name: str) -> dict[str, Any]:
    """Budget-scaled exploration schedules (the algorithms' defaults are for other run lengths), then --algo-config."""
    over: dict[str, Any] = {}
    if name in ("qmix", "vdn", "iql"):
        over["eps_anneal_steps"] = max(1, round(cfg.anneal_fraction * cfg.plans))
    elif name == "amc":
        over["warmup_episodes"] = max(1, round(cfg.plans / cfg.episode_length / 8))
    if cfg.algo_config:
        over.update(json.loads(cfg.algo_config).get(name, {}))
    return over


# ----------------------------------------------------------------------------- search


def _new_points(env: FilterPruningEnv, seen: set[str], base: dict[str, float]) -> list[dict[str, float]]:
    """Plans the env measured since the last call (intermediate steps included)."""
    out = []
    for m in env.measured_plans():
        if m["key"] in seen:
            continue
        seen.add(m["key"])
        point = {k: m[k] for k in ("acc_ratio", "macs_ratio", "params_ratio", "objective")}
        out.append({k: round(v, 6) for k, v in point.items()})  # keeps marl.json small; far below the noise
    return out


def run_search(cfg: BenchConfig, ctx: Context, name: str, seed: int) -> dict[str, Any]:
    """One algorithm, one seed, one fresh env, ``cfg.plans`` measured plans."""
    seed_everything(seed)
    t_env = time.perf_counter()
    env = ctx.make_env()
    env_seconds = time.perf_counter() - t_env
    base = env.evaluate_plan(PruningPlan.full(env._layers))  # noqa: SLF001 - cache hit, costs nothing
    start = env.num_evaluations
    seen = {m["key"] for m in env.measured_plans()}  # the unpruned network is not a candidate
    overrides = _algo_overrides(cfg, name)
    algo = agents.make_algorithm(name, env, seed=seed, device="cpu", **overrides)
    points: list[dict[str, float]] = []
    curve: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    episodes = greedy_runs = stall = 0
    exhausted = False

    def used() -> int:
        return env.num_evaluations - start

    bar = tqdm(total=cfg.plans, desc=f"seed {seed} {name}", unit="plan", disable=not cfg.progress, file=sys.stderr)

    def record(info: dict[str, Any], source: str) -> None:
        nonlocal best
        for p in _new_points(env, seen, base):
            points.append({**p, "order": len(points)})
        cand = {k: float(info[k]) for k in ("objective", "acc", "acc_ratio", "macs_ratio", "params_ratio")}
        cand.update(episode=episodes, source=source, plans_used=used())
        if best is None or cand["objective"] > best["objective"]:
            best = {**cand, "plan": info["plan"]}
        curve.append({"plans": used(), "episode": episodes, "source": source, "objective": cand["objective"],
                      "best": best["objective"]})
        bar.update(min(used(), cfg.plans) - bar.n)
        bar.set_postfix(best=f"{best['objective']:.3f}", macs=f"{best['macs_ratio']:.2f}")

    t0 = time.perf_counter()
    while used() < cfg.plans:
        before = used()
        log = algo.train_episode()
        episodes += 1
        record(log.final_info, "train")
        if episodes % cfg.eval_every == 0 and used() < cfg.plans:
            record(algo.evaluate().final_info, "greedy")
            greedy_runs += 1
        stall = stall + 1 if used() == before else 0
        if stall >= cfg.stall_episodes:
            exhausted = True
            break
    seconds = time.perf_counter() - t0
    bar.close()
    assert best is not None
    # points: every plan measured, in the order they were found (episode by episode); curve: one entry per episode
    return {"algorithm": name, "seed": seed, "plans_used": used(), "episodes": episodes,
            "greedy_evaluations": greedy_runs, "exhausted": exhausted, "seconds": round(seconds, 2),
            "env_setup_seconds": round(env_seconds, 2), "config_overrides": overrides, "best": best,
            "points": points, "curve": curve, "baseline_val_acc": env.baseline_acc}


# ----------------------------------------------------------------------------- Torch-Pruning


def torch_pruning_model(base: nn.Module, env: FilterPruningEnv, target_ratio: float,
                        steps: int) -> tuple[nn.Module, dict[str, Any]]:
    """Global L1-magnitude pruning of the env's prunable convs with Torch-Pruning, step by step until the MACs
    ratio is <= ``target_ratio``. Every other conv and every Linear is ignored (as the env does); no layer loses
    more than the env's largest rate."""
    import torch_pruning as tp

    model = copy.deepcopy(base).cpu().eval()
    names = set(env.layer_names)
    ignored = [m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in names]

    def out_widths(net: nn.Module) -> dict[str, int]:
        return {n: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features for n, m in net.named_modules()
                if isinstance(m, (nn.Conv2d, nn.Linear))}

    widths_before = out_widths(model)
    max_rate = float(max(env.config.rates))
    pruner = tp.pruner.MagnitudePruner(
        model, example_inputs=torch.zeros(1, *env.input_shape), importance=tp.importance.MagnitudeImportance(p=1),
        global_pruning=True, pruning_ratio=max_rate, max_pruning_ratio=max_rate, iterative_steps=steps,
        ignored_layers=ignored)
    base_macs = count(base, env.input_shape).macs
    ratio, done = 1.0, 0
    for done in range(1, steps + 1):
        pruner.step()
        ratio = count(model, env.input_shape).macs / base_macs
        if ratio <= target_ratio:
            break
    touched = [n for n, w in out_widths(model).items() if n not in names and w != widths_before[n]]
    info = {"target_macs_ratio": target_ratio, "reached": ratio <= target_ratio + 1e-12, "steps": done,
            "global_channel_ratio": max_rate * done / steps, "other_layers_pruned": touched,
            "keep": {n: m.out_channels for n, m in model.named_modules() if n in names}}
    return model, info


# ----------------------------------------------------------------------------- fine-tuning


def _val_subset(model: nn.Module, env: FilterPruningEnv, device: torch.device) -> float:
    """Validation accuracy exactly as the env measures a plan (same subset, batch size)."""
    s = env.splits
    return evaluate(model, s.val, mean=s.mean, std=s.std, batch_size=env.config.eval_batch_size, device=device,
                    limit=env.config.eval_size)


def run_finetune(cfg: BenchConfig, ctx: Context, name: str, seed: int, search: dict[str, Any] | None,
                 tp_target: float | None, baseline: dict[str, Any]) -> dict[str, Any]:
    """Prune (best plan, or Torch-Pruning), re-estimate BN as the env does, fine-tune, test."""
    env, device = ctx.env, ctx.device
    base, splits, shape = env.base_model, env.splits, env.input_shape
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if name == TP_NAME:
        assert tp_target is not None
        model, extra = torch_pruning_model(base, env, tp_target, cfg.tp_steps)
        model.to(device)
        plan_dict = None
    else:
        assert search is not None
        plan = PruningPlan.from_dict(search["best"]["plan"])
        model = apply(base, plan, shape, layers=env._layers)  # noqa: SLF001
        plan_dict = plan.to_dict()
        extra["keep"] = plan.keep_counts()
    # Adaptive BN exactly as in the env's reward, so "before fine-tuning" is what the search scored.
    recalibrate_bn(model, splits, n_batches=env.config.bn_recal_batches, batch_size=env.config.bn_recal_batch_size,
                   seed=0, device=device)
    test = lambda m: evaluate(m, splits.test, mean=splits.mean, std=splits.std, device=device)  # noqa: E731
    val_acc_before = _val_subset(model, env, device)
    rep = count(model, shape)
    macs_ratio, params_ratio = rep.macs / baseline["macs"], rep.params / baseline["params"]
    acc_ratio = val_acc_before / max(env.baseline_acc, 1e-9)
    val_objective = objective(env.config, acc_ratio, macs_ratio, val_acc_before, rep.macs)
    test_before = test(model)
    ft_splits = splits
    if cfg.finetune_limit is not None:
        ft_splits = dataclasses.replace(splits, train=splits.train.subset(cfg.finetune_limit))
    ft: dict[str, Any] = {}
    if cfg.finetune_epochs > 0:
        out = Path(cfg.work_dir) / f"seed{seed}" / f"{name}-finetune.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        ft_cfg = FinetuneConfig(epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, kd=cfg.kd, seed=seed,
                                device=str(device), progress=cfg.progress)
        ft = finetune(model, ft_splits, ft_cfg, teacher=base if cfg.kd else None, out=out, resume=cfg.resume,
                      plan=plan_dict, meta={"algorithm": name, "benchmark": "marl"})
    test_after = test(model)
    return {
        "algorithm": name, "seed": seed,
        "val_objective": val_objective,
        "search_val_objective": search["best"]["objective"] if search else None,
        "val_acc_ratio": acc_ratio,
        "macs_ratio": macs_ratio, "params_ratio": params_ratio, "macs": rep.macs, "params": rep.params,
        "test_acc_before_finetune": test_before, "test_acc": test_after,
        "retention": test_after / baseline["test_acc"] if baseline["test_acc"] > 0 else None,
        "val_acc_after_finetune": ft.get("val_acc"), "finetune_best_epoch": ft.get("best_epoch"),
        "seconds": round(time.perf_counter() - t0, 2), **extra,
    }


# ----------------------------------------------------------------------------- bookkeeping


def _load_state(path: Path, cfg: BenchConfig) -> tuple[dict[str, Any], bool]:
    """The recorded results to resume from (empty when starting over), and whether fine-tunes may resume."""
    search_cfg = json.loads(json.dumps({k: getattr(cfg, k) for k in SEARCH_KEYS}))
    ft_cfg = json.loads(json.dumps({k: getattr(cfg, k) for k in FINETUNE_KEYS}))
    fresh = {"benchmark": "marl", "search_config": search_cfg, "finetune_config": ft_cfg, "runs": {}}
    if not (cfg.resume and path.is_file()):
        return fresh, False
    state = json.loads(path.read_text())
    if search_cfg != state.get("search_config"):
        diff = [k for k in SEARCH_KEYS if search_cfg[k] != state.get("search_config", {}).get(k)]
        raise ValueError(f"{path} holds results of other search settings ({', '.join(diff)}); pass --no-resume to "
                         "start over or another --out-dir")
    if ft_cfg != state.get("finetune_config"):
        # The searches stay valid; the fine-tunes (and their checkpoints) do not.
        print("marl: fine-tuning settings changed: recorded fine-tunes are discarded, searches kept", file=sys.stderr)
        for run in state["runs"].values():
            run["finetune"] = {}
        state["finetune_config"] = ft_cfg
        return state, False
    return state, True


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating, torch.Tensor)):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _save_state(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: an interrupted write never loses what was recorded before."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=1, default=_jsonable))
    tmp.replace(path)


# ----------------------------------------------------------------------------- report


def _mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray([x for x in xs if x is not None], dtype=np.float64)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _fmt(xs: list[float | None], digits: int = 4) -> str:
    """``mean ± std`` over seeds (just the value for one seed; "-" for none)."""
    m, s = _mean_std(xs)
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if len([x for x in xs if x is not None]) > 1 else "")


def _plots(state: dict[str, Any], cfg: BenchConfig, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = [a for a in cfg.algos if any(a in r["search"] for r in state["runs"].values())]
    colors = {a: plt.cm.tab10(i) for i, a in enumerate(ALGOS + [TP_NAME])}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a in algos:
        curves = [r["search"][a]["curve"] for r in state["runs"].values() if a in r["search"]]
        top = max(c[-1]["plans"] for c in curves)
        grid = np.arange(1, top + 1)
        ys = []
        for c in curves:
            plans, best = np.asarray([p["plans"] for p in c]), np.asarray([p["best"] for p in c])
            idx = np.searchsorted(plans, grid, side="right") - 1
            y = np.where(idx >= 0, best[np.clip(idx, 0, None)], np.nan)
            y[grid > plans[-1]] = best[-1]
            ys.append(y)
        ys = np.asarray(ys)
        # Seeds start at different x (after their first episode): plot from where every seed has a value, so the
        # mean of best-so-far values never decreases.
        complete = ~np.isnan(ys).any(axis=0)
        mean = np.where(complete, np.where(complete, ys, 0.0).mean(axis=0), np.nan)
        lo = np.where(complete, np.where(complete, ys, 0.0).min(axis=0), np.nan)
        hi = np.where(complete, np.where(complete, ys, 0.0).max(axis=0), np.nan)
        ax.plot(grid, mean, color=colors[a], label=f"{LABELS[a]} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(grid, lo, hi, color=colors[a], alpha=0.15)
    ax.axvline(cfg.plans, color="grey", ls=":", lw=1)
    ax.set_xlabel("plans evaluated (env.num_evaluations, greedy evaluations included)")
    ax.set_ylabel(f"best-so-far validation objective ({cfg.reward})")
    ax.set_title("Search progress at equal budget (mean over seeds, band = min..max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "marl_curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a in algos:
        pts = [p for r in state["runs"].values() if a in r["search"] for p in r["search"][a]["points"]]
        ax.scatter([p["macs_ratio"] for p in pts], [p["acc_ratio"] for p in pts], s=5, alpha=0.15, color=colors[a])
        front = pareto_front(pts)
        ax.plot([p["macs_ratio"] for p in front], [p["acc_ratio"] for p in front], ".-", color=colors[a], ms=3,
                label=f"{LABELS[a]} ({len(pts)} plans)")
        bests = [r["search"][a]["best"] for r in state["runs"].values() if a in r["search"]]
        ax.plot([b["macs_ratio"] for b in bests], [b["acc_ratio"] for b in bests], "*", color=colors[a], ms=11,
                mec="k", mew=0.5)
    tps = [r["finetune"][TP_NAME] for r in state["runs"].values() if TP_NAME in r.get("finetune", {})]
    if tps:
        ax.plot([t["macs_ratio"] for t in tps], [t["val_acc_ratio"] for t in tps], "kX", ms=9,
                label=LABELS[TP_NAME])
    if cfg.reward == "budget":
        ax.axvline(cfg.macs_target, color="grey", ls=":", lw=1, label=f"MACs target {cfg.macs_target:g}")
    ax.set_xlabel("MACs ratio (pruned / unpruned)")
    ax.set_ylabel("validation accuracy ratio (before fine-tuning)")
    ax.set_title("Every plan measured, all seeds pooled; Pareto fronts; stars = best plans")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "marl_pareto.png", dpi=120)
    plt.close(fig)


def _acc_at_target(search: dict[str, Any], target: float) -> float | None:
    """Best validation accuracy ratio among ALL plans the search measured with MACs ratio <= target."""
    accs = [p["acc_ratio"] for p in search["points"] if p["macs_ratio"] <= target]
    return max(accs) if accs else None


def _compare(state: dict[str, Any], a: str, b: str, section: str, key: str) -> dict[str, Any] | None:
    pairs = []
    for run in state["runs"].values():
        ra, rb = run.get(section, {}).get(a), run.get(section, {}).get(b)
        if ra and rb:
            if key.startswith("acc_at_"):
                va, vb = (_acc_at_target(r, float(key[len("acc_at_"):])) for r in (ra, rb))
                if va is None or vb is None:
                    continue
            else:
                va = ra["best"][key] if section == "search" else ra[key]
                vb = rb["best"][key] if section == "search" else rb[key]
            ma = ra["best"]["macs_ratio"] if section == "search" else ra["macs_ratio"]
            mb = rb["best"]["macs_ratio"] if section == "search" else rb["macs_ratio"]
            pairs.append((va, vb, ma, mb))
    if not pairs:
        return None
    d = [p[0] - p[1] for p in pairs]
    return {"n": len(pairs), "a": _mean_std([p[0] for p in pairs]), "b": _mean_std([p[1] for p in pairs]),
            "diff": _mean_std(d), "wins": sum(x > 0 for x in d), "ties": sum(x == 0 for x in d),
            "macs_a": _mean_std([p[2] for p in pairs])[0], "macs_b": _mean_std([p[3] for p in pairs])[0]}


def _verdict(c: dict[str, Any], noise: float = 0.0) -> str:
    m, _ = c["diff"]
    if abs(m) <= noise:
        return "is within measurement noise of"
    if c["wins"] == c["n"] and m > 0:
        return "beats"
    if c["wins"] == 0:
        return "does not beat" if c["ties"] < c["n"] else "ties with"
    return "is mixed against"


def summary(state: dict[str, Any], cfg: BenchConfig) -> str:
    """A paragraph written from the recorded numbers only."""
    n_seeds = len(state["runs"])
    if "qmix" not in cfg.algos:
        return "QMIX was not among the algorithms run, so no QMIX comparison is made."
    eval_size = state.get("baseline", {}).get("env_config", {}).get("eval_size", cfg.eval_size)
    res = 100.0 / eval_size
    epochs = f"{cfg.finetune_epochs} epoch{'s' if cfg.finetune_epochs != 1 else ''}"
    parts, head_val, head_test = [], [], []
    for other in ("dsfp-uniform", "random"):
        if other not in cfg.algos:
            continue
        m = _compare(state, "qmix", other, "search", f"acc_at_{cfg.macs_target}") if cfg.reward == "budget" else None
        f = _compare(state, "qmix", other, "finetune", "test_acc")
        if m is not None:
            head_val.append(f"{_verdict(m, 2 * res / 100)} {LABELS[other]} ({m['diff'][0]:+.4f} accuracy ratio, "
                            f"QMIX higher in {m['wins']} of {m['n']})")
        if f is not None:
            head_test.append(f"{_verdict(f)} {LABELS[other]} ({f['diff'][0]:+.2f} points, higher in {f['wins']} of "
                             f"{f['n']}, at MACs ratios {f['macs_a']:.3f} vs {f['macs_b']:.3f})")
    if head_val:
        parts.append(f"Headline: among all plans measured with MACs ratio <= {cfg.macs_target:g}, QMIX "
                     + " and ".join(head_val) + " on validation accuracy (before fine-tuning)"
                     + ("; after identical fine-tuning of each best plan, QMIX " + " and ".join(head_test)
                        + " on test accuracy" if head_test else "") + ".")
    elif head_test:
        parts.append("Headline: after identical fine-tuning of each best plan, QMIX " + " and ".join(head_test)
                     + " on test accuracy.")
    for other in ("dsfp-uniform", "random"):
        if other not in cfg.algos:
            continue
        c = _compare(state, "qmix", other, "search", "objective")
        if c is None:
            continue
        text = (f"On the validation objective of the search, QMIX {_verdict(c, 2 * res / 100)} {LABELS[other]}: "
                f"{c['a'][0]:.4f} vs {c['b'][0]:.4f} (difference {c['diff'][0]:+.4f}"
                + (f" ± {c['diff'][1]:.4f}" if c["n"] > 1 else "")
                + f"; QMIX higher in {c['wins']} of {c['n']} seed{'s' if c['n'] > 1 else ''}), at MACs ratios "
                f"{c['macs_a']:.3f} vs {c['macs_b']:.3f}")
        if abs(c["macs_a"] - c["macs_b"]) > 0.05:
            text += " (the MACs are NOT well matched: compare with care)"
        if cfg.reward == "budget":
            m = _compare(state, "qmix", other, "search", f"acc_at_{cfg.macs_target}")
            if m is not None:
                text += (f". At strictly matched MACs (the best of ALL plans measured with MACs ratio <= "
                         f"{cfg.macs_target:g}) the validation accuracy ratio is {m['a'][0]:.4f} vs {m['b'][0]:.4f} "
                         f"(QMIX higher in {m['wins']} of {m['n']})")
        f = _compare(state, "qmix", other, "finetune", "test_acc")
        if f is not None:
            text += (f". After identical fine-tuning ({epochs}{', KD' if cfg.kd else ''}) the test accuracy is "
                     f"{f['a'][0]:.2f} % vs {f['b'][0]:.2f} % "
                     f"(difference {f['diff'][0]:+.2f} points"
                     + (f" ± {f['diff'][1]:.2f}" if f["n"] > 1 else "")
                     + f"; QMIX higher in {f['wins']} of {f['n']}): QMIX {_verdict(f)} it after fine-tuning")
        parts.append(text + ".")
    t = _compare(state, "qmix", TP_NAME, "finetune", "test_acc")
    if t is not None:
        parts.append(f"Against Torch-Pruning's global L1-magnitude pruning (MACs ratio {t['macs_b']:.3f} vs QMIX's "
                     f"{t['macs_a']:.3f}), QMIX's fine-tuned test accuracy is {t['a'][0]:.2f} % vs {t['b'][0]:.2f} % "
                     f"(difference {t['diff'][0]:+.2f} points; QMIX higher in {t['wins']} of {t['n']}).")
    if not parts:
        return "Not enough finished results for a QMIX comparison yet."
    caveat = (f" One validation image is {res:.2f} % of the reward subset ({eval_size} images), so objective "
              f"differences below about {2 * res / 100:.3f} are within measurement noise")
    caveat += (f"; with {n_seeds} seed{'s' if n_seeds > 1 else ''} "
               + ("there is no estimate of seed-to-seed variation, so none of this is a statistical claim."
                  if n_seeds == 1 else "the ± figures are standard deviations over seeds, not confidence intervals."))
    return " ".join(parts) + caveat


def write_report(state: dict[str, Any], cfg: BenchConfig, out_dir: Path, header: dict[str, str]) -> str:
    runs = state["runs"]
    seeds = sorted(runs, key=int)
    base = state.get("baseline", {})
    algos = [a for a in cfg.algos if any(a in runs[s]["search"] for s in seeds)]
    md = ["# MARL search benchmark: QMIX vs other searches at equal budget and matched MACs", "",
          f"Command: `{header['command']}`  ", f"Commit: {header['commit']}  ", f"Machine: {header['machine']}  ",
          f"Date: {header['date']}  ",
          f"Problem: {header['problem']}  ",
          f"Seeds: {', '.join(seeds)}; budget: {cfg.plans} measured plans per algorithm and seed (greedy "
          f"evaluations included; greedy every {cfg.eval_every} episodes); reward `{cfg.reward}`"
          + (f" with MACs target {cfg.macs_target:g}" if cfg.reward == "budget" else "")
          + (f" (lam {cfg.lam:g})" if cfg.reward == "linear" else "") + f"; episode length {cfg.episode_length}; "
          f"rates {cfg.rates}  ",
          f"Total wall time of this invocation: {header['wall']}", ""]
    if base:
        md += [f"Unpruned baseline: test accuracy {base['test_acc']:.2f} %, validation accuracy on the reward subset "
               f"{base['val_acc']:.2f} %, {base['macs'] / 1e6:.2f} M MACs, {base['params'] / 1e6:.3f} M params.", ""]
    md += ["## Summary", "", summary(state, cfg), "",
           "## Search (validation, before fine-tuning)", "",
           "Mean ± std over seeds. Best plan = the final plan of a training or greedy episode with the highest "
           "validation objective. Search time excludes env set-up (DSFP scores of the unpruned network).", "",
           "| algorithm | seeds | plans used | episodes | best val objective | val acc ratio | MACs ratio | "
           f"params ratio | best val acc ratio of all plans at MACs <= {cfg.macs_target:g} | search wall (s) | "
           "stopped early |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in algos:
        rs = [runs[s]["search"][a] for s in seeds if a in runs[s]["search"]]
        md.append(f"| {LABELS[a]} | {len(rs)} | {_fmt([r['plans_used'] for r in rs], 0)} | "
                  f"{_fmt([r['episodes'] for r in rs], 0)} | {_fmt([r['best']['objective'] for r in rs])} | "
                  f"{_fmt([r['best']['acc_ratio'] for r in rs])} | {_fmt([r['best']['macs_ratio'] for r in rs])} | "
                  f"{_fmt([r['best']['params_ratio'] for r in rs])} | "
                  f"{_fmt([_acc_at_target(r, cfg.macs_target) for r in rs])} | {_fmt([r['seconds'] for r in rs], 1)} | "
                  f"{sum(r['exhausted'] for r in rs)} of {len(rs)} |")
    ft_names = [a for a in [*algos, TP_NAME] if any(a in runs[s].get("finetune", {}) for s in seeds)]
    if ft_names:
        epochs = f"{cfg.finetune_epochs} epoch{'s' if cfg.finetune_epochs != 1 else ''}"
        md += ["", f"## After identical fine-tuning ({epochs}, "
               + ("KD from the unpruned network" if cfg.kd else "cross-entropy")
               + (f", {cfg.finetune_limit} training images per epoch" if cfg.finetune_limit
                  else ", full training split")
               + ")", "",
               "TEST accuracy. 'Before' = right after pruning with BatchNorm re-estimated as in the env's reward. "
               "MACs and params ratios counted on the pruned network (`pruning_env.engine.flops.count`). Val objective = "
               "the env's objective of the pruned network before fine-tuning (for the searches: the value the "
               "search saw). Torch-Pruning: `MagnitudePruner` with `MagnitudeImportance(p=1)`, global pruning of "
               "the same convs (all Linears ignored), per-layer cap = the largest grid rate, iterative steps until "
               "the MACs ratio is <= "
               + ("the QMIX best plan's MACs ratio of the same seed." if cfg.tp_target == "qmix" and "qmix" in algos
                  else f"{cfg.macs_target:g}."), "",
               "The searches' best plans were re-measured here from scratch: "
               + ("the validation objective matches the search's in every case."
                  if all(abs(r["val_objective"] - r["search_val_objective"]) < 1e-9 for s in seeds
                         for r in runs[s].get("finetune", {}).values() if r.get("search_val_objective") is not None)
                  else "**the validation objective differs from the search's for some plans** (see marl.json: "
                       "val_objective vs search_val_objective)."), "",
               "| method | seeds | MACs ratio | params ratio | val objective | test acc before FT (%) | "
               "test acc after FT (%) | retention | FT wall (s) |", "|---|---|---|---|---|---|---|---|---|"]
        for a in ft_names:
            rs = [runs[s]["finetune"][a] for s in seeds if a in runs[s].get("finetune", {})]
            md.append(f"| {LABELS[a]} | {len(rs)} | {_fmt([r['macs_ratio'] for r in rs])} | "
                      f"{_fmt([r['params_ratio'] for r in rs])} | {_fmt([r['val_objective'] for r in rs])} | "
                      f"{_fmt([r['test_acc_before_finetune'] for r in rs], 2)} | {_fmt([r['test_acc'] for r in rs], 2)}"
                      f" | {_fmt([r['retention'] for r in rs])} | {_fmt([r['seconds'] for r in rs], 1)} |")
    md += ["", "## Per seed", "",
           "| seed | method | plans used | best val objective | MACs ratio | test before FT (%) | test after FT (%) "
           "| search wall (s) | FT wall (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        for a in [*algos, TP_NAME]:
            sr, fr = runs[s]["search"].get(a), runs[s].get("finetune", {}).get(a)
            if not sr and not fr:
                continue
            cells = [s, LABELS[a], sr["plans_used"] if sr else "-",
                     f"{sr['best']['objective'] if sr else fr['val_objective']:.4f}",
                     f"{fr['macs_ratio'] if fr else sr['best']['macs_ratio']:.4f}",
                     f"{fr['test_acc_before_finetune']:.2f}" if fr else "-", f"{fr['test_acc']:.2f}" if fr else "-",
                     f"{sr['seconds']:.1f}" if sr else "-", f"{fr['seconds']:.1f}" if fr else "-"]
            md.append("| " + " | ".join(str(c) for c in cells) + " |")
    md += ["", "![learning curves](marl_curves.png)", "", "![Pareto fronts](marl_pareto.png)", "",
           "## How to read this", "",
           "* Budget = distinct plans the algorithm's own env measured (`env.num_evaluations`, cache misses): "
           "re-visiting a plan is free, greedy evaluations cost like training episodes. Episodes are never cut, "
           "so 'plans used' can exceed the budget by up to episode_length - 1.",
           "* The Pareto plot pools every plan measured, including the intermediate steps of episodes; the best "
           "plan is chosen among episode-final plans, as `train_marl.py` does.",
           f"* Exploration schedules are scaled to the budget (QMIX/VDN/IQL: epsilon 1 -> 0.05 over "
           f"{cfg.anneal_fraction:g} x budget env steps; AMC: warm-up of 1/8 of the expected episodes); all other "
           "hyper-parameters are the algorithms' defaults"
           + (f" plus `--algo-config {cfg.algo_config}`" if cfg.algo_config else "") + ".",
           "* DSFP-uniform can only produce one plan per grid rate; it stops once it has tried them all.", ""]
    text = "\n".join(md)
    (out_dir / "marl.md").write_text(text)
    return text


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/marl.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, BenchConfig)
    args = parser.parse_args(argv)
    argv_list = list(argv) if argv is not None else sys.argv[1:]
    try:
        cfg = _check(config_from_args(BenchConfig, args))
        out_dir = Path(cfg.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = out_dir / "marl.json"
        state, ft_resume = _load_state(json_path, cfg)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    header = {"command": "python benchmarks/marl.py " + shlex.join(argv_list), "commit": _commit(),
              "machine": _machine(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    ctx = Context(cfg)
    # A fine-tune checkpoint may be continued only when its recorded settings still hold.
    cfg_ft = dataclasses.replace(cfg, resume=ft_resume)
    reused = 0
    try:
        # 1. The searches: every algorithm, every seed, a fresh env each.
        for seed in cfg.seeds:
            run = state["runs"].setdefault(str(seed), {"search": {}, "finetune": {}})
            for name in cfg.algos:
                if name in run["search"]:
                    reused += 1
                    print(f"marl: seed {seed} {name}: search recorded in {json_path.name}, skipped", file=sys.stderr)
                    continue
                run["search"][name] = run_search(cfg, ctx, name, seed)
                _save_state(json_path, state)
        # 2. The unpruned baseline, then identical fine-tuning of every best plan and of Torch-Pruning's network.
        if "baseline" not in state:
            env = ctx.env
            s = env.splits
            rep = count(env.base_model, env.input_shape)
            state["baseline"] = {"test_acc": evaluate(env.base_model, s.test, mean=s.mean, std=s.std,
                                                      device=ctx.device),
                                 "val_acc": env.baseline_acc, "macs": rep.macs, "params": rep.params,
                                 "layers": env.layer_names, "env_config": config_dict(env.config)}
            _save_state(json_path, state)
        for seed in cfg.seeds:
            run = state["runs"][str(seed)]
            for name in [*cfg.algos, TP_NAME]:  # TP last: its target may be QMIX's measured MACs
                if name in run["finetune"]:
                    reused += 1
                    continue
                target = None
                if name == TP_NAME:
                    qmix = run["finetune"].get("qmix")
                    target = qmix["macs_ratio"] if (cfg.tp_target == "qmix" and qmix) else cfg.macs_target
                print(f"marl: seed {seed} {name}: fine-tuning", file=sys.stderr)
                run["finetune"][name] = run_finetune(cfg_ft, ctx, name, seed, run["search"].get(name), target,
                                                     state["baseline"])
                _save_state(json_path, state)
    except KeyboardInterrupt:
        _save_state(json_path, state)
        print(f"\ninterrupted: finished parts are in {json_path}; rerun the same command to continue",
              file=sys.stderr)
        return 130

    wall = time.perf_counter() - t_start
    header["wall"] = f"{wall:.0f} s" + (f" ({reused} recorded parts reused from marl.json)" if reused else "")
    env_cfg = state["baseline"]["env_config"]
    net, dataset = ("tiny", "synthetic") if cfg.env == TINY_ID else _net_dataset(cfg)
    header["problem"] = (f"{cfg.env or net + f' width {cfg.width:g}'} on {dataset}"
                         + (f", baseline `{Path(cfg.checkpoint).name}`" if cfg.checkpoint else "")
                         + f"; env: criterion {env_cfg['criterion']} ({env_cfg['direction']}), "
                         f"{env_cfg['eval_size']} validation images per reward, {env_cfg['calib_size']} calibration "
                         f"images, BN re-estimated on {env_cfg['bn_recal_batches']} batches")
    state["header"] = header
    state["summary"] = summary(state, cfg)
    _save_state(json_path, state)
    _plots(state, cfg, out_dir)
    write_report(state, cfg, out_dir, header)
    print(state["summary"])
    print(json.dumps({"out_dir": str(out_dir), "wall_seconds": round(wall, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
