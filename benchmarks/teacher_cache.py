"""Teacher cache: a KD fine-tune with the teacher's outputs memoised vs computed, side by side.

A benchmark that fine-tunes many pruned networks with one recipe and seed (the reward-fidelity
truth, ``benchmarks.marl``'s final fine-tunes, the env's KD proxy) replays the same augmented
batches for every plan, so the unpruned teacher's forward pass can be computed once per batch
(:class:`pruning_env.training.teacher.TeacherCache`). For each MACs level (``--rates``: uniform
pruning rates, random filter scores), this times ``--repeats`` alternating fine-tunes of
``--images`` training images: without the cache, and with a cache warmed by one earlier run,
and checks that both end with bit-identical weights.

    python -m benchmarks.teacher_cache                        # VGG-16 w0.25, CIFAR-10 (or synthetic data)
    python -m benchmarks.teacher_cache --threads 1 --repeats 5 --no-write

Writes ``--out`` (default ``benchmarks/results/teacher_cache.md``) and prints one JSON line.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import command_line, commit, hold_outputs, machine, parse_config, results_path, write_markdown
from pruning_env.cli.options import print_json
from pruning_env.core.config import option
from pruning_env.core.data import load_splits
from pruning_env.core.models import build
from pruning_env.engine.flops import count
from pruning_env.engine.graph import prunable_layers
from pruning_env.engine.plan import plan_uniform
from pruning_env.engine.surgery import apply
from pruning_env.training.finetune import FinetuneConfig, finetune
from pruning_env.training.teacher import TeacherCache


@dataclass
class TeacherCacheBenchConfig:
    """Every flag of benchmarks/teacher_cache.py."""

    net: str = option("vgg16", "network (random weights: the timing does not depend on them)")
    width: float = option(0.25, "channel width", min=0, min_exclusive=True)
    dataset: str = option("cifar10", "data set (synthetic when it is not available)")
    data_dir: str | None = option(None, "data directory (default: $PRUNING_ENV_DATA, else the cache)")
    rates: list[float] = option([0.3, 0.45], "uniform pruning rates to time (about MACs 0.5 and 0.3 on VGG-16)",
                                min=0, max=1, max_exclusive=True)
    images: int = option(2560, "training images per timed fine-tune (one epoch)", min=1)
    batch_size: int = option(128, "batch size", min=1)
    repeats: int = option(3, "timed runs of each kind (alternating)", min=1)
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)")
    out: str | None = option(None, "report path (default benchmarks/results/teacher_cache.md)")
    write: bool = option(True, "write the report")


def _splits(cfg: TeacherCacheBenchConfig):
    try:
        splits = load_splits(cfg.dataset, cfg.data_dir)
    except (FileNotFoundError, RuntimeError, ValueError, OSError) as exc:
        print(f"teacher_cache: {cfg.dataset} not available ({exc}); timing on synthetic data", file=sys.stderr)
        splits = load_splits("synthetic")
    # the timed part is the training loop: a small validation split keeps model selection out of it
    return dataclasses.replace(splits, train=splits.train.subset(cfg.images), val=splits.val.subset(256))


def run(cfg: TeacherCacheBenchConfig) -> list[dict]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    splits = _splits(cfg)
    torch.manual_seed(0)
    teacher = build(cfg.net, num_classes=splits.num_classes, width=cfg.width).eval()
    layers = prunable_layers(teacher)
    base_macs = count(teacher, splits.input_shape).macs
    ft = FinetuneConfig(epochs=1, batch_size=cfg.batch_size, device="cpu", progress=False)
    rows = []
    for rate in cfg.rates:
        gen = torch.Generator().manual_seed(0)
        plan = plan_uniform({lay.name: torch.rand(lay.out_channels, generator=gen) for lay in layers}, rate)
        student = apply(teacher, plan, splits.input_shape, layers=layers)
        macs = count(student, splits.input_shape).macs / base_macs
        cache = TeacherCache(teacher)
        finetune(apply(teacher, plan, splits.input_shape, layers=layers), splits, ft, teacher=teacher,
                 teacher_cache=cache)  # warms the cache
        times: dict[str, list[float]] = {"computed": [], "cached": []}
        finals = {}
        for _ in range(cfg.repeats):
            for kind in ("computed", "cached"):
                net = apply(teacher, plan, splits.input_shape, layers=layers)
                t0 = time.perf_counter()
                finetune(net, splits, ft, teacher=teacher, teacher_cache=cache if kind == "cached" else None)
                times[kind].append(time.perf_counter() - t0)
                finals[kind] = net.state_dict()
        same = all(torch.equal(finals["computed"][k], finals["cached"][k]) for k in finals["computed"])
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"rate": rate, "macs_ratio": macs, "seconds_computed": med["computed"],
                     "seconds_cached": med["cached"], "speedup": med["computed"] / med["cached"],
                     "identical_weights": same, "hits": cache.hits, "misses": cache.misses})
    return rows


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TeacherCacheBenchConfig, argv, "teacher_cache", __doc__)
    out = results_path(cfg.out, "teacher_cache.md")
    with hold_outputs("teacher_cache", files=[("--out", out)] if cfg.write else []):
        return _main(cfg, argv, out)


def _main(cfg: TeacherCacheBenchConfig, argv: list[str] | None, out: Path) -> int:
    rows = run(cfg)
    lines = ["# Teacher cache: KD fine-tuning with the teacher's outputs memoised vs computed", "",
             f"Command: `{command_line('teacher_cache', argv)}`  ", f"Commit: `{commit()}`  ",
             f"Machine: {machine()}  ",
             f"{cfg.net} width {cfg.width:g}, {cfg.images} training images per fine-tune (1 epoch, batch "
             f"{cfg.batch_size}), median of {cfg.repeats} alternating runs each; the cache was warmed by one earlier "
             "run with the same seed (as every plan after the first in a benchmark).", "",
             "| rate | MACs ratio | computed (s) | cached (s) | speed-up | identical weights |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rate']:g} | {r['macs_ratio']:.3f} | {r['seconds_computed']:.2f} | "
                     f"{r['seconds_cached']:.2f} | {r['speedup']:.2f}x | {'yes' if r['identical_weights'] else 'NO'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if cfg.write:
        write_markdown(out, text)
    print_json({"rows": rows})
    return 0 if all(r["identical_weights"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
