"""Measured CPU (or GPU) latency of physically pruned networks against their MACs reduction.

For every network (``--nets``, ``NET:WIDTH``) it builds the unpruned model and one pruned model per
uniform rate (``--rates``; each layer loses the same fraction of its filters, kept counts by the
rate rule ``--min-keep`` / ``--round-to``, ranked by ``--criterion``, l1 by default: latency
depends only on the remaining widths, not on which filters are kept, so a data-free criterion on
randomly initialised weights gives the same timings as a trained network with DSFP scores). Then,
per batch size (``--batch-sizes``), it times single forward passes of all of them INTERLEAVED:
``--repeats`` rounds, each round one forward of every model in a rotating order, so load changes
on a shared machine hit pruned and unpruned models alike. Reported: median ms per forward,
speed-up = median(unpruned) / median(pruned), against the MACs ratio (pruned / unpruned MACs from
``pruning_env.engine.flops``); the ideal speed-up is 1 / MACs ratio. Rate 0 is the unpruned width
put through the same surgery: its speed-up shows the noise level.

Run from the repository root (every flag is a field of :class:`LatencyConfig`; ``--help``)::

    python -m benchmarks.latency                     # 5 nets x 5 rates, batch 1 and 64
    python -m benchmarks.latency --nets vgg16:0.25 --rates 0 0.5 --repeats 10
    python -m benchmarks.latency --device cuda       # GPU figures (batch 1 and 64) -> latency_cuda.md

On CUDA every timed forward is bracketed by ``torch.cuda.synchronize`` (the time is the kernels', not
the launch's); the models and inputs live on the GPU, float32 (cuDNN may use TF32, torch's default).

Writes ``--out`` (Markdown), the same path with ``.json`` (raw numbers) and ``.png`` (speed-up vs
1 / MACs ratio with the ideal line), prints the report, then one JSON line with the rows.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    atomic_write_text,
    command_line,
    commit,
    device_report,
    hold_outputs,
    log,
    machine,
    parse_config,
    parse_net,
    write_markdown,
)
from pruning_env import criteria
from pruning_env.cli.options import print_json
from pruning_env.core.config import flat_dict, nested, option, resolve_device
from pruning_env.core.models import build
from pruning_env.criteria.config import ScoringConfig
from pruning_env.engine.flops import count
from pruning_env.engine.graph import prunable_layers
from pruning_env.engine.plan import RateRule, plan_uniform
from pruning_env.engine.surgery import apply

__all__ = ["LatencyConfig", "bench_net", "interleaved_latency", "main"]

SHAPE = (3, 32, 32)
DEFAULT_NETS = ["vgg16:0.25", "vgg16:1", "alexnet:0.25", "alexnet:1", "resnet56:1"]
DATA_FREE = ("l1", "l2", "fpgm", "random")


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


@dataclass
class LatencyConfig:
    """Every flag of ``python -m benchmarks.latency`` (the command line is generated from these fields)."""

    nets: tuple[str, ...] = option(tuple(DEFAULT_NETS), "networks as NET:WIDTH (or NET: width 1)")
    uniform_rates: tuple[float, ...] = option((0.0, 0.3, 0.5, 0.7, 0.9), "uniform per-layer pruning rates in [0, 1)",
                                              aliases=("rates",))
    scoring: ScoringConfig = nested(ScoringConfig, "the (data-free) criterion ranking the filters; the timings do "
                                    "not depend on it (l1 here)", default=ScoringConfig(criterion="l1"))
    rule: RateRule = nested(RateRule, "how a rate becomes a number of kept filters")
    batch_sizes: tuple[int, ...] = option((1, 64), "batch sizes timed")
    repeats: int = option(20, "interleaved timing rounds per batch size")
    warmup: int = option(3, "untimed forward passes per model first")
    threads: int = option(2, "torch CPU threads")
    seed: int = option(0, "seed of the weights and inputs")
    device: str = option("cpu", "where the forwards run: cpu, cuda or cuda:N (auto: CUDA if present)")
    out: str | None = option(None, "Markdown report (none: benchmarks/results/latency.md, latency_cuda.md on "
                             "CUDA); raw numbers go to the same path with .json, the plot with .png")
    progress: bool = option(True, "print progress")

    def __post_init__(self) -> None:
        for item in self.nets:
            parse_net(item)
        if any(not 0 <= r < 1 for r in self.uniform_rates):
            raise ValueError(f"--rates must be in [0, 1), got {list(self.uniform_rates)}")
        if self.repeats < 1 or self.warmup < 0 or any(b < 1 for b in self.batch_sizes):
            raise ValueError("--repeats and --batch-sizes must be >= 1, --warmup >= 0")
        resolve_device(self.device)  # a clear error now when CUDA is asked for and absent
        if self.scoring.needs_data:
            raise ValueError(f"--criterion must be a data-free one ({', '.join(DATA_FREE)}), "
                             f"got {self.scoring.criterion!r}")


@torch.inference_mode()
def interleaved_latency(models: list[torch.nn.Module], batch_size: int, repeats: int, warmup: int,
                        seed: int = 0, device: torch.device | None = None) -> list[list[float]]:
    """Per model, ``repeats`` wall-clock times (ms) of one forward of a ``(batch_size, *SHAPE)`` input.

    Each round times every model once, in an order rotated by one per round, so drifts of the
    machine's load are shared by all models instead of biasing whichever is timed last. The models
    must live on ``device`` (default CPU); on CUDA each forward is timed between two synchronisations.
    """
    device = device if device is not None else torch.device("cpu")
    cuda = device.type == "cuda"
    x = torch.randn(batch_size, *SHAPE, generator=torch.Generator().manual_seed(seed)).to(device)
    for m in models:
        m.eval()
        for _ in range(warmup):
            m(x)
    times: list[list[float]] = [[] for _ in models]
    n = len(models)
    for r in range(repeats):
        for j in range(n):
            i = (j + r) % n
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            models[i](x)
            if cuda:
                torch.cuda.synchronize(device)
            times[i].append(1000.0 * (time.perf_counter() - t0))
    return times


def bench_net(net: str, width: float, cfg: LatencyConfig) -> list[dict[str, Any]]:
    """One row per rate of ``cfg.uniform_rates``: MACs and params ratios, latencies and speed-ups per batch size."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    base = build(net, num_classes=10, width=width).eval()
    layers = prunable_layers(base, SHAPE)
    base_report = count(base, SHAPE)
    scores = criteria.score(base, None, None, cfg.scoring.criterion, layers=[layer.name for layer in layers],
                            **cfg.scoring.options(seed=cfg.seed))
    rows, models = [], [base]
    for rate in cfg.uniform_rates:
        plan = plan_uniform(scores, rate, min_keep=cfg.rule.min_keep, round_to=cfg.rule.round_to)
        pruned = apply(base, plan, SHAPE, layers=layers).eval().to(device)
        rep = count(pruned, SHAPE)
        models.append(pruned)
        rows.append({"net": net, "width": width, "rate": rate, "macs": rep.macs, "params": rep.params,
                     "macs_ratio": rep.macs / base_report.macs, "params_ratio": rep.params / base_report.params,
                     "base_macs": base_report.macs, "base_params": base_report.params})
    base.to(device)
    for b in cfg.batch_sizes:
        times = interleaved_latency(models, b, cfg.repeats, cfg.warmup, cfg.seed, device)
        base_ms = statistics.median(times[0])
        for row, t in zip(rows, times[1:]):
            ms = statistics.median(t)
            row[f"base_ms_b{b}"] = base_ms
            row[f"ms_b{b}"] = ms
            row[f"speedup_b{b}"] = base_ms / ms
            # Paired per round: robust to slow drifts of the machine's load.
            row[f"speedup_paired_b{b}"] = statistics.median(tb / tp for tb, tp in zip(times[0], t))
    return rows


