"""Per-step cost of the pruning env, against the bare work a step must do and a naive step.

For each network it runs random episodes (every plan new, so no cache hits) and prints:

* the per-step time split: scoring (DSFP grad/Taylor forward-backward on the pruned
  network), surgery (physical pruning), BN recalibration, evaluation, other;
* steps per second;
* ratio 1 = whole step / (bare scoring + bare evaluation of the same pruned network,
  timed side by side in this run) - the overhead of the env (target <= 1.2 with BN
  recalibration off, which is what "scoring plus evaluating" is; also shown with it on);
* ratio 2 = naive step / env step, where the naive step is what one would write
  without this package: ``copy.deepcopy`` of the model + Torch-Pruning DepGraph
  pruning of the same filters + the same scoring + evaluation.

    python benchmarks/env_step.py                  # Tiny, VGG-16 w0.25 (trained if cached), VGG-16 w1
    python benchmarks/env_step.py --nets tiny vgg16-0.25 --steps 9
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pruning_env.criteria import compute_components  # noqa: E402
from pruning_env.core.data import load_splits  # noqa: E402
from pruning_env.envs.env import FilterPruningEnv  # noqa: E402
from pruning_env.core.evaluation import evaluate  # noqa: E402
from pruning_env.core.models import build  # noqa: E402
from pruning_env.engine.surgery import apply  # noqa: E402
from pruning_env.envs.registry import make_tiny_env  # noqa: E402
from pruning_env.training.train import default_checkpoint_path  # noqa: E402
from pruning_env.core.provenance import git_commit, machine_description  # noqa: E402


def _commit() -> str:
    return git_commit(Path(__file__).resolve().parents[1])


def _machine() -> str:
    return machine_description()



def _make_env(name: str, data_dir: str | None, bn_recal: int) -> tuple[FilterPruningEnv, str]:
    if name == "tiny":
        return make_tiny_env(bn_recal_batches=bn_recal), "trained (Tiny-v0 cache)"
    net, width = name.split("-")
    width_f = float(width)
    splits = load_splits("cifar10", data_dir)
    path = default_checkpoint_path(net, "cifar10", width_f, 30)
    if path.is_file():
        from pruning_env.core.checkpoint import load

        model, note = load(path).model, f"trained ({path.name})"
    else:
        torch.manual_seed(0)
        model, note = build(net, num_classes=10, width=width_f), "random init (no cached baseline: timing only)"
    # The KL of the unpruned network is computed once per env and is not part of a step: use fisher to keep
    # the setup short for width 1 (it does not change the step's cost).
    kl = "exact" if width_f <= 0.5 else "fisher"
    return FilterPruningEnv(model, splits, bn_recal_batches=bn_recal, kl=kl), note


def _naive_step(env: FilterPruningEnv, plan) -> None:
    """deepcopy + Torch-Pruning + the same scoring and evaluation."""
    import torch_pruning as tp

    model = copy.deepcopy(env.base_model)
    example = torch.zeros(1, *env.input_shape)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    modules = dict(model.named_modules())
    for name in env.layer_names:
        kept = set(plan.keep[name])
        pruned = [i for i in range(plan.widths[name]) if i not in kept]
        if pruned:
            group = dg.get_pruning_group(modules[name], tp.prune_conv_out_channels, idxs=pruned)
            group.prune()
    compute_components(model, env._calib_x, env._calib_y, layers=None, kl=None)
    evaluate(model, env.splits.val, mean=env.splits.mean, std=env.splits.std, limit=env.config.eval_size,
             batch_size=env.config.eval_batch_size)


def bench(name: str, steps: int, data_dir: str | None, naive: bool) -> dict[str, float | str]:
    rows: dict[str, float | str] = {"net": name}
    for bn_recal in (0, 2):
        env, note = _make_env(name, data_dir, bn_recal)
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
            model = apply(env.base_model, env.plan, env.input_shape, layers=env._layers)
            t0 = time.perf_counter()
            compute_components(model, env._calib_x, env._calib_y, layers=env.layer_names, kl=None)
            evaluate(model, env.splits.val, mean=env.splits.mean, std=env.splits.std, limit=env.config.eval_size,
                     batch_size=env.config.eval_batch_size)
            bare_times.append(time.perf_counter() - t0)
            if naive and bn_recal == 0:
                t0 = time.perf_counter()
                _naive_step(env, env.plan)
                naive_times.append(time.perf_counter() - t0)
        total = sum(step_times)
        suffix = "" if bn_recal == 0 else "_recal"
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=["tiny", "vgg16-0.25", "vgg16-1"],
                        help="tiny and/or <net>-<width> (CIFAR-10; trained baseline from the cache if present)")
    parser.add_argument("--steps", type=int, default=9, help="env steps timed per network")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 location (default: $PRUNING_ENV_DATA)")
    parser.add_argument("--no-naive", action="store_true", help="skip the deepcopy + Torch-Pruning naive step")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "env_step.md"),
                        help="Markdown file for the results table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [bench(n, args.steps, args.data_dir, not args.no_naive) for n in args.nets]
    header = ("| net | model | step ms | steps/s | scoring | surgery | evaluation | other | step / (scoring+eval) "
              "| with BN recal: step ms | bn_recal share | step / (scoring+eval) | naive ms | naive / env |")
    lines = [header, "|" + "---|" * 14]
    for r in results:
        lines.append(
            f"| {r['net']} | {r['model']} | {r['step_ms']:.1f} | {r['steps_per_s']:.2f} | {r['scoring']:.0%} | "
            f"{r['surgery']:.0%} | {r['evaluation']:.0%} | {r['other']:.0%} | **{r['ratio_bare']:.2f}** | "
            f"{r['step_ms_recal']:.1f} | {r['bn_recal_recal']:.0%} | {r['ratio_bare_recal']:.2f} | "
            f"{r.get('naive_ms', float('nan')):.1f} | {r.get('ratio_naive', float('nan')):.2f} |")
    cmd = "python benchmarks/env_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = "\n".join([
        "# Env step cost", "",
        f"Command: `{cmd.strip()}`  ", f"Commit: {_commit()}  ",
        f"Machine: {_machine()}  ", f"Steps timed per net: {args.steps} (random actions, new plans: no cache hits)",
        "", *lines, "",
        "Columns: the time split of a step (shares of the step), the ratio of a whole step to the bare cost of "
        "scoring (one forward/backward for DSFP's grad and Taylor) plus evaluating the same pruned network "
        "(timed side by side), the same with the default BN recalibration (2 batches of 128) on, and a naive "
        "step: `copy.deepcopy` + Torch-Pruning DepGraph on the same filters + the same scoring and evaluation.",
        ""])
    Path(args.out).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
