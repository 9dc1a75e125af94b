"""Per-step cost of the pruning env, against the bare work a step must do and a naive step.

For each network it runs random episodes (every plan new, so no cache hits) and prints:

* the per-step time split: scoring (DSFP grad/Taylor forward-backward on the pruned
  network), surgery (physical pruning), BN recalibration, evaluation, other;
* steps per second;
* ratio 1 = whole step / (bare scoring + bare evaluation of the same pruned network,
  timed side by side in this run) - the overhead of the env (target <= 1.2 with BN
  recalibration off, which is what "scoring plus evaluating" is; also shown with it on,
  ``--bn-recal-batches`` batches of ``--bn-recal-batch-size``);
* ratio 2 = naive step / env step, where the naive step is what one would write
  without this package: ``copy.deepcopy`` of the model + Torch-Pruning DepGraph
  pruning of the same filters + the same scoring + evaluation.

The env is read through its public surface only (``layers``, ``plan``,
``calibration_batch``, ``timings``...). Run from the repository root (every flag is a
field of :class:`EnvStepConfig`; ``--help``)::

    python -m benchmarks.env_step                  # Tiny, VGG-16 w0.25 (trained if cached), VGG-16 w1
    python -m benchmarks.env_step --nets tiny vgg16-0.25 --steps 9
    python -m benchmarks.env_step --device cuda    # GPU figures (step time at width 1) -> env_step_cuda.md

On CUDA the env, its base network and the bare work run on the GPU (the split resident there); a
step's time is exact (it ends by reading the accuracy, a synchronisation), while the phase shares
(``env.timings``) are host times of asynchronous kernels there: read them as indicative only.

Writes the Markdown table to ``--out`` and prints it, then one JSON line with the rows.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    command_line,
    commit,
    device_report,
    hold_outputs,
    machine,
    parse_config,
    parse_net,
    require_torch_pruning,
    write_markdown,
)
from pruning_env.cli.options import print_json
from pruning_env.core.checkpoint import load
from pruning_env.core.config import nested, option, resolve_device
from pruning_env.core.data import load_splits
from pruning_env.core.evaluation import evaluate
from pruning_env.core.models import build
from pruning_env.criteria import compute_components
from pruning_env.engine.bn import BNRecalConfig
from pruning_env.engine.plan import PruningPlan
from pruning_env.engine.surgery import apply
from pruning_env.envs.env import FilterPruningEnv
from pruning_env.envs.registry import make_tiny_env
from pruning_env.training.train import default_checkpoint_path

__all__ = ["EnvStepConfig", "bench", "main"]


@dataclass
class EnvStepConfig:
    """Every flag of ``python -m benchmarks.env_step`` (the command line is generated from these fields)."""

    nets: tuple[str, ...] = option(("tiny", "vgg16-0.25", "vgg16-1"), "tiny and/or <net>-<width> (CIFAR-10; "
                                   "trained baseline from the cache if present, else random weights)")
    steps: int = option(9, "env steps timed per network (and per BN setting)")
    data_dir: str | None = option(None, "CIFAR-10 location (none: $PRUNING_ENV_DATA, else the cache)")
    naive: bool = option(True, "also time the naive step (deepcopy + Torch-Pruning); --no-naive skips it")
    bn: BNRecalConfig = nested(
        BNRecalConfig, "BN re-estimation of the second measurement (the 'with BN recal' columns; the first has it "
        "off)")
    threads: int = option(2, "torch CPU threads")
    device: str = option("cpu", "where the env runs: cpu, cuda or cuda:N (auto: CUDA if present)")
    out: str | None = option(None, "Markdown file for the results table (none: benchmarks/results/env_step.md, "
                             "env_step_cuda.md on CUDA)")

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        for name in self.nets:
            if name != "tiny":
                parse_net(name, sep="-")
        resolve_device(self.device)  # a clear error now when CUDA is asked for and absent


def _make_env(name: str, data_dir: str | None, bn: BNRecalConfig,
              device: torch.device) -> tuple[FilterPruningEnv, str]:
    bn_kwargs = dataclasses.asdict(bn)
    if name == "tiny":
        return make_tiny_env(device=str(device), **bn_kwargs), "trained (Tiny-v1 cache)"
    net, width = parse_net(name, sep="-")
    splits = load_splits("cifar10", data_dir)
    path = default_checkpoint_path(net, "cifar10", width, 30)
    if path.is_file():
        model, note = load(path).model, f"trained ({path.name})"
    else:
        torch.manual_seed(0)
        model, note = build(net, num_classes=10, width=width), "random init (no cached baseline: timing only)"
    # The KL of the unpruned network is computed once per env and is not part of a step: use fisher to keep
    # the setup short for width 1 (it does not change the step's cost).
    kl = "exact" if width <= 0.5 else "fisher"
    return FilterPruningEnv(model, splits, kl=kl, device=device, **bn_kwargs), note


def _score_and_evaluate(env: FilterPruningEnv, model: torch.nn.Module, layers: list[str] | None) -> None:
    """The bare work of a step on a pruned network: DSFP's grad/Taylor pass and the reward's evaluation."""
    images, labels = env.calibration_batch
    compute_components(model, images, labels, layers=layers, kl=None)
    evaluate(model, env.splits.val, mean=env.splits.mean, std=env.splits.std, limit=env.config.eval_size,
             batch_size=env.config.eval_batch_size, device=env.device)


def _naive_step(env: FilterPruningEnv, plan: PruningPlan) -> None:
    """deepcopy + Torch-Pruning + the same scoring and evaluation."""
    import torch_pruning as tp

    model = copy.deepcopy(env.base_model)
    example = torch.zeros(1, *env.input_shape, device=env.device)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    modules = dict(model.named_modules())
    for name in env.layer_names:
        kept = set(plan.keep[name])
        pruned = [i for i in range(plan.widths[name]) if i not in kept]
        if pruned:
            group = dg.get_pruning_group(modules[name], tp.prune_conv_out_channels, idxs=pruned)
            group.prune()
    _score_and_evaluate(env, model, None)


def bench(name: str, steps: int, data_dir: str | None, naive: bool,
          bn: BNRecalConfig | None = None, device: str = "cpu") -> dict[str, float | str]:
    """The row of one network: env steps with BN re-estimation off, then with ``bn`` (default 2 batches)."""
    bn = bn if bn is not None else BNRecalConfig()
    dev = resolve_device(device)
    rows: dict[str, float | str] = {"net": name}
    for off, setting in ((True, dataclasses.replace(bn, bn_recal_batches=0)), (False, bn)):
        env, note = _make_env(name, data_dir, setting, dev)
        rows["model"] = note
        rng = np.random.default_rng(0)
        env.reset(seed=0)
        env.timings.clear()
        step_times, bare_times, naive_times = [], [], []
        done = 0
        while done < steps:
            if not env.agents:
                env.reset()
            actions = {a: int(rng.integers(1, len(env.config.rates))) for a in env.agents}
            t0 = time.perf_counter()
            env.step(actions)
            step_times.append(time.perf_counter() - t0)
            done += 1
            # The bare work of that step, side by side: scoring + evaluating the same pruned network.
            model = apply(env.base_model, env.plan, env.input_shape, layers=env.layers)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)  # the surgery's copies are not part of the bare work
            t0 = time.perf_counter()
            _score_and_evaluate(env, model, env.layer_names)
            bare_times.append(time.perf_counter() - t0)
            if naive and off:
                t0 = time.perf_counter()
                _naive_step(env, env.plan)
                naive_times.append(time.perf_counter() - t0)
        total = sum(step_times)
        suffix = "" if off else "_recal"
        split = {k: v / total for k, v in env.timings.items()}
        split["other"] = max(0.0, 1.0 - sum(split.values()))
        rows[f"step_ms{suffix}"] = 1000 * statistics.median(step_times)
        rows[f"steps_per_s{suffix}"] = len(step_times) / total
        rows[f"ratio_bare{suffix}"] = total / sum(bare_times)
        for k in ("scoring", "surgery", "bn_recal", "evaluation", "other"):
            rows[f"{k}{suffix}"] = split.get(k, 0.0)
        if naive_times:
            rows["naive_ms"] = 1000 * statistics.median(naive_times)
            rows["ratio_naive"] = sum(naive_times) / total
    return rows


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(EnvStepConfig, argv, "env_step", __doc__)
    device, out = device_report(cfg.out, cfg.device, "env_step")
    with hold_outputs("env_step", files=[("--out", out)]):
        return _main(cfg, argv, device, out)


def _main(cfg: EnvStepConfig, argv: list[str] | None, device: torch.device, out: Path) -> int:
    if cfg.naive:
        try:
            require_torch_pruning("--naive (the deepcopy + Torch-Pruning step it compares with)")
        except ValueError as exc:
            print(f"error: {exc}; or pass --no-naive", file=sys.stderr)
            return 2
    torch.set_num_threads(cfg.threads)
    results = [bench(n, cfg.steps, cfg.data_dir, cfg.naive, cfg.bn, cfg.device) for n in cfg.nets]
    header = ("| net | model | step ms | steps/s | scoring | surgery | evaluation | other | step / (scoring+eval) "
              "| with BN recal: step ms | bn_recal share | step / (scoring+eval) | naive ms | naive / env |")
    lines = [header, "|" + "---|" * 14]
    for r in results:
        lines.append(
            f"| {r['net']} | {r['model']} | {r['step_ms']:.1f} | {r['steps_per_s']:.2f} | {r['scoring']:.0%} | "
            f"{r['surgery']:.0%} | {r['evaluation']:.0%} | {r['other']:.0%} | **{r['ratio_bare']:.2f}** | "
            f"{r['step_ms_recal']:.1f} | {r['bn_recal_recal']:.0%} | {r['ratio_bare_recal']:.2f} | "
            f"{r.get('naive_ms', float('nan')):.1f} | {r.get('ratio_naive', float('nan')):.2f} |")
    default_bn = ", the default" if cfg.bn == BNRecalConfig() else ""
    md = "\n".join([
        "# Env step cost", "",
        f"Command: `{command_line('env_step', argv)}`  ", f"Commit: {commit()}  ",
        f"Machine: {machine()}, device {device}  ",
        f"Steps timed per net: {cfg.steps} (random actions, new plans: no cache hits)",
        "", *lines, "",
        "Columns: the time split of a step (shares of the step), the ratio of a whole step to the bare cost of "
        "scoring (one forward/backward for DSFP's grad and Taylor) plus evaluating the same pruned network "
        f"(timed side by side), the same with BN recalibration on ({cfg.bn.bn_recal_batches} batches of "
        f"{cfg.bn.bn_recal_batch_size}{default_bn}), and a naive step: `copy.deepcopy` + Torch-Pruning DepGraph on "
        "the same filters + the same scoring and evaluation.",
        ""])
    write_markdown(out, md)
    print(md)
    print_json({"report": str(out), "rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
