"""Surgery speed: pruning_env.engine.apply vs Torch-Pruning (DepGraph), side by side.

For each network, one random plan at ``--rate`` (uniform per layer, kept counts by the rate
rule ``--min-keep`` / ``--round-to``) is applied ``--repeats`` times and the median
wall-clock time is reported:

* ``ours (layers cached)``: ``apply(model, plan, layers=layers)``, the RL env's hot
  path (the prunable layers are found once per network);
* ``ours (cold)``: ``apply(model, plan)``, which also traces the model with torch.fx;
* ``Torch-Pruning``: ``copy.deepcopy(model)`` (Torch-Pruning prunes in place) +
  ``DependencyGraph().build_dependency`` + one ``get_pruning_group(...).prune()``
  per layer; ``prune only`` is the last part alone.

It also times the MACs of the pruned network: ``MacsModel.predict`` (no model
built) vs ``flops.count`` on the pruned model vs ``tp.utils.count_ops_and_params``,
and checks that both surgeries give the same outputs (max abs difference).

Run from the repository root (every flag is a field of :class:`SurgerySpeedConfig`; ``--help``)::

    python -m benchmarks.surgery_speed
    python -m benchmarks.surgery_speed --nets vgg16:0.25 --repeats 5 --no-write

Writes the report to ``--out`` (unless ``--no-write``), prints the tables, then one JSON line
with the rows.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import (
    command_line,
    commit,
    hold_outputs,
    log,
    machine,
    parse_config,
    parse_net,
    results_path,
    write_markdown,
)
from pruning_env.cli.options import print_json
from pruning_env.core.config import nested, option
from pruning_env.core.models import build
from pruning_env.engine import flops
from pruning_env.engine.graph import prunable_layers
from pruning_env.engine.macs import MacsModel
from pruning_env.engine.plan import RateRule, plan_uniform
from pruning_env.engine.surgery import apply

__all__ = ["SurgerySpeedConfig", "bench_one", "main"]

SHAPE = (3, 32, 32)


@dataclass
class SurgerySpeedConfig:
    """Every flag of ``python -m benchmarks.surgery_speed`` (the command line is generated from these fields)."""

    nets: tuple[str, ...] = option(("vgg16:0.25", "vgg16:1", "resnet56:1"), "networks as arch:width")
    rate: float = option(0.5, "uniform pruning rate of the random plan, in [0, 1)")
    rule: RateRule = nested(RateRule, "how the rate becomes a number of kept filters")
    repeats: int = option(20, "timed repetitions per measurement (median)")
    threads: int = option(1, "torch intra-op threads (1 is stable on a shared CPU)")
    seed: int = option(0, "seed of the models and plans")
    out: str | None = option(None, "markdown report to write (none: benchmarks/results/surgery_speed.md)")
    write: bool = option(True, "write --out (--no-write: print only)")

    def __post_init__(self) -> None:
        for spec in self.nets:
            parse_net(spec)
        if not 0 <= self.rate < 1:
            raise ValueError(f"--rate must be in [0, 1), got {self.rate}")
        if self.repeats < 1 or self.threads < 1:
            raise ValueError("--repeats and --threads must be >= 1")


def _median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_one(arch: str, width: float, rate: float, repeats: int, seed: int, tp,
              rule: RateRule | None = None) -> dict:
    """Timings of one network (``tp``: the torch_pruning module, or None to time ours only)."""
    rule = rule if rule is not None else RateRule()
    torch.manual_seed(seed)
    model = build(arch, num_classes=10, width=width).eval()
    layers = prunable_layers(model, SHAPE)
    gen = torch.Generator().manual_seed(seed)
    plan = plan_uniform({layer.name: torch.rand(layer.out_channels, generator=gen) for layer in layers}, rate,
                        min_keep=rule.min_keep, round_to=rule.round_to)
    row: dict = {"net": f"{arch} w{width:g}", "layers": len(layers)}
    row["ours_warm"] = _median_seconds(lambda: apply(model, plan, SHAPE, layers=layers), repeats)
    row["ours_cold"] = _median_seconds(lambda: apply(model, plan, SHAPE), max(3, repeats // 4))
    ours = apply(model, plan, SHAPE, layers=layers)
    macs_model = MacsModel.from_model(model, SHAPE, layers=layers)
    counts = plan.keep_counts()
    row["predict"] = _median_seconds(lambda: macs_model.predict(counts), repeats * 50)
    row["count"] = _median_seconds(lambda: flops.count(ours, SHAPE), repeats)
    row["macs_reduction"] = 1 - macs_model.predict(counts)[0] / macs_model.base_macs
    if tp is not None:
        example = torch.randn(1, *SHAPE)

        def tp_prune(m: torch.nn.Module, graph) -> None:
            modules = dict(m.named_modules())
            for layer in layers:
                pruned = list(plan.pruned(layer.name))
                if pruned:
                    graph.get_pruning_group(modules[layer.name], tp.prune_conv_out_channels, idxs=pruned).prune()

        def tp_total() -> torch.nn.Module:
            m = copy.deepcopy(model)
            graph = tp.DependencyGraph().build_dependency(m, example_inputs=example, verbose=False)
            tp_prune(m, graph)
            return m

        row["tp_total"] = _median_seconds(tp_total, max(3, repeats // 4))
        prune_times = []
        for _ in range(max(3, repeats // 4)):
            m = copy.deepcopy(model)
            graph = tp.DependencyGraph().build_dependency(m, example_inputs=example, verbose=False)
            t0 = time.perf_counter()
            tp_prune(m, graph)
            prune_times.append(time.perf_counter() - t0)
        row["tp_prune"] = statistics.median(prune_times)
        theirs = tp_total().eval()
        row["tp_count"] = _median_seconds(lambda: tp.utils.count_ops_and_params(theirs, example), max(3, repeats // 4))
        x = torch.randn(8, *SHAPE)
        with torch.no_grad():
            row["max_abs_diff"] = float((ours(x) - theirs(x)).abs().max())
    return row


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(SurgerySpeedConfig, argv, "surgery_speed", __doc__)
    out = results_path(cfg.out, "surgery_speed.md")
    with hold_outputs("surgery_speed", files=[("--out", out)] if cfg.write else []):
        return _main(cfg, argv, out)


def _main(cfg: SurgerySpeedConfig, argv: list[str] | None, out: Path) -> int:
    torch.set_num_threads(cfg.threads)
    try:
        import torch_pruning as tp
    except ImportError:
        tp = None
        print("torch-pruning is not installed: only our timings are shown (pip install torch-pruning)",
              file=sys.stderr)
    machine_start = machine()
    rows = []
    for spec in cfg.nets:
        arch, width = parse_net(spec)
        rows.append(bench_one(arch, width, cfg.rate, cfg.repeats, cfg.seed, tp, cfg.rule))
        log(f"done {spec}")

    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{1000 * x:.2f}"

    lines = [
        "| net | prunable layers | MACs removed | ours, layers cached (ms) | ours, cold (ms) | "
        "Torch-Pruning total (ms) | TP prune only (ms) | TP total / ours cached | TP total / ours cold | "
        "max abs output diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tp_total = r.get("tp_total")
        warm_ratio = "n/a" if tp_total is None else f"{tp_total / r['ours_warm']:.1f}x"
        cold_ratio = "n/a" if tp_total is None else f"{tp_total / r['ours_cold']:.1f}x"
        diff = "n/a" if tp_total is None else f"{r['max_abs_diff']:.1e}"
        lines.append(
            f"| {r['net']} | {r['layers']} | {100 * r['macs_reduction']:.1f} % | {ms(r['ours_warm'])} | "
            f"{ms(r['ours_cold'])} | {ms(tp_total)} | {ms(r.get('tp_prune'))} | {warm_ratio} | {cold_ratio} | {diff} |"
        )
    lines += [
        "",
        "| net | MacsModel.predict (us) | flops.count on pruned model (ms) | tp.utils.count_ops_and_params (ms) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['net']} | {1e6 * r['predict']:.1f} | {ms(r['count'])} | {ms(r.get('tp_count'))} |")
    table = "\n".join(lines)
    print(table)
    if cfg.write:
        tp_version = getattr(tp, "__version__", "not installed") if tp is not None else "not installed"
        rule = "" if cfg.rule == RateRule() else (f" (at least {cfg.rule.min_keep} filters kept, counts rounded to "
                                                  f"multiples of {cfg.rule.round_to})")
        text = (
            "# Surgery speed: pruning_env.engine.apply vs Torch-Pruning DepGraph\n\n"
            f"Command: `{command_line('surgery_speed', argv)}`\n\n"
            f"Commit: {commit()}\n\n"
            f"Machine (at start): {machine_start}\n\n"
            f"Torch-Pruning: {tp_version}. Random plan at a uniform rate of {cfg.rate} per prunable layer{rule}; "
            f"medians of {cfg.repeats} repetitions (cold and Torch-Pruning: {max(3, cfg.repeats // 4)}). "
            "Timings are wall-clock on a CPU shared with other jobs: compare the ratios, not absolute values.\n\n"
            f"{table}\n\n"
            "Columns: *ours, layers cached* = `apply(model, plan, layers=layers)` (the env's hot path); "
            "*cold* also traces the model with torch.fx; *Torch-Pruning total* = `deepcopy` + "
            "`DependencyGraph().build_dependency` + `get_pruning_group(...).prune()` per layer (it prunes in "
            "place, so a copy is needed to keep the original); *prune only* = the group pruning alone, on a "
            "graph already built.\n"
        )
        write_markdown(out, text)
        log(f"wrote {out}")
    print_json({"report": str(out) if cfg.write else None, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
