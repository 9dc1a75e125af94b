"""Speed and accuracy of the KL-sensitivity modes of ``pruning_env.criteria``.

For a CIFAR-10 network and one calibration batch from the TRAIN split, measures

* the time of ``kl="exact_loop"`` (one forward per filter: the definition and baseline),
  of the batched ``kl="exact"`` and of the cheap modes (``fisher``, ``fisher_delta``,
  ``linear``), and the speed-ups over the loop;
* the per-layer Spearman rank correlation of each cheap mode with ``exact``;
* the largest absolute and relative difference between ``exact`` and the loop.

The loop costs one forward of the batch per filter (about 20 minutes for VGG-16 at
width 0.5 on 2 shared CPU cores, 3 minutes at width 0.25), so for models with more than ``--full-loop-max``
filters it is timed on ``--loop-filters`` evenly spaced filters of every layer and its
total extrapolated per layer (each filter costs the same forward); the differences are
then over those filters. Smaller models get the full loop.

Usage::

    PYTHONPATH=. python benchmarks/kl_speed.py --data-dir /work/shared/data

Writes a Markdown report to ``--out`` (default ``benchmarks/results/kl_speed.md``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pruning_env.core import checkpoint  # noqa: E402

from pruning_env import criteria  # noqa: E402

from pruning_env.core import data  # noqa: E402

from pruning_env.engine import flops  # noqa: E402

from pruning_env.core import models  # noqa: E402

CHEAP_MODES = ("fisher", "fisher_delta", "linear")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--checkpoint", default=None, help="trained checkpoint of the main model; default: look for "
                   "<cache>/checkpoints/<net>-cifar10-w<width>-*.pt, else a randomly initialised network "
                   "(reported as such)")
    p.add_argument("--net", default="vgg16", choices=models.list_models(), help="architecture of the main model")
    p.add_argument("--width", type=float, default=0.5, help="width multiplier of the main model")
    p.add_argument("--batch", type=int, default=128, help="calibration images (first ones of the CIFAR-10 train split)")
    p.add_argument("--data-dir", default=None, help="folder holding cifar10 (None: $PRUNING_ENV_DATA, else the cache)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per mode (the median is reported)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kl_speed.md"), help="Markdown report")
    p.add_argument("--loop-filters", type=int, default=6, help="filters per layer timed with the loop when sampling")
    p.add_argument("--full-loop-max", type=int, default=600,
                   help="run the full loop on models with at most this many filters")
    p.add_argument("--extra", nargs="*", default=None, help="more checkpoints to report on; default: every trained "
                   "<net>-cifar10-w*-*.pt in the cache of another width")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="torch intra-op thread counts to time "
                   "with, one full measurement each (default: torch's choice, then 1: on a loaded shared machine, "
                   "1 thread is far less disturbed by other jobs)")
    return p.parse_args(argv)


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
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
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


def run_target(target: Target, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, threads: int) -> Result:
    torch.set_num_threads(threads)
    model = target.model
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    total = sum(c.out_channels for c in convs.values())
    res = Result(target, threads)
    res.mac_ratio = mac_ratio(model, tuple(x.shape[1:]))
    log(f"{target.name}, {threads} thread(s): {len(convs)} conv layers, {total} filters, "
        f"analytic MAC ratio loop/exact {res.mac_ratio:.2f}")

    t, exact = timed(lambda: criteria.score(model, x, y, "kl", kl="exact"), args.repeats)
    res.times["exact"] = t
    log(f"  exact (batched)  {t:8.2f} s")
    cheap = {}
    for mode in CHEAP_MODES:
        t, cheap[mode] = timed(lambda mode=mode: criteria.score(model, x, y, "kl", kl=mode), args.repeats)
        res.times[mode] = t
        log(f"  {mode:<16} {t:8.2f} s")

    # The loop: everything when affordable, else evenly spaced filters of each layer.
    full = total <= args.full_loop_max
    if full:
        t, loop = timed(lambda: criteria.score(model, x, y, "kl", kl="exact_loop"), 1)
        res.loop_time, res.loop_note = t, f"measured on all {total} filters"
        sampled = {n: list(range(c.out_channels)) for n, c in convs.items()}
        per_filter = {n: t / total for n in convs}
    else:
        was = {m: m.training for m in model.modules()}
        model.eval()
        loop, per_filter, sampled = {}, {}, {}
        try:
            with torch.no_grad():
                clean = model(x)
                for name, conv in convs.items():
                    k = min(args.loop_filters, conv.out_channels)
                    idx = sorted({int(round(v)) for v in np.linspace(0, conv.out_channels - 1, k)})
                    t0 = time.perf_counter()
                    loop[name] = criteria._kl_loop(model, x, {name: conv}, channels=idx, clean=clean)[name].float()
                    per_filter[name] = (time.perf_counter() - t0) / len(idx)
                    sampled[name] = idx
        finally:
            for m, mode in was.items():
                m.training = mode
        res.loop_time = sum(per_filter[n] * c.out_channels for n, c in convs.items())
        n_timed = sum(len(v) for v in sampled.values())
        res.loop_note = f"extrapolated from {n_timed} timed filters ({args.loop_filters} per layer)"
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


def fmt(v: float, nd: int = 3) -> str:
    return "n/a" if v != v else f"{v:.{nd}f}"


def report(results: list[Result], args: argparse.Namespace, meta: dict) -> str:
    lines = [
        "# KL sensitivity: speed and agreement of the KL modes",
        "",
        "Produced by `benchmarks/kl_speed.py` (see its docstring for the method).",
        "",
        f"- command: `{meta['command']}`",
        f"- git commit: {meta['commit']}",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- calibration batch: the first {args.batch} images of the CIFAR-10 train split (`load_splits('cifar10', "
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
            "| layer | filters | median KL (nats) | loop s/filter | Spearman fisher | Spearman fisher_delta | Spearman linear "
            "| max abs diff exact vs loop |",
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
        "- `fisher`: one backward; `0.5 mean_n (sum_hw a dl_n/da)^2` at the conv output (empirical Fisher, Theis et al. 2018).",
        "- `fisher_delta`: one backward; the same with the exact change of the channel after its channel-wise chain "
        "(BN, ReLU, pooling), gradient taken there.",
        "- `linear`: K backward passes (K = classes); logits linearised in that exact change, KL evaluated exactly.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or sorted({torch.get_num_threads(), 1}, reverse=True)
    load_before = os.getloadavg()
    try:
        splits = data.load_splits("cifar10", args.data_dir, download=False)
    except data.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    x, y = next(data.batches(splits.train, args.batch, mean=splits.mean, std=splits.std))

    ckpt_dir = data.cache_dir() / "checkpoints"
    tag = f"{args.width:g}"
    main_path = Path(args.checkpoint) if args.checkpoint else None
    if main_path is None:
        found = sorted(ckpt_dir.glob(f"{args.net}-cifar10-w{tag}-*.pt"))
        main_path = found[-1] if found else None
    targets: list[Target] = []
    label = f"{args.net} width {tag}, CIFAR-10, batch {args.batch}"
    if main_path is not None:
        targets.append(load_target(main_path, label))
    else:
        torch.manual_seed(0)
        model = models.build(args.net, num_classes=10, width=args.width)
        targets.append(Target(label + " (RANDOMLY INITIALISED)", model,
                              f"randomly initialised (`torch.manual_seed(0)`): no trained checkpoint of width {tag} was "
                              f"found in `{ckpt_dir}`. Timings are representative of a trained network of this size; "
                              "the rank correlations are NOT representative of a trained network"))
    extra = args.extra
    if extra is None:
        extra = [str(p) for p in sorted(ckpt_dir.glob(f"{args.net}-cifar10-w*-*.pt")) if p != main_path]
    for path in extra:
        ck_target = load_target(Path(path), f"{Path(path).stem}, batch {args.batch}")
        targets.append(ck_target)

    results = [run_target(t, x, y, args, n) for t in targets for n in threads]
    load_after = os.getloadavg()
    meta = {
        "command": "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "commit": git_commit(),
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"(timed with {' and '.join(map(str, threads))} intra-op threads), Python {platform.python_version()}, "
        "load average (1 min) "
        f"{load_before[0]:.1f} before / {load_after[0]:.1f} after",
        "data": args.data_dir or os.environ.get("PRUNING_ENV_DATA") or str(data.data_dir()),
    }
    text = report(results, args, meta)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
