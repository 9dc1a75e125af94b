"""Learn a per-layer pruning policy with multi-agent RL, prune, fine-tune, report.

    python train_marl.py --net vgg16                      # preset "cpu" without a GPU, "paper" with one
    python train_marl.py --env pruning_env/Tiny-v0 --preset smoke --algo qmix

Steps: (1) load the trained baseline (``--checkpoint``, else the cache, else train
it), (2) train the algorithm on the pruning env with TensorBoard logs under
``--logdir`` and periodic greedy evaluations, keeping the best plan by the
VALIDATION objective and the accuracy-vs-MACs Pareto front of every plan
evaluated, (3) apply the best plan, fine-tune it (knowledge distillation from the
unpruned network by default) and (4) report on the TEST split: accuracy,
retention, MACs / params and their reductions, CPU latency. Outputs under
``--logdir``: report.json, report.md, pareto.png, learning_curve.png,
pruned_model.pt, plan.json, train_state.pt (for --resume) and TensorBoard events.

The search is checkpointed after every finished episode (agents, optimiser,
replay buffer, RNG states, best plan, Pareto points), so after Ctrl-C or a kill
``--resume`` continues exactly where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import agents
import pruning_env
from pruning_env.core import checkpoint as ckpt
from pruning_env.cli.options import add_config_args, config_from_args
from pruning_env.core.config import option, resolve_device, seed_everything
from pruning_env.envs.env import FilterPruningEnv, config_dict
from pruning_env.core.evaluation import evaluate, measure_latency
from pruning_env.training.finetune import FinetuneConfig, finetune
from pruning_env.engine.bn import recalibrate_bn
from pruning_env.engine.flops import count
from pruning_env.core.models import build, list_models
from pruning_env.engine.macs import MacsModel
from pruning_env.engine.plan import PruningPlan
from pruning_env.engine.surgery import apply
from pruning_env.envs.registry import make_benchmark_env

PRESETS: dict[str, dict[str, Any]] = {
    # seconds: for tests and a first look (use with --env pruning_env/Tiny-v0)
    "smoke": dict(episodes=8, eval_every=4, finetune_epochs=1, latency_repeats=3, width=0.125, eval_size=200,
                  calib_size=64, baseline_epochs=1),
    # a machine without a GPU: VGG-16 at width 0.25, about an hour with a cached baseline
    "cpu": dict(episodes=400, eval_every=20, finetune_epochs=8, latency_repeats=30, width=0.25, eval_size=1000,
                calib_size=128, baseline_epochs=30),
    # GPU scale: full width
    "paper": dict(episodes=1000, eval_every=50, finetune_epochs=60, latency_repeats=50, width=1.0, eval_size=5000,
                  calib_size=128, baseline_epochs=200),
}
STATE_FILE = "train_state.pt"


@dataclass
class RunConfig:
    """Everything train_marl.py does; unset fields (None) come from the preset."""

    net: str = option("vgg16", "network to prune", choices=list_models())
    dataset: str = option("cifar10", "data set: cifar10, cifar100 or an image-folder name")
    data_dir: str | None = option(None, "data directory (default: $PRUNING_ENV_DATA, else the cache)")
    width: float | None = option(None, "channel width of the baseline (preset: smoke 0.125, cpu 0.25, paper 1)")
    env: str | None = option(None, "a registered env id (e.g. pruning_env/Tiny-v0) instead of --net/--dataset")
    algo: str = option("qmix", "algorithm: qmix, vdn, iql, amc, random, dsfp-uniform or module:name")
    episodes: int | None = option(None, "training episodes (preset: smoke 8, cpu 400, paper 1000)")
    eval_every: int | None = option(None, "greedy evaluation every N episodes")
    reward: str = option("budget", "reward mode: budget (accuracy under a MACs target), linear or amc",
                         choices=["budget", "linear", "amc"])
    lam: float = option(0.5, "linear reward: objective = acc_ratio - lam * macs_ratio")
    macs_target: float = option(0.5, "budget reward: target MACs ratio (pruned / unpruned)")
    budget_penalty: float = option(2.0, "budget reward: penalty per unit of MACs ratio above the target")
    rates: list[float] = option([round(0.1 * i, 1) for i in range(10)], "grid of pruning rates (the actions)")
    episode_length: int = option(3, "pruning steps per episode")
    criterion: str = option("dsfp", "filter ranking of the env's transition")
    direction: str = option("low", "dsfp: which end of the fused score is pruned", choices=["low", "high"])
    kl: str = option("exact", "KL component mode of the unpruned network's DSFP scores")
    eval_size: int | None = option(None, "validation images per reward evaluation")
    calib_size: int | None = option(None, "calibration images for the sensitivity scores")
    seed: int = option(0, "seed of everything (env, agents, fine-tuning)")
    device: str = option("auto", "auto (CUDA if present), cpu, cuda, cuda:N")
    logdir: str = option("runs/marl", "output folder: TensorBoard logs, report, plots, pruned model")
    checkpoint: str | None = option(None, "trained baseline checkpoint (default: cache, else train it)")
    baseline_epochs: int | None = option(None, "epochs of the cached/trained baseline")
    finetune_epochs: int | None = option(None, "fine-tuning epochs of the best plan (0: none)")
    kd: bool = option(True, "fine-tune with knowledge distillation from the unpruned network")
    resume: bool = option(False, "continue the search saved in --logdir")
    preset: str | None = option(None, "smoke, cpu or paper (default: paper with a GPU, cpu without)",
                                choices=list(PRESETS))
    latency_repeats: int | None = option(None, "timed forward passes per latency measurement")
    progress: bool = option(True, "show progress bars")


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill unset fields from the preset and check every flag before any work starts."""
    preset = cfg.preset or ("paper" if torch.cuda.is_available() else "cpu")
    values = {k: (v if v is not None else PRESETS[preset].get(k)) for k, v in dataclasses.asdict(cfg).items()}
    values["preset"] = preset
    cfg = RunConfig(**values)
    if cfg.algo not in agents.list_algorithms() and ":" not in cfg.algo:
        raise ValueError(f"unknown algorithm {cfg.algo!r}; choose one of {', '.join(agents.list_algorithms())}")
    if cfg.env is not None and cfg.env not in pruning_env.list_envs():
        raise ValueError(f"unknown env id {cfg.env!r}; registered: {', '.join(pruning_env.list_envs())}")
    if cfg.env is None and cfg.dataset not in ("cifar10", "cifar100"):
        from pruning_env.core.data import data_dir

        root = data_dir(cfg.data_dir)
        if not ((root / cfg.dataset / "train").is_dir() or (root / "train").is_dir()):
            raise ValueError(f"unknown data set {cfg.dataset!r}: not cifar10/cifar100 and no image folder "
                             f"{root / cfg.dataset}/train/<class>/ (set --data-dir or PRUNING_ENV_DATA)")
    if cfg.episodes < 1 or cfg.eval_every < 1:
        raise ValueError("--episodes and --eval-every must be >= 1")
    if any(not 0.0 <= r < 1.0 for r in cfg.rates):
        raise ValueError(f"--rates must lie in [0, 1), got {cfg.rates}")
    if cfg.reward == "budget":
        if not 0.0 < cfg.macs_target <= 1.0:
            raise ValueError(f"--macs-target is a MACs ratio in (0, 1], got {cfg.macs_target}")
        floor = _min_macs_ratio(cfg)
        if cfg.macs_target < floor:
            raise ValueError(f"--macs-target {cfg.macs_target} is impossible: pruning every layer at the largest "
                             f"rate {max(cfg.rates)} leaves {floor:.3f} of the MACs; raise the target or the rates")
    resolve_device(cfg.device)
    return cfg


