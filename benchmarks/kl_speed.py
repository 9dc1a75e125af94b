"""Speed and accuracy of the KL-sensitivity modes of ``pruning_env.criteria``.

For a CIFAR-10 network and one calibration batch from the TRAIN split, measures

* the time of ``kl="exact_loop"`` (one forward per filter: the definition and baseline),
  of the batched ``kl="exact"`` and of the cheap modes (``fisher``, ``fisher_delta``,
  ``linear``), and the speed-ups over the loop;
* the per-layer Spearman rank correlation of each cheap mode with ``exact``;
* the largest absolute and relative difference between ``exact`` and the loop.

The loop costs one forward of the batch per filter (its measured times: ``benchmarks/results/kl_speed.md``),
so for models with more than ``--full-loop-max`` filters it is timed on ``--loop-filters`` evenly spaced
filters of every layer and its total extrapolated per layer (each filter costs the same forward); the
differences are then over those filters. Smaller models get the full loop.

Usage (from the repository root)::

    python -m benchmarks.kl_speed --data-dir /work/shared/data

Every flag is a field of :class:`KLSpeedConfig` (``--help`` lists them). Writes a Markdown
report to ``--out`` (default ``benchmarks/results/kl_speed.md``) and prints it, then one
JSON line with the headline numbers.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from benchmarks.common import hold_outputs, parse_config, write_markdown
from pruning_env import criteria
from pruning_env.cli.options import print_json
from pruning_env.core import checkpoint, data, models
from pruning_env.core.config import option
from pruning_env.core.fx import preserved_modes
from pruning_env.criteria.kl_exact import kl_loop
from pruning_env.engine import flops

__all__ = ["KLSpeedConfig", "main"]

ROOT = Path(__file__).resolve().parents[1]
CHEAP_MODES = ("fisher", "fisher_delta", "linear")


@dataclass
class KLSpeedConfig:
    """What the KL benchmark measures, on which models, and where it writes."""

    checkpoint: str | None = option(None, "trained checkpoint of the main model; none: the newest "
                                    "<cache>/checkpoints/<net>-cifar10-w<width>-*.pt, else a randomly initialised "
                                    "network (reported as such)")
    net: str = option("vgg16", "architecture of the main model", choices=models.list_models())
    width: float = option(0.5, "width multiplier of the main model")
    batch: int = option(128, "calibration images (the first ones of the CIFAR-10 train split)")
    data_dir: str | None = option(None, "folder holding cifar10; none: $PRUNING_ENV_DATA, else the cache")
    repeats: int = option(1, "timed runs per mode (the median is reported)")
    out: str | None = option(None, "Markdown report; none: benchmarks/results/kl_speed.md in the repository")
    loop_filters: int = option(6, "filters per layer timed with the loop when sampling")
    full_loop_max: int = option(600, "run the full loop on models with at most this many filters")
    extra: tuple[str, ...] | None = option(None, "more checkpoints to report on")
    find_extra: bool = option(True, "also report on every trained <net>-cifar10-w*-*.pt of another width in the "
                              "cache (--no-find-extra: only the main model and --extra)")
    threads: tuple[int, ...] | None = option(None, "torch intra-op thread counts to time with, one full "
                                             "measurement each; none: torch's choice, then 1 (on a loaded shared "
                                             "machine, 1 thread is far less disturbed by other jobs)")

    def __post_init__(self) -> None:
        # argparse gives lists; keep the declared immutable tuples
        self.extra = None if self.extra is None else tuple(self.extra)
        self.threads = None if self.threads is None else tuple(int(t) for t in self.threads)
        for name in ("batch", "repeats", "loop_filters", "full_loop_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


@dataclass
class Target:
    name: str
    model: nn.Module
    note: str


@dataclass
class Result:
    target: Target
    threads: int
    times: dict[str, float] = field(default_factory=dict)
    loop_time: float = 0.0
    loop_note: str = ""
    layers: list[dict] = field(default_factory=list)
    max_abs: float = 0.0
    max_rel: float = 0.0
    compared: int = 0
    mac_ratio: float = float("nan")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        if out.returncode != 0:
            return "none (the repository has no commit yet)"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_target(path: Path, label: str) -> Target:
    ck = checkpoint.load(path)
    epoch = ck.extra.get("train_state", {}).get("epoch") if isinstance(ck.extra.get("train_state"), dict) else None
    metrics = ", ".join(f"{k} {v:.2f}" for k, v in ck.metrics.items())
    note = f"trained checkpoint `{path}` ({metrics}{f', epoch {epoch}' if epoch is not None else ''})"
    return Target(label, ck.model, note)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 3 or float(a.std()) == 0 or float(b.std()) == 0:
        return float("nan")
    return float(spearmanr(a.double().numpy(), b.double().numpy())[0])


def mac_ratio(model: nn.Module, input_shape: tuple[int, int, int]) -> float:
    """Loop MACs / batched-exact MACs, counting convs and Linears in registration order
    (right for plain sequential networks such as VGG/AlexNet): filter F of layer L costs
    the loop a whole forward, the batched mode the layers after L's next conv plus that
    conv on one input channel."""
    macs = flops.count(model, input_shape).per_layer_macs
    mods = dict(model.named_modules())
    names = [n for n in macs if isinstance(mods[n], (nn.Conv2d, nn.Linear))]
    full = sum(macs[n] for n in names)
    loop = batched = 0.0
    for i, name in enumerate(names):
        if not isinstance(mods[name], nn.Conv2d):
            continue
        c = mods[name].out_channels
        rest = names[i + 1 :]
        nxt = rest[0] if rest and isinstance(mods[rest[0]], nn.Conv2d) else None
        suffix = sum(macs[n] for n in rest)
        if nxt is not None:
            suffix -= macs[nxt] - macs[nxt] / mods[nxt].in_channels
        loop += c * full
        batched += c * suffix
    return loop / batched


def run_target(target: Target, x: torch.Tensor, y: torch.Tensor, cfg: KLSpeedConfig, threads: int) -> Result:
    torch.set_num_threads(threads)
    model = target.model
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    total = sum(c.out_channels for c in convs.values())
    res = Result(target, threads)
    res.mac_ratio = mac_ratio(model, tuple(x.shape[1:]))
    log(f"{target.name}, {threads} thread(s): {len(convs)} conv layers, {total} filters, "
        f"analytic MAC ratio loop/exact {res.mac_ratio:.2f}")

    t, exact = timed(lambda: criteria.score(model, x, y, "kl", kl="exact"), cfg.repeats)
    res.times["exact"] = t
    log(f"  exact (batched)  {t:8.2f} s")
    cheap = {}
    for mode in CHEAP_MODES:
        t, cheap[mode] = timed(lambda mode=mode: criteria.score(model, x, y, "kl", kl=mode), cfg.repeats)
        res.times[mode] = t
        log(f"  {mode:<16} {t:8.2f} s")

    # The loop: everything when affordable, else evenly spaced filters of each layer.
    full = total <= cfg.full_loop_max
    if full:
        t, loop = timed(lambda: criteria.score(model, x, y, "kl", kl="exact_loop"), 1)
        res.loop_time, res.loop_note = t, f"measured on all {total} filters"
        sampled = {n: list(range(c.out_channels)) for n, c in convs.items()}
        per_filter = {n: t / total for n in convs}
    else:
        loop, per_filter, sampled = {}, {}, {}
        with preserved_modes(model), torch.no_grad():
            model.eval()
            clean = model(x)
            for name, conv in convs.items():
                k = min(cfg.loop_filters, conv.out_channels)
                idx = sorted({round(v) for v in np.linspace(0, conv.out_channels - 1, k)})
                t0 = time.perf_counter()
                loop[name] = kl_loop(model, x, {name: conv}, channels=idx, clean=clean)[name].float()
                per_filter[name] = (time.perf_counter() - t0) / len(idx)
                sampled[name] = idx
        res.loop_time = sum(per_filter[n] * c.out_channels for n, c in convs.items())
        n_timed = sum(len(v) for v in sampled.values())
        res.loop_note = f"extrapolated from {n_timed} timed filters ({cfg.loop_filters} per layer)"
    log(f"  exact_loop       {res.loop_time:8.2f} s ({res.loop_note})")

    for name, conv in convs.items():
        idx = sampled[name]
        e, lp = exact[name].double()[idx], loop[name].double()[idx]
        diff = (e - lp).abs()
        rel = diff / lp.abs().clamp_min(1e-12)
        res.max_abs = max(res.max_abs, float(diff.max()))
        res.max_rel = max(res.max_rel, float(rel[lp.abs() > 1e-9].max()) if bool((lp.abs() > 1e-9).any()) else 0.0)
        res.compared += len(idx)
        row = {"layer": name, "filters": conv.out_channels, "loop_s_per_filter": per_filter[name],
               "max_abs": float(diff.max()), "kl_median": float(exact[name].median())}
        for mode in CHEAP_MODES:
            row[mode] = spearman(exact[name], cheap[mode][name])
        if full:
            row["loop_rho"] = spearman(exact[name], loop[name])
        res.layers.append(row)
    return res


def summary(results: list[Result], out: Path, config: dict) -> dict:
    """The final JSON line: per model and thread count, the times (s), speed-ups over the loop,
    median Spearman correlations with ``exact`` and the exact-vs-loop differences."""
    rows = []
    for r in results:
        rhos = {mode: [row[mode] for row in r.layers if row[mode] == row[mode]] for mode in CHEAP_MODES}
        rows.append({
            "model": r.target.name, "threads": r.threads, "loop_s": r.loop_time, "times_s": r.times,
            "speedup": {mode: r.loop_time / t for mode, t in r.times.items() if t > 0},
            "median_spearman": {m: float(np.median(v)) if v else None for m, v in rhos.items()},
            "max_abs_diff": r.max_abs, "max_rel_diff": r.max_rel, "compared_filters": r.compared,
            "mac_ratio": r.mac_ratio,
        })
    return {"benchmark": "kl_speed", "out": str(out), "config": config, "results": rows}


def fmt(v: float, nd: int = 3) -> str:
    return "n/a" if v != v else f"{v:.{nd}f}"


def report(results: list[Result], cfg: KLSpeedConfig, meta: dict) -> str:
    lines = [
        "# KL sensitivity: speed and agreement of the KL modes",
        "",
        "Produced by `benchmarks/kl_speed.py` (see its docstring for the method).",
        "",
        f"- command: `{meta['command']}`",
        f"- git commit: {meta['commit']}",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- calibration batch: the first {cfg.batch} images of the CIFAR-10 train split (`load_splits('cifar10', "
        f"split_seed=0)`, JPEG copy) from `{meta['data']}`, normalised with the split's mean/std",
        "- KL definition: `KL(softmax(z) || softmax(z_F))`, filter F's conv output channel zeroed before its BN, "
        "model in eval mode, summed over classes, averaged over the batch",
        "- the machine is shared with other jobs (2 cores): absolute times are noisy; all modes of one model "
        "and thread count ran back to back under the same load",
        "",
    ]
    by_target: dict[int, list[Result]] = {}
    for res in results:
        by_target.setdefault(id(res.target), []).append(res)
    for runs in by_target.values():
        res = runs[0]  # correlations and differences: from the first run (the values do not depend on threads)
        t = res.target
        lines += [f"## {t.name}", "", f"Model: {t.note}.", ""]
        head = "| mode | " + " | ".join(f"time (s), {r.threads} thr. | speed-up, {r.threads} thr." for r in runs)
        lines += [head + " | median Spearman vs exact | min Spearman vs exact |",
                  "|---|" + "---:|---:|" * len(runs) + "---:|---:|"]
        cells = " | ".join(f"{r.loop_time:.1f} | 1.0x" for r in runs)
        lines.append(f"| exact_loop | {cells} | 1 | 1 |")
        for mode in ("exact", *CHEAP_MODES):
            rhos = [r[mode] for r in res.layers if mode in r and r[mode] == r[mode]]
            med = "1 (same values)" if mode == "exact" else fmt(float(np.median(rhos))) if rhos else "n/a"
            mn = "" if mode == "exact" else fmt(float(np.min(rhos))) if rhos else "n/a"
            cells = " | ".join(f"{r.times[mode]:.2f} | {r.loop_time / r.times[mode]:.1f}x" for r in runs)
            lines.append(f"| {mode} | {cells} | {med} | {mn} |")
        lines += [
            "",
            f"exact_loop times: {'; '.join(f'{r.threads} thr.: {r.loop_note}' for r in runs)}.",
            "",
            f"Analytic ceiling: the loop does {res.mac_ratio:.2f}x the multiply-accumulates of batched `exact` "
            "(each filter needs the network after its layer; the next conv is done on one channel). Wall-clock "
            "speed-ups above that come from doing the same work more efficiently (channels-last layout, BatchNorm "
            "folded into the convs, large batches) or from the loop's small batches suffering more from other "
            "jobs on the machine.",
            "",
            f"Batched `exact` vs the loop over {res.compared} filters: max |difference| = {res.max_abs:.3g} nats, "
            f"max relative difference = {res.max_rel:.3g} (filters with KL > 1e-9).",
            "",
            "| layer | filters | median KL (nats) | loop s/filter | Spearman fisher | Spearman fisher_delta "
            "| Spearman linear | max abs diff exact vs loop |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res.layers:
            lines.append(
                f"| {r['layer']} | {r['filters']} | {r['kl_median']:.3g} | {r['loop_s_per_filter']:.3f} | "
                f"{fmt(r['fisher'])} | {fmt(r['fisher_delta'])} | {fmt(r['linear'])} | {r['max_abs']:.2g} |"
            )
        lines.append("")
    lines += [
        "## Modes",
        "",
        "- `exact_loop`: one forward of the batch per filter, a hook zeroes the channel (the definition).",
        "- `exact`: the same values; clean forward cached, the graph suffix after the conv run once per chunk of "
        "filters with the change carried channel-wise through BN/ReLU/pooling, the next conv as clean output + a "
        "grouped conv of the change, (filter, image) pairs with no change skipped, channels-last layout and "
        "eval-mode BatchNorms folded into the convs; one filter per layer re-checked against the loop (included "
        "in the time).",
        "- `fisher`: one backward; `0.5 mean_n (sum_hw a dl_n/da)^2` at the conv output (empirical Fisher, "
        "Theis et al. 2018).",
        "- `fisher_delta`: one backward; the same with the exact change of the channel after its channel-wise chain "
        "(BN, ReLU, pooling), gradient taken there.",
        "- `linear`: K backward passes (K = classes); logits linearised in that exact change, KL evaluated exactly.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(KLSpeedConfig, argv, "kl_speed", __doc__)
    out = Path(cfg.out) if cfg.out else ROOT / "benchmarks" / "results" / "kl_speed.md"
    with hold_outputs("kl_speed", files=[("--out", out)]):
        return _main(cfg, argv, out)


def _main(cfg: KLSpeedConfig, argv: list[str] | None, out: Path) -> int:
    threads = list(cfg.threads or sorted({torch.get_num_threads(), 1}, reverse=True))
    load_before = os.getloadavg()
    try:
        splits = data.load_splits("cifar10", cfg.data_dir, download=False)
    except data.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    x, y = next(data.batches(splits.train, cfg.batch, mean=splits.mean, std=splits.std))

    ckpt_dir = data.cache_dir() / "checkpoints"
    tag = f"{cfg.width:g}"
    main_path = Path(cfg.checkpoint) if cfg.checkpoint else None
    if main_path is None:
        found = sorted(ckpt_dir.glob(f"{cfg.net}-cifar10-w{tag}-*.pt"))
        main_path = found[-1] if found else None
    targets: list[Target] = []
    label = f"{cfg.net} width {tag}, CIFAR-10, batch {cfg.batch}"
    if main_path is not None:
        targets.append(load_target(main_path, label))
    else:
        torch.manual_seed(0)
        model = models.build(cfg.net, num_classes=10, width=cfg.width)
        targets.append(Target(label + " (RANDOMLY INITIALISED)", model,
                              f"randomly initialised (`torch.manual_seed(0)`): no trained checkpoint of width {tag} "
                              f"was found in `{ckpt_dir}`. Timings are representative of a trained network of this "
                              "size; the rank correlations are NOT representative of a trained network"))
    extra = list(cfg.extra or ())
    if cfg.find_extra:
        extra += [str(p) for p in sorted(ckpt_dir.glob(f"{cfg.net}-cifar10-w*-*.pt"))
                  if p != main_path and str(p) not in extra]
    for path in extra:
        ck_target = load_target(Path(path), f"{Path(path).stem}, batch {cfg.batch}")
        targets.append(ck_target)

    results = [run_target(t, x, y, cfg, n) for t in targets for n in threads]
    load_after = os.getloadavg()
    meta = {
        "command": "python -m benchmarks.kl_speed " + shlex.join(sys.argv[1:] if argv is None else argv),
        "commit": git_commit(),
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"(timed with {' and '.join(map(str, threads))} intra-op threads), Python {platform.python_version()}, "
        "load average (1 min) "
        f"{load_before[0]:.1f} before / {load_after[0]:.1f} after",
        "data": cfg.data_dir or os.environ.get("PRUNING_ENV_DATA") or str(data.data_dir()),
    }
    text = report(results, cfg, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(out, text)
    print(text)
    log(f"wrote {out}")
    print_json(summary(results, out, asdict(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