def write_report(rows: list[dict[str, Any]], cfg: LatencyConfig, meta: dict[str, Any], out: Path) -> None:
    bs = list(cfg.batch_sizes)
    head = ["net", "width", "rate", "MACs ratio", "params ratio", "ideal speed-up (1/MACs ratio)"]
    for b in bs:
        head += [f"latency b{b} ms", f"speed-up b{b}"]
    lines = [
        f"# {'GPU' if meta['device'].startswith('cuda') else 'CPU'} latency of pruned networks vs MACs", "",
        f"Command: `{meta['command']}`  ", f"Commit: {meta['commit']}  ",
        f"Machine: {meta['machine']}, device {meta['device']}  ",
        f"Date: {meta['date']}; wall time {meta['wall_s'] / 60:.1f} min; load average {meta['load_before']} before, "
        f"{meta['load_after']} after  ",
        f"Method: uniform `{cfg.scoring.criterion}` plans{_rule_note(cfg.rule)} (latency depends only on the widths), "
        f"randomly initialised weights, float32, eval mode, `torch.inference_mode`, {SHAPE} inputs; per batch size, "
        f"{cfg.warmup} warm-up passes per model, then {cfg.repeats} interleaved rounds (one forward of every model "
        "per round, rotating order). Latency = median ms per forward; speed-up = median unpruned / median pruned "
        "(the JSON also has the per-round paired ratio); rate 0 = the unpruned widths through the same surgery "
        "(noise level).", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["net"], f"{r['width']:g}", f"{r['rate']:.0%}", f"{r['macs_ratio']:.3f}", f"{r['params_ratio']:.3f}",
                 f"{1 / r['macs_ratio']:.2f}x"]
        for b in bs:
            cells += [f"{r[f'ms_b{b}']:.2f}", f"{r[f'speedup_b{b}']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    base_rows = {(r["net"], r["width"]): r for r in rows}
    lines += ["", "Unpruned latency (median ms): " + "; ".join(
        f"{n} w{w:g}: " + ", ".join(f"b{b} {r[f'base_ms_b{b}']:.2f}" for b in bs)
        for (n, w), r in base_rows.items()), ""]
    # Data-driven summary: how much of the ideal speed-up is realised.
    summary = []
    for b in bs:
        eff = [(r[f"speedup_b{b}"] - 1) / (1 / r["macs_ratio"] - 1) for r in rows if r["macs_ratio"] < 0.95]
        if eff:
            summary.append(f"batch {b}: {statistics.median(eff):.0%} (range {min(eff):.0%} to {max(eff):.0%})")
    if summary:
        lines += ["Share of the ideal gain realised, (speed-up - 1) / (1 / MACs ratio - 1), median over the pruned "
                  "rows with MACs ratio < 0.95: " + "; ".join(summary) + ".", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    if _plot(rows, bs, png):
        lines += [f"![speed-up vs 1/MACs ratio]({png.name})", ""]
    write_markdown(out, "\n".join(lines))


def _plot(rows: list[dict[str, Any]], bs: list[int], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    configs = list(dict.fromkeys((r["net"], r["width"]) for r in rows))
    colors = plt.get_cmap("tab10").colors
    markers = "os^Dv<>"
    hi = 1.0
    for ci, (net, w) in enumerate(configs):
        rs = [r for r in rows if (r["net"], r["width"]) == (net, w)]
        xs = [1 / r["macs_ratio"] for r in rs]
        hi = max(hi, *xs)
        for bi, b in enumerate(bs):
            ys = [r[f"speedup_b{b}"] for r in rs]
            hi = max(hi, *ys)
            ax.plot(xs, ys, ("-" if bi == 0 else "--") + markers[bi % len(markers)], color=colors[ci % 10],
                    mfc=colors[ci % 10] if bi == 0 else "none", label=f"{net} w{w:g}, batch {b}")
    ax.plot([1, hi], [1, hi], "k:", label="ideal (speed-up = 1 / MACs ratio)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("1 / MACs ratio (MACs reduction factor)")
    ax.set_ylabel("measured speed-up")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _rule_note(rule: RateRule) -> str:
    """The rate rule in words when it is not the default (at least 1 filter kept, no rounding)."""
    if rule == RateRule():
        return ""
    return f" (at least {rule.min_keep} filters kept, counts rounded to multiples of {rule.round_to})"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(LatencyConfig, argv, "latency", __doc__)
    device, out = device_report(cfg.out, cfg.device, "latency")
    with hold_outputs("latency", files=[("--out", out)]):
        return _main(cfg, argv, device, out)


def _main(cfg: LatencyConfig, argv: list[str] | None, device: torch.device, out: Path) -> int:
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    load_before = _load()
    rows: list[dict[str, Any]] = []
    for item in cfg.nets:
        net, width = parse_net(item)
        if cfg.progress:
            log(f"{net} w{width:g} ...")
        rows += bench_net(net, width, cfg)
    meta = {"command": command_line("latency", argv), "commit": commit(), "machine": machine(), "device": str(device),
            "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "wall_s": time.time() - t0,
            "load_before": load_before, "load_after": _load()}
    write_report(rows, cfg, meta, out)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"meta": meta, "args": flat_dict(cfg), "rows": rows},
                                                           indent=1))
    print(out.read_text())
    print_json({"report": str(out), "json": str(out.with_suffix(".json")), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