def _min_macs_ratio(cfg: RunConfig) -> float:
    """The smallest MACs ratio the rate grid can reach (checked on an untrained copy of the net)."""
    from pruning_env.envs.registry import NETWORK_NAMES

    net = cfg.net
    if cfg.env is not None:
        net = "tiny" if cfg.env.endswith("/Tiny-v0") else next(
            n for n, label in NETWORK_NAMES.items() if f"/{label}-" in cfg.env)
    model = build(net, num_classes=10, width=1.0 if net == "tiny" else cfg.width)
    from pruning_env.engine.graph import prunable_layers

    layers = prunable_layers(model)
    macs = MacsModel.from_model(model)
    full = macs.predict({lay.name: lay.out_channels for lay in layers})[0]
    least = {lay.name: max(1, round((1 - max(cfg.rates)) * lay.out_channels)) for lay in layers}
    return macs.predict(least)[0] / full


def make_env(cfg: RunConfig) -> FilterPruningEnv:
    """The pruning env of this run (registered id or net/dataset with its baseline)."""
    env_kwargs = dict(rates=tuple(cfg.rates), episode_length=cfg.episode_length, reward=cfg.reward, lam=cfg.lam,
                      macs_target=cfg.macs_target, budget_penalty=cfg.budget_penalty, criterion=cfg.criterion, direction=cfg.direction, kl=cfg.kl)
    if cfg.env is not None:
        if cfg.env != "pruning_env/Tiny-v0":
            env_kwargs.update(eval_size=cfg.eval_size, calib_size=cfg.calib_size, device=cfg.device)
            if cfg.checkpoint:
                env_kwargs["checkpoint"] = cfg.checkpoint
            env_kwargs.update(width=cfg.width, baseline_epochs=cfg.baseline_epochs, data_dir=cfg.data_dir)
        return pruning_env.make(cfg.env, **env_kwargs)
    return make_benchmark_env(cfg.net, cfg.dataset, width=cfg.width, checkpoint=cfg.checkpoint,
                              data_dir=cfg.data_dir, baseline_epochs=cfg.baseline_epochs, device=cfg.device,
                              eval_size=cfg.eval_size, calib_size=cfg.calib_size, **env_kwargs)


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plans not dominated in (higher acc_ratio, lower macs_ratio), sorted by MACs."""
    front = []
    for p in sorted(points, key=lambda q: (q["macs_ratio"], -q["acc_ratio"])):
        if not front or p["acc_ratio"] > front[-1]["acc_ratio"]:
            front.append(p)
    return front


def budget_scaled(cfg: RunConfig) -> dict[str, Any]:
    """Exploration schedules scaled to the run's length (the algorithms' defaults assume a fixed budget).

    QMIX/VDN/IQL anneal epsilon over the first half of the env steps; AMC warms up with
    random actions for the first eighth of its episodes.
    """
    if cfg.algo in ("qmix", "vdn", "iql"):
        return {"eps_anneal_steps": max(10, cfg.episodes * cfg.episode_length // 2)}
    if cfg.algo == "amc":
        return {"warmup_episodes": max(1, cfg.episodes // 8)}
    return {}


class Search:
    """The RL search loop with TensorBoard logging, best-plan tracking and exact resume."""

    def __init__(self, cfg: RunConfig, env: FilterPruningEnv, logdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.cfg, self.env, self.logdir = cfg, env, logdir
        self.algo = agents.make_algorithm(cfg.algo, env, seed=cfg.seed, device="cpu", **budget_scaled(cfg))
        self.episode = 0
        self.best: dict[str, Any] | None = None
        self.points: list[dict[str, Any]] = []  # every distinct plan evaluated (for the Pareto front)
        self.curve: list[dict[str, float]] = []  # per episode: return, objective, acc/macs ratios
        self.greedy: list[dict[str, float]] = []
        self.writer = SummaryWriter(str(logdir / "tb"))
        self._seen: set[str] = set()

    def state_dict(self) -> dict[str, Any]:
        return {"algo": self.algo.state_dict(), "episode": self.episode, "best": self.best, "points": self.points,
                "curve": self.curve, "greedy": self.greedy, "seen": sorted(self._seen)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.algo.load_state_dict(d["algo"])
        self.episode, self.best, self.points = d["episode"], d["best"], d["points"]
        self.curve, self.greedy, self._seen = d["curve"], d["greedy"], set(d["seen"])

    def save(self) -> None:
        ckpt.atomic_save(self.state_dict(), self.logdir / STATE_FILE)

    def _record(self, info: dict[str, Any], source: str) -> None:
        plan = PruningPlan.from_dict(info["plan"])
        key = plan.key()
        point = {"acc_ratio": info["acc_ratio"], "macs_ratio": info["macs_ratio"], "objective": info["objective"],
                 "acc": info["acc"], "params_ratio": info["params_ratio"], "episode": self.episode, "source": source}
        if key not in self._seen:
            self._seen.add(key)
            self.points.append(point)
        if self.best is None or info["objective"] > self.best["objective"]:
            self.best = {**point, "plan": info["plan"]}

    def run(self) -> None:
        cfg, w = self.cfg, self.writer
        if self.episode == 0:
            w.add_text("hparams", _markdown_table(dataclasses.asdict(cfg)), 0)
            w.add_text("env_config", _markdown_table(config_dict(self.env.config)), 0)
        bar = tqdm(total=cfg.episodes, initial=self.episode, desc=f"{cfg.algo} search", disable=not cfg.progress,
                   file=sys.stderr)
        try:
            while self.episode < cfg.episodes:
                t0 = time.perf_counter()
                log = self.algo.train_episode()
                seconds = time.perf_counter() - t0
                self.episode += 1
                info = log.final_info
                self._record(info, "train")
                ep = self.episode
                self.curve.append({"episode": ep, "return": log.episode_return, "objective": info["objective"],
                                   "acc_ratio": info["acc_ratio"], "macs_ratio": info["macs_ratio"]})
                w.add_scalar("charts/episode_return", log.episode_return, ep)
                w.add_scalar("charts/acc_ratio", info["acc_ratio"], ep)
                w.add_scalar("charts/macs_ratio", info["macs_ratio"], ep)
                w.add_scalar("charts/objective", info["objective"], ep)
                w.add_scalar("charts/steps_per_second", log.length / max(seconds, 1e-9), ep)
                for k, v in log.metrics.items():
                    w.add_scalar(("charts/" if k == "epsilon" else "losses/") + k, v, ep)
                rates = [1.0 - len(k) / info["plan"]["widths"][n] for n, k in info["plan"]["keep"].items()]
                w.add_histogram("rates/per_layer", np.asarray(rates), ep)
                if ep % cfg.eval_every == 0 or ep == cfg.episodes:
                    g = self.algo.evaluate().final_info
                    self._record(g, "greedy")
                    self.greedy.append({"episode": ep, "objective": g["objective"], "acc_ratio": g["acc_ratio"],
                                        "macs_ratio": g["macs_ratio"]})
                    w.add_scalar("eval/objective", g["objective"], ep)
                    w.add_scalar("eval/acc_ratio", g["acc_ratio"], ep)
                    w.add_scalar("eval/macs_ratio", g["macs_ratio"], ep)
                # Saved after every finished episode: a Ctrl-C (or a kill) mid-episode resumes from here,
                # never from a half-updated learner.
                self.save()
                bar.update(1)
                bar.set_postfix(best=f"{self.best['objective']:.3f}", macs=f"{info['macs_ratio']:.2f}")
        except KeyboardInterrupt:
            bar.close()
            w.flush()
            raise
        bar.close()
        self.save()
        w.flush()


def _markdown_table(d: dict[str, Any]) -> str:
    return "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in d.items())


def _plots(search: Search, logdir: Path, baseline_acc: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = search.points
    ax.scatter([p["macs_ratio"] for p in pts], [p["acc_ratio"] for p in pts], s=8, alpha=0.4, label="plans evaluated")
    front = pareto_front(pts)
    ax.plot([p["macs_ratio"] for p in front], [p["acc_ratio"] for p in front], "r.-", label="Pareto front")
    if search.best:
        ax.plot([search.best["macs_ratio"]], [search.best["acc_ratio"]], "k*", ms=12, label="best (objective)")
    ax.set_xlabel("MACs ratio (pruned / unpruned)")
    ax.set_ylabel(f"validation accuracy ratio (base {baseline_acc:.1f} %)")
    ax.set_title(f"{search.cfg.algo}: accuracy vs MACs (before fine-tuning)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(logdir / "pareto.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    eps = [c["episode"] for c in search.curve]
    obj = np.asarray([c["objective"] for c in search.curve])
    ax.plot(eps, obj, alpha=0.3, label="training episode objective")
    if len(obj) >= 5:
        k = max(5, len(obj) // 20)
        ax.plot(eps[k - 1:], np.convolve(obj, np.ones(k) / k, mode="valid"), label=f"moving mean ({k})")
    if search.greedy:
        ax.plot([g["episode"] for g in search.greedy], [g["objective"] for g in search.greedy], "o-",
                label="greedy evaluation")
    ax.set_xlabel("episode")
    ax.set_ylabel("final objective (validation)")
    ax.set_title(f"{search.cfg.algo}: learning curve")
    ax.legend()
    fig.tight_layout()
    fig.savefig(logdir / "learning_curve.png", dpi=110)
    plt.close(fig)


def finish(cfg: RunConfig, env: FilterPruningEnv, search: Search, logdir: Path) -> dict[str, Any]:
    """Apply the best plan, fine-tune, evaluate on the test split and write the report."""
    device = resolve_device(cfg.device)
    splits = env.splits
    plan = PruningPlan.from_dict(search.best["plan"])
    base = env.base_model
    pruned = apply(base, plan, env.input_shape, layers=env._layers)
    shape = env.input_shape
    base_report, pruned_report = count(base, shape), count(pruned, shape)
    test = lambda m: evaluate(m, splits.test, mean=splits.mean, std=splits.std, device=device)  # noqa: E731
    baseline_test = test(base)
    if env.config.bn_recal_batches > 0:  # as the env's reward measured it: BN re-estimated
        recalibrate_bn(pruned, splits, n_batches=env.config.bn_recal_batches,
                       batch_size=env.config.bn_recal_batch_size, seed=0, device=device)
    acc_pruned = test(pruned)
    ft_cfg = FinetuneConfig(epochs=cfg.finetune_epochs, kd=cfg.kd, seed=cfg.seed, device=str(device),
                            progress=cfg.progress)
    ft = {}
    if cfg.finetune_epochs > 0:
        ft = finetune(pruned, splits, ft_cfg, teacher=base if cfg.kd else None, out=logdir / "finetune.pt",
                      resume=cfg.resume, plan=plan.to_dict(), meta={"algorithm": cfg.algo})
    test_acc = test(pruned)
    val_acc = evaluate(pruned, splits.val, mean=splits.mean, std=splits.std, device=device)
    lat = {}
    for bs in (1, 64):
        lat[f"latency_ms_b{bs}"] = measure_latency(pruned.cpu(), shape, batch_size=bs, repeats=cfg.latency_repeats)
        lat[f"baseline_latency_ms_b{bs}"] = measure_latency(base.cpu(), shape, batch_size=bs,
                                                            repeats=cfg.latency_repeats)
    pruned.to(device)
    report = {
        "algorithm": cfg.algo,
        "network": getattr(base, "arch", type(base).__name__),
        "dataset": splits.name,
        "test_acc": test_acc,
        "val_acc": val_acc,
        "test_acc_before_finetune": acc_pruned,
        "baseline_test_acc": baseline_test,
        "retention": test_acc / baseline_test if baseline_test > 0 else float("nan"),
        "macs": pruned_report.macs,
        "baseline_macs": base_report.macs,
        "macs_reduction": 1.0 - pruned_report.macs / base_report.macs,
        "params": pruned_report.params,
        "baseline_params": base_report.params,
        "params_reduction": 1.0 - pruned_report.params / base_report.params,
        **lat,
        "search": {"episodes": search.episode, "plans_evaluated": len(search.points),
                   "best_val_objective": search.best["objective"], "best_val_acc_ratio": search.best["acc_ratio"],
                   "best_macs_ratio": search.best["macs_ratio"], "reward": cfg.reward, "lam": cfg.lam},
        "finetune": {"epochs": cfg.finetune_epochs, "kd": cfg.kd,
                     **{k: v for k, v in ft.items() if k in ("val_acc", "initial_val_acc", "best_epoch", "seconds")}},
        "keep_ratios": plan.keep_ratios(),
        "plan": plan.to_dict(),
        "config": dataclasses.asdict(cfg),
    }
    (logdir / "plan.json").write_text(plan.to_json())
    ckpt.save(logdir / "pruned_model.pt", pruned, input_shape=shape, dataset=splits.name, classes=splits.classes,
              metrics={"test_acc": test_acc, "val_acc": val_acc}, plan=plan.to_dict(),
              extra={"algorithm": cfg.algo, "criterion": cfg.criterion, "direction": cfg.direction})
    (logdir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _plots(search, logdir, env.baseline_acc)
    rows = [("test accuracy (%)", f"{baseline_test:.2f}", f"{test_acc:.2f}"),
            ("retention", "1.000", f"{report['retention']:.4f}"),
            ("MACs (M)", f"{base_report.macs / 1e6:.2f}", f"{pruned_report.macs / 1e6:.2f}"),
            ("params (M)", f"{base_report.params / 1e6:.3f}", f"{pruned_report.params / 1e6:.3f}"),
            ("CPU latency b1 (ms)", f"{lat['baseline_latency_ms_b1']:.2f}", f"{lat['latency_ms_b1']:.2f}"),
            ("CPU latency b64 (ms)", f"{lat['baseline_latency_ms_b64']:.2f}", f"{lat['latency_ms_b64']:.2f}")]
    md = [f"# {cfg.algo} on {report['network']} / {splits.name}", "",
          f"MACs reduction {100 * report['macs_reduction']:.1f} %, params reduction "
          f"{100 * report['params_reduction']:.1f} %; test accuracy before fine-tuning {acc_pruned:.2f} %.", "",
          "| | baseline | pruned |", "|---|---|---|", *[f"| {a} | {b} | {c} |" for a, b, c in rows], "",
          f"Search: {search.episode} episodes, {len(search.points)} distinct plans; best validation objective "
          f"{search.best['objective']:.4f} (acc ratio {search.best['acc_ratio']:.4f}, MACs ratio "
          f"{search.best['macs_ratio']:.4f}).", "",
          "Kept filters per layer: " + ", ".join(f"{n} {len(k)}/{plan.widths[n]}" for n, k in plan.keep.items()),
          "", "![Pareto](pareto.png) ![learning curve](learning_curve.png)", ""]
    (logdir / "report.md").write_text("\n".join(md))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train_marl.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, RunConfig)
    args = parser.parse_args(argv)
    try:
        cfg = resolve(config_from_args(RunConfig, args))
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"train_marl: preset {cfg.preset!r}" + ("" if args.preset else " (chosen automatically: "
          + ("CUDA found)" if torch.cuda.is_available() else "no GPU found)")), file=sys.stderr)
    print("settings: " + json.dumps(dataclasses.asdict(cfg)), file=sys.stderr)
    logdir = Path(cfg.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    try:
        env = make_env(cfg)
        search = Search(cfg, env, logdir)
        state_file = logdir / STATE_FILE
        if cfg.resume:
            if not state_file.is_file():
                parser.exit(2, f"error: --resume given but {state_file} does not exist\n")
            search.load_state_dict(torch.load(state_file, weights_only=False))
            print(f"resuming the search after episode {search.episode}", file=sys.stderr)
        try:
            search.run()
        except KeyboardInterrupt:
            print(f"\ninterrupted: search saved to {state_file}; rerun with --resume", file=sys.stderr)
            return 130
        report = finish(cfg, env, search, logdir)
    except (ValueError, RuntimeError) as exc:
        parser.exit(2, f"error: {exc}\n")
    summary = {k: report[k] for k in ("algorithm", "test_acc", "baseline_test_acc", "retention", "macs_reduction",
                                      "params_reduction")}
    summary["logdir"] = str(logdir)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
