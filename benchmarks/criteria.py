"""Filter-importance criteria head to head: DSFP (both directions, exact and Fisher KL) vs the baselines.

For every network (CIFAR-10, trained baseline from the cache, trained here if missing), every
criterion variant and every uniform pruning rate it:

1. scores the filters of every prunable conv on ONE calibration batch drawn from the TRAINING
   split (``--calib-size`` images, ``--calib-seed``); scores are computed once per (net, criterion)
   and reused by every rate: the exact KL, the expensive part, is computed once per net and shared
   by ``kl`` and both ``dsfp-*-exact`` variants (the DSFP fusion is recomputed from the cached
   grad/Taylor/KL components exactly as ``pruning_env.criteria.score`` does). Scores are also
   cached on disk (``--scores-cache``), so a rerun does not pay for them again;
2. prunes the same fraction of every layer (``plan_uniform``: lowest scores first), physically;
3. measures TEST accuracy right after pruning, after BatchNorm recalibration
   (``--bn-recal-batches`` training batches) and after a fixed knowledge-distillation fine-tuning
   budget (``--finetune-epochs`` over at most ``--finetune-limit`` training images, teacher = the
   unpruned network; model selection inside fine-tuning uses the VALIDATION split);
4. reports MACs / parameter reductions and retention = test accuracy / baseline test accuracy, next
   to the DSFP paper's claim (98.23 % retention at 70 % pruning, after up to 700 epochs of
   fine-tuning).

Criterion variants (``--criteria``): ``dsfp-<low|high>-<kl mode>`` (``low`` prunes the lowest fused
score, as the paper's code; ``high`` the highest, as its text), ``kl`` / ``kl-<mode>``, ``grad``,
``taylor``, ``l1``, ``l2``, ``taylor_fo``, ``fpgm``, ``random``. ``random`` runs once per seed of
``--seeds`` (scores, BN recalibration and fine-tuning all use that seed) and is reported as
mean +- std; the deterministic criteria run with the first seed only (``--all-seeds`` runs every
criterion with every seed, to measure the fine-tuning noise).

Progress is checkpointed: every finished row is appended to the JSON (``--out`` with suffix
``.json``) and, with ``--resume`` (default), rows already there are skipped, so an interrupted run
loses at most the row in flight. The Markdown report (``--out``), the JSON and a PNG of retention
vs rate are rewritten after every row; the report's "Conclusion" is generated from the numbers.

    PYTHONPATH=. python benchmarks/criteria.py --data-dir /work/shared/data
    PYTHONPATH=. python benchmarks/criteria.py --report-only          # rebuild .md/.png from the JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pruning_env.core import checkpoint as ckpt  # noqa: E402
from pruning_env import criteria  # noqa: E402
from pruning_env.core.config import resolve_device  # noqa: E402
from pruning_env.core.data import Split, Splits, batches, load_splits  # noqa: E402
from pruning_env.core.evaluation import evaluate  # noqa: E402
from pruning_env.training.finetune import FinetuneConfig, finetune  # noqa: E402
from pruning_env.engine.bn import recalibrate_bn  # noqa: E402
from pruning_env.engine.graph import prunable_layers  # noqa: E402
from pruning_env.engine.macs import MacsModel  # noqa: E402
from pruning_env.engine.surgery import apply  # noqa: E402
from pruning_env.engine.plan import plan_uniform  # noqa: E402
from pruning_env.training.train import TrainConfig, default_checkpoint_path, train, with_legacy_values  # noqa: E402
from pruning_env.core.provenance import git_commit, machine_description  # noqa: E402


def _commit() -> str:
    return git_commit(Path(__file__).resolve().parents[1])


def _machine() -> str:
    return machine_description()


PAPER_RETENTION = 98.23  # DSFP abstract: % of the baseline accuracy kept at 70 % pruning
PAPER_RATE = 0.7
DEFAULT_VARIANTS = ["dsfp-low-exact", "dsfp-low-fisher", "dsfp-high-exact", "dsfp-high-fisher", "grad", "taylor",
                    "kl", "l1", "l2", "taylor_fo", "fpgm", "random"]
JSON_FORMAT = "pruning_env.bench.criteria/1"
STAGES = ("pruned", "bn", "ft")
STAGE_NAMES = {"pruned": "after pruning", "bn": "after BN recalibration", "ft": "after KD fine-tuning"}


# ----------------------------------------------------------------------------- criterion variants


@dataclass(frozen=True)
class Variant:
    """One row label of the tables: a criterion of ``pruning_env.criteria`` plus its options."""

    name: str
    criterion: str
    direction: str | None = None
    kl: str | None = None

    @property
    def seeded(self) -> bool:
        """Whether the scores themselves depend on the seed."""
        return self.criterion == "random"


def parse_variant(name: str) -> Variant:
    """``dsfp-low-exact`` -> Variant("dsfp-low-exact", "dsfp", "low", "exact"); ``kl`` = ``kl-exact``."""
    parts = name.split("-")
    if parts[0] == "dsfp":
        if len(parts) != 3 or parts[1] not in criteria.DIRECTIONS or parts[2] not in criteria.KL_MODES:
            raise ValueError(f"{name!r}: write dsfp variants as dsfp-<{'|'.join(criteria.DIRECTIONS)}>-"
                             f"<{'|'.join(criteria.KL_MODES)}>, e.g. dsfp-low-exact")
        return Variant(name, "dsfp", parts[1], parts[2])
    if parts[0] == "kl":
        if len(parts) > 2 or (len(parts) == 2 and parts[1] not in criteria.KL_MODES):
            raise ValueError(f"{name!r}: write kl or kl-<{'|'.join(criteria.KL_MODES)}>")
        return Variant(name, "kl", None, parts[1] if len(parts) == 2 else "exact")
    if name not in criteria.list_criteria() or name == "dsfp":
        raise ValueError(f"unknown criterion variant {name!r}; choose from {', '.join(DEFAULT_VARIANTS)} "
                         f"(dsfp-<low|high>-<kl mode>, kl-<kl mode>, kl modes: {', '.join(criteria.KL_MODES)})")
    return Variant(name, name)


class ScoreBank:
    """Scores of one network on one calibration batch, computed once and cached in memory and on disk.

    Primitives are cached: ``gradpass`` (grad and Taylor from one forward/backward), ``kl:<mode>``, and
    each data-free criterion; DSFP is fused from them with :func:`pruning_env.criteria.fuse`, which is
    exactly what ``criteria.score(..., "dsfp", ...)`` computes.
    """

    def __init__(self, model: torch.nn.Module, layer_names: list[str], images: torch.Tensor, labels: torch.Tensor,
                 disk: dict[str, Any], key: str, save) -> None:
        self.model, self.layer_names, self.images, self.labels = model, layer_names, images, labels
        self.disk, self.key, self._save = disk, key, save

    def _primitive(self, prim: str) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
        entry = self.disk.get(f"{self.key}|{prim}")
        if entry is None:
            t0 = time.perf_counter()
            if prim == "gradpass":
                comps = criteria.compute_components(self.model, self.images, self.labels, layers=self.layer_names,
                                                    kl=None)
                parts = {"grad": comps.grad, "taylor": comps.taylor}
            elif prim.startswith("kl:"):
                parts = {"kl": criteria.score(self.model, self.images, self.labels, "kl", layers=self.layer_names,
                                              kl=prim[3:])}
            elif prim.startswith("random:"):
                parts = {"s": criteria.score(self.model, None, None, "random", layers=self.layer_names,
                                             seed=int(prim.split(":")[1]))}
            else:
                images, labels = (None, None) if prim in ("l1", "l2", "fpgm") else (self.images, self.labels)
                parts = {"s": criteria.score(self.model, images, labels, prim, layers=self.layer_names)}
            entry = {"parts": parts, "seconds": time.perf_counter() - t0}
            self.disk[f"{self.key}|{prim}"] = entry
            self._save()
        return entry["parts"], float(entry["seconds"])

    def scores(self, variant: Variant, seed: int) -> tuple[dict[str, torch.Tensor], float]:
        """``(scores, seconds it took to compute them from scratch)``; low = pruned first."""
        c = variant.criterion
        if c in ("grad", "taylor"):
            parts, sec = self._primitive("gradpass")
            return parts[c], sec
        if c == "kl":
            parts, sec = self._primitive(f"kl:{variant.kl}")
            return parts["kl"], sec
        if c == "dsfp":
            gp, sec_g = self._primitive("gradpass")
            klp, sec_k = self._primitive(f"kl:{variant.kl}")
            fused = criteria.fuse(gp["grad"], gp["taylor"], klp["kl"])
            return (fused if variant.direction == "low" else {n: -v for n, v in fused.items()}), sec_g + sec_k
        parts, sec = self._primitive(f"random:{seed}" if c == "random" else c)
        return parts["s"], sec


# ----------------------------------------------------------------------------- helpers


def _file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _calibration_batch(splits: Splits, n: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(splits.train), generator=gen)[: min(n, len(splits.train))]
    subset = Split(splits.train.images[idx], splits.train.labels[idx])
    return next(batches(subset, len(subset), mean=splits.mean, std=splits.std, device=device))


def _eval_subset(split: Split, limit: int | None) -> Split:
    """``limit`` examples drawn with a fixed seed (the image-folder test split is sorted by class, so its first
    N images would be one or two classes only); the whole split when ``limit`` is None."""
    if limit is None or limit >= len(split):
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:limit]
    return Split(split.images[idx], split.labels[idx])


def _parse_epochs(items: list[str], nets: list[str]) -> dict[str, int]:
    """``["30", "alexnet=15"]`` -> {net: epochs} for every net (a bare number is the default)."""
    default, per_net = None, {}
    for item in items:
        net, sep, value = item.rpartition("=")
        try:
            epochs = int(value)
        except ValueError:
            raise ValueError(f"--baseline-epochs entries are N or NET=N, got {item!r}") from None
        if epochs < 1:
            raise ValueError(f"--baseline-epochs must be >= 1, got {item!r}")
        if sep:
            per_net[net] = epochs
        else:
            default = epochs
    out = {}
    for net in nets:
        if net not in per_net and default is None:
            raise ValueError(f"no --baseline-epochs for {net}: add {net}=N or a bare default N")
        out[net] = per_net.get(net, default)
    return out


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def _fmt(mean: float, std: float | None, digits: int = 2) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


# ----------------------------------------------------------------------------- baselines


def ensure_baseline(net: str, epochs: int, args: argparse.Namespace, say) -> tuple[Path, dict[str, Any]]:
    """The cached baseline of ``net`` (trained now if missing and ``--train-missing``); returns (path, info)."""
    path = default_checkpoint_path(net, args.dataset, args.width, epochs, seed=args.baseline_seed)
    info: dict[str, Any] = {}
    if not path.is_file():
        if not args.train_missing:
            raise ValueError(f"no baseline at {path}; train it with python -m pruning_env.train --net {net} "
                             f"--width {args.width:g} --epochs {epochs} --dataset {args.dataset}, or pass "
                             "--train-missing")
        say(f"training the {net} baseline ({epochs} epochs) into {path} ...")
        summary = train(TrainConfig(net=net, dataset=args.dataset, data_dir=args.data_dir, width=args.width,
                                    epochs=epochs, seed=args.baseline_seed, device=args.device, out=str(path),
                                    progress=args.progress))
        info = {"trained_by_benchmark": True, "train_seconds": summary["seconds"]}
    loaded = ckpt.load(path, expect_arch=net)
    state = loaded.extra.get("train_state")
    done = state.get("epoch") if isinstance(state, dict) else None
    if "test_acc" not in loaded.metrics or (done is not None and done < epochs):
        data_dir = f" --data-dir {args.data_dir}" if args.data_dir else ""
        raise ValueError(f"the baseline {path} is not finished (epoch {done}/{epochs}): wait for its training, or "
                         f"resume it with python -m pruning_env.train --net {net} --width {args.width:g} "
                         f"--epochs {epochs} --dataset {args.dataset}{data_dir} --resume")
    return path, info


def describe_training(cfg: dict[str, Any] | None) -> str:
    """One line saying how a baseline was trained, from its checkpoint's ``train_config``.

    Options a checkpoint predates count as off (``train.with_legacy_values``).
    """
    if not cfg:
        return "unknown recipe"
    cfg = with_legacy_values(cfg)
    aug = f"crop (padding {cfg['crop_padding']}) + flip" + (f" + Cutout {cfg['cutout']}" if cfg["cutout"] else "")
    extras = [f"{cfg['aug_copies']} augmented copies per image"] if cfg["aug_copies"] > 1 else []
    extras += [f"weight EMA {cfg['ema_decay']}"] if cfg["ema_decay"] else []
    extras += [f"SAM rho {cfg['sam_rho']}"] if cfg["sam_rho"] else []
    return (f"{cfg.get('epochs')} epochs, SGD Nesterov lr {cfg.get('lr')} ({cfg.get('schedule')}), batch "
            f"{cfg.get('batch_size')}, wd {cfg.get('weight_decay')}, label smoothing {cfg.get('label_smoothing')}, "
            + ", ".join([aug, *extras]) + f", seed {cfg.get('seed')}, val split {cfg.get('val_fraction')}")


# ----------------------------------------------------------------------------- one row


def run_row(net_ctx: dict[str, Any], variant: Variant, rate: float, seed: int, args: argparse.Namespace,
            device: torch.device) -> dict[str, Any]:
    base, splits, layers, macs_model = net_ctx["model"], net_ctx["splits"], net_ctx["layers"], net_ctx["macs"]
    t0 = time.perf_counter()
    scores, score_s = net_ctx["bank"].scores(variant, seed)
    plan = plan_uniform(scores, rate, min_keep=1, round_to=1)
    pruned = apply(base, plan, splits.input_shape, layers=layers).eval()
    macs, params = macs_model.predict_plan(plan)

    def accuracy() -> dict[str, float]:
        return {s: evaluate(pruned, net_ctx["eval"][s], mean=splits.mean, std=splits.std, device=device)
                for s in ("val", "test")}

    acc: dict[str, dict[str, float] | None] = {"pruned": accuracy(), "bn": None, "ft": None}
    recalibrate_bn(pruned, splits, args.bn_recal_batches, 128, seed, device)
    acc["bn"] = accuracy()
    ft: dict[str, Any] = {}
    if args.finetune_epochs:
        train_split = splits.train.subset(args.finetune_limit) if args.finetune_limit else splits.train
        ft_splits = dataclasses.replace(splits, train=train_split)
        cfg = FinetuneConfig(epochs=args.finetune_epochs, optimizer=args.finetune_optimizer, lr=args.finetune_lr,
                             kd=True, temperature=4.0, seed=seed, device=str(device), progress=False)
        summary = finetune(pruned, ft_splits, cfg, teacher=base)
        ft = {"best_epoch": summary["best_epoch"], "finetune_s": summary["seconds"],
              "finetune_images": len(train_split)}
        acc["ft"] = accuracy()
    base_test = net_ctx["baseline"]["test_acc"]
    row: dict[str, Any] = {
        "net": net_ctx["net"], "variant": variant.name, "criterion": variant.criterion,
        "direction": variant.direction, "kl": variant.kl, "rate": rate, "seed": seed,
        "macs": macs, "params": params, "macs_reduction": 1 - macs / macs_model.base_macs,
        "params_reduction": 1 - params / macs_model.base_params,
        "filters_kept": plan.kept_filters, "filters_total": plan.total_filters,
        "scoring_s": round(score_s, 3), **ft, "row_s": round(time.perf_counter() - t0, 1),
    }
    for stage in STAGES:
        a = acc[stage]
        row[f"test_{stage}"] = a["test"] if a else None
        row[f"val_{stage}"] = a["val"] if a else None
        row[f"retention_{stage}"] = 100.0 * a["test"] / base_test if a and base_test > 0 else None
    return row


# ----------------------------------------------------------------------------- report


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str, float], list[dict[str, Any]]]:
    out: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["net"], r["variant"], float(r["rate"])), []).append(r)
    return out


def _cell_means(rows: list[dict[str, Any]], metric: str) -> dict[tuple[str, str, float], float]:
    """{(net, variant, rate): mean of metric over seeds}."""
    out = {}
    for k, rs in _groups(rows).items():
        m, _ = _mean_std([r[metric] for r in rs])
        if not math.isnan(m):
            out[k] = m
    return out


def _compare(cells: dict[tuple[str, str, float], float], a: str, b: str) -> tuple[float, int, int] | None:
    """Mean of (a - b) over the (net, rate) cells both have, wins of a, number of cells."""
    common = [(n, r) for (n, v, r) in cells if v == a and (n, b, r) in cells]
    if not common:
        return None
    diffs = [cells[(n, a, r)] - cells[(n, b, r)] for n, r in common]
    return statistics.fmean(diffs), sum(d > 0 for d in diffs), len(diffs)


def conclusion(rows: list[dict[str, Any]], baselines: dict[str, Any]) -> list[str]:
    """Sentences derived from the numbers only (nothing here is a fixed verdict)."""
    if not rows:
        return ["No rows yet."]
    have_ft = any(r["test_ft"] is not None for r in rows)
    main_metric = "test_ft" if have_ft else "test_bn"
    main_name = "fine-tuned" if have_ft else "BN-recalibrated"
    ft_cells = _cell_means(rows, main_metric)
    bn_cells = _cell_means(rows, "test_bn")
    variants = sorted({r["variant"] for r in rows})
    nets = sorted({r["net"] for r in rows})
    out = []

    # noise scale: seed-to-seed std of one setting (deterministic criteria if run with several seeds, else random)
    def noise_of(metric: str) -> tuple[float | None, str]:
        for kind, keep in (("deterministic", lambda v: v != "random"), ("random", lambda v: v == "random")):
            stds = [s for (n, v, r), rs in _groups(rows).items() if keep(v) and len(rs) > 1
                    for s in [_mean_std([x[metric] for x in rs])[1]] if s is not None]
            if stds:
                return statistics.fmean(stds), kind
        return None, ""

    noise, noise_kind = noise_of(main_metric)
    noise_bn, _ = noise_of("test_bn")
    if noise is None:
        noise_txt = " (One seed per setting: no estimate of the seed-to-seed noise.)"
    elif noise_kind == "random":
        noise_txt = (f" For scale: `random`'s seed-to-seed standard deviation (other random plans and fine-tuning "
                     f"shuffles) is {noise:.2f} pp {main_name}, {noise_bn:.2f} pp BN-recalibrated, on average.")
    else:
        noise_txt = (f" For scale: the seed-to-seed standard deviation of the deterministic criteria (other BN and "
                     f"fine-tuning batches) is {noise:.2f} pp {main_name}, {noise_bn:.2f} pp BN-recalibrated.")

    # 1. direction of DSFP
    pairs = sorted({v.split("-", 2)[2] for v in variants if v.startswith("dsfp-")
                    if f"dsfp-low-{v.split('-', 2)[2]}" in variants and f"dsfp-high-{v.split('-', 2)[2]}" in variants})
    if pairs:
        def pooled(cells: dict) -> tuple[float, int, int] | None:
            diffs, wins = [], 0
            for mode in pairs:
                c = _compare(cells, f"dsfp-low-{mode}", f"dsfp-high-{mode}")
                if c:
                    # re-expand to per-cell values to pool modes with equal weight per cell
                    common = [(n, r) for (n, v, r) in cells if v == f"dsfp-low-{mode}"
                              and (n, f"dsfp-high-{mode}", r) in cells]
                    d = [cells[(n, f"dsfp-low-{mode}", r)] - cells[(n, f"dsfp-high-{mode}", r)] for n, r in common]
                    diffs += d
                    wins += sum(x > 0 for x in d)
            return (statistics.fmean(diffs), wins, len(diffs)) if diffs else None

        ftc, bnc = pooled(ft_cells), pooled(bn_cells)
        if ftc and bnc:
            def side(d: float) -> str:
                return "no difference" if abs(d) < 0.005 else ("`low` better" if d > 0 else "`high` better")

            v_ft, v_bn = side(ftc[0]), side(bnc[0])
            verdict = (f"{v_ft} on both measures" if v_ft == v_bn else
                       f"the measures disagree ({v_ft} {main_name}, {v_bn} BN-recalibrated)")
            small = [name for name, d, sd in ((main_name, ftc[0], noise), ("BN-recalibrated", bnc[0], noise_bn))
                     if sd is not None and abs(d) < sd]
            caveat = (f" The {' and '.join(small)} difference{'s are' if len(small) > 1 else ' is'} smaller than "
                      "the seed-to-seed noise, so not conclusive." if small else "")
            out.append(
                f"**DSFP direction: {verdict}.** Mean accuracy of `dsfp-low` (prune the lowest fused score, "
                f"the paper's code) minus `dsfp-high` (the highest, the paper's text), over {ftc[2]} "
                f"(net, rate, KL mode) cells with KL modes {', '.join(pairs)}: {ftc[0]:+.2f} pp {main_name} "
                f"(`low` better in {ftc[1]}/{ftc[2]}), {bnc[0]:+.2f} pp BN-recalibrated (`low` better in "
                f"{bnc[1]}/{bnc[2]}).{noise_txt}{caveat}")
            for mode in pairs:
                c = _compare(ft_cells, f"dsfp-low-{mode}", f"dsfp-high-{mode}")
                if c:
                    out[-1] += f" With KL `{mode}` alone: {c[0]:+.2f} pp ({c[1]}/{c[2]} cells)."
    else:
        out.append("**DSFP direction.** Not measured (needs both dsfp-low-* and dsfp-high-* with the same KL mode)."
                   + noise_txt)

    # 2. DSFP against the baselines
    dsfp = [v for v in variants if v.startswith("dsfp-")]
    if dsfp:
        def overall(v: str) -> float:
            vals = [m for (n, vv, r), m in ft_cells.items() if vv == v]
            return statistics.fmean(vals) if vals else float("nan")

        best = max(dsfp, key=overall)
        parts = []
        for other in ("l1", "taylor", "random", "taylor_fo", "fpgm"):
            if other in variants:
                c = _compare(ft_cells, best, other)
                if c:
                    word = "above" if c[0] > 0 else "below"
                    parts.append(f"{abs(c[0]):.2f} pp {word} `{other}` ({best} better in {c[1]}/{c[2]} cells)")
        if not parts:
            out.append(f"**DSFP vs baselines.** Best DSFP variant: `{best}`; no l1/taylor/random rows to compare.")
        else:
            out.append(f"**DSFP vs baselines.** The best DSFP variant by mean {main_name} accuracy, `{best}`, is "
                       + "; ".join(parts) + ".")
        counts = []
        for other in ("l1", "taylor", "random"):
            if other in variants:
                res = [c for c in (_compare(ft_cells, d, other) for d in dsfp) if c]
                if res:
                    counts.append(f"{sum(c[0] > 0 for c in res)}/{len(res)} beat `{other}`")
        if counts:
            out[-1] += (f" Of the {len(dsfp)} DSFP variants (mean over the cells both have), " + ", ".join(counts)
                        + ".")
        ranking = sorted((v for v in variants), key=overall, reverse=True)
        out.append(f"**Ranking** by mean {main_name} test accuracy over all nets and rates: "
                   + " > ".join(f"`{v}` ({overall(v):.2f})" for v in ranking) + ".")

        # 3. retention at the paper's rate
        ret = _cell_means(rows, "retention_ft" if have_ft else "retention_bn")
        at = [(n, ret[(n, best, PAPER_RATE)]) for n in nets if (n, best, PAPER_RATE) in ret]
        if at:
            best_any = {n: max((ret[(n, v, PAPER_RATE)], v) for v in variants if (n, v, PAPER_RATE) in ret)
                        for n in nets if any((n, v, PAPER_RATE) in ret for v in variants)}
            out.append(
                f"**Retention at {PAPER_RATE:.0%} pruning** ({main_name}): `{best}` keeps "
                + ", ".join(f"{r:.2f} % on {n}" for n, r in at)
                + f" of the baseline test accuracy, against the paper's {PAPER_RETENTION} % (reached there after up "
                "to 700 fine-tuning epochs; here the budget is the one given above). Best criterion per net at "
                f"{PAPER_RATE:.0%}: " + ", ".join(f"{n}: `{v}` {r:.2f} %" for n, (r, v) in best_any.items()) + ".")
    return out


def write_report(data: dict[str, Any], md_path: Path, png: bool = True) -> None:
    rows = data["rows"]
    setup = data["setup"]
    runs = data.get("runs", [])
    lines = [f"# Filter-importance criteria: DSFP vs baselines (uniform pruning, {setup['dataset']})", ""]
    if runs:
        last = runs[-1]
        lines += [f"Command: `{last['command']}`  ", f"Commit: {last['commit']}  ", f"Machine: {last['machine']}  ",
                  f"Date: {last['date']}  "]
        total_wall = sum(r.get("wall_s", 0.0) for r in runs)
        per_run = ", ".join(f"{r.get('wall_s', 0.0) / 60:.1f} min" for r in runs)
        lines.append(f"Wall time: {total_wall / 60:.1f} min over {len(runs)} invocation(s) "
                     f"({per_run}); sum of row times "
                     f"{sum(r['row_s'] for r in rows) / 60:.1f} min  ")
    seeds = sorted({r["seed"] for r in rows})
    multi_seed = any(len({x["seed"] for x in rs}) > 1 for (_, v, _), rs in _groups(rows).items() if v != "random")
    lines += [
        f"Seeds: {', '.join(map(str, seeds)) or '-'} (`random`: one run per seed, shown as mean ± std over seeds; the "
        f"other criteria: {'several seeds' if multi_seed else 'the first seed only'}; a seed drives the "
        "random scores, the BN-recalibration batches and the fine-tuning shuffles)  ",
        f"Setup: data set {setup['dataset']}, width {setup['width']:g}; calibration batch of {setup['calib_size']} "
        f"TRAIN images (seed {setup['calib_seed']}); uniform per-layer rate (`plan_uniform`, min 1 filter kept); "
        f"BN recalibration on {setup['bn_recal_batches']} training batches of 128; fine-tuning: "
        + (f"{setup['finetune_epochs']} epoch(s) of knowledge distillation from the unpruned network (T = 4, "
           f"alpha 0.5 -> 0.1, {setup['finetune_optimizer']} lr {setup['finetune_lr']} cosine) on "
           f"{setup['finetune_limit'] or 'all'} training images, best-VALIDATION weights kept (incl. the "
           "starting ones)" if setup['finetune_epochs'] else "none")
        + f"; accuracies on {str(setup['eval_limit']) + ' seeded random images of ' if setup['eval_limit'] else ''}"
          "the TEST split, retention = test accuracy / baseline test accuracy.", ""]

    lines += ["## Baselines", "", "| net | width | test acc % | val acc % | MACs (M) | params (M) | training | checkpoint |",
              "|---|---|---|---|---|---|---|---|"]
    for net, b in data["baselines"].items():
        how = describe_training(b.get("train_config"))
        if b.get("trained_by_benchmark"):
            how += f"; trained by this benchmark ({b.get('train_seconds', 0) / 60:.1f} min)"
        lines.append(f"| {net} | {setup['width']:g} | {b['test_acc']:.2f} | {b['val_acc']:.2f} | "
                     f"{b['macs'] / 1e6:.2f} | {b['params'] / 1e6:.3f} | {how} | `{Path(b['checkpoint']).name}` |")
    lines.append("")

    if data.get("scoring"):
        lines += ["Scoring time (s, once per net and criterion, shared by all rates; DSFP = grad/Taylor pass + KL):",
                  "", "| net | " + " | ".join(sorted({k for s in data["scoring"].values() for k in s})) + " |"]
        keys = sorted({k for s in data["scoring"].values() for k in s})
        lines.append("|---|" + "---|" * len(keys))
        for net, s in data["scoring"].items():
            lines.append(f"| {net} | " + " | ".join(f"{s[k]:.1f}" if k in s else "-" for k in keys) + " |")
        lines.append("")

    groups = _groups(rows)
    nets = list(dict.fromkeys(r["net"] for r in rows))
    rates = sorted({float(r["rate"]) for r in rows})
    order = [v for v in DEFAULT_VARIANTS if any(r["variant"] == v for r in rows)]
    order += sorted({r["variant"] for r in rows} - set(order))
    have_ft = any(r["test_ft"] is not None for r in rows)
    stage = "ft" if have_ft else "bn"

    if rows:
        lines += [f"## Retention {STAGE_NAMES[stage]} (% of the baseline's test accuracy)", "",
                  f"The paper claims {PAPER_RETENTION} % for DSFP at {PAPER_RATE:.0%} (VGG-16, up to 700 epochs of "
                  "fine-tuning).", ""]
        cols = [(n, r) for n in nets for r in rates]
        lines.append("| criterion | " + " | ".join(f"{n} {r:.0%}" for n, r in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for v in order:
            cells = []
            for n, r in cols:
                rs = groups.get((n, v, r), [])
                cells.append(_fmt(*_mean_std([x[f"retention_{stage}"] for x in rs])) if rs else "-")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("| *paper (DSFP)* | " + " | ".join(f"*{PAPER_RETENTION}*" if abs(r - PAPER_RATE) < 1e-9 and
                                                         n.startswith("vgg16") else "" for n, r in cols) + " |")
        lines.append("")

    for net in nets:
        b = data["baselines"].get(net, {})
        lines += [f"## {net}", "", f"Baseline test accuracy {b.get('test_acc', float('nan')):.2f} %. Test accuracy "
                  "(%) after each stage; retention in % of the baseline; MACs and parameter reductions of the "
                  "physically pruned network.", "",
                  "| criterion | rate | MACs red. | params red. | test: pruned | test: + BN recal | test: + KD fine-tune | "
                  "retention BN | retention FT | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rates:
            for v in order:
                rs = groups.get((net, v, r))
                if not rs:
                    continue
                ms = {k: _mean_std([x[k] for x in rs]) for k in
                      ("macs_reduction", "params_reduction", "test_pruned", "test_bn", "test_ft", "retention_bn",
                       "retention_ft")}
                lines.append(
                    f"| {v} | {r:.0%} | {ms['macs_reduction'][0]:.1%} | {ms['params_reduction'][0]:.1%} | "
                    f"{_fmt(*ms['test_pruned'])} | {_fmt(*ms['test_bn'])} | {_fmt(*ms['test_ft'])} | "
                    f"{_fmt(*ms['retention_bn'])} | {_fmt(*ms['retention_ft'])} | {len(rs)} |")
        lines.append("")

    lines += ["## Conclusion", "", " ".join(conclusion(rows, data["baselines"])), "",
              "*This paragraph is generated from the numbers above by `benchmarks/criteria.py`.*", ""]
    png_path = md_path.with_suffix(".png")
    if png and rows and len(rates) >= 2:
        try:
            _plot(rows, nets, order, stage, png_path)
            lines += [f"![retention vs rate]({png_path.name})", ""]
        except ImportError:
            pass
    _atomic_write_text(md_path, "\n".join(lines))


def _plot(rows: list[dict[str, Any]], nets: list[str], order: list[str], stage: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    fig, axes = plt.subplots(1, len(nets), figsize=(5.5 * len(nets) + 1.8, 4.5), squeeze=False)
    palette = {"dsfp-low-exact": "#1f4e99", "dsfp-low-fisher": "#6f9fd8", "dsfp-high-exact": "#b2182b",
               "dsfp-high-fisher": "#ef8a62"}
    tab10 = plt.get_cmap("tab10").colors
    others = iter([tab10[i] for i in (2, 4, 5, 6, 7, 8, 9)] + list(plt.get_cmap("Dark2").colors))
    colors = {v: palette.get(v) or next(others) for v in order}
    for ax, net in zip(axes[0], nets):
        for v in order:
            pts = sorted((r, _mean_std([x[f"retention_{stage}"] for x in rs]))
                         for (n, vv, r), rs in groups.items() if n == net and vv == v)
            if not pts:
                continue
            xs = [p[0] * 100 for p in pts]
            ys = [p[1][0] for p in pts]
            err = [p[1][1] or 0.0 for p in pts]
            style = "-" if v.startswith("dsfp") else "--"
            ax.errorbar(xs, ys, yerr=err if any(err) else None, fmt=style + "o", ms=3, color=colors[v], label=v,
                        capsize=2)
        if net.startswith("vgg16"):  # the paper's claim is for VGG-16
            ax.plot([PAPER_RATE * 100], [PAPER_RETENTION], "k*", ms=12, label=f"paper DSFP, VGG-16 ({PAPER_RETENTION} %)")
        ax.set_title(f"{net}: retention {STAGE_NAMES[stage]}")
        ax.set_xlabel("filters pruned per layer (%)")
        ax.set_ylabel("test accuracy / baseline (%)")
        ax.grid(alpha=0.3)
    by_label: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            by_label.setdefault(label, handle)
    axes[0][-1].legend(by_label.values(), by_label.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", nargs="+", default=["vgg16", "alexnet"], help="architectures (default: vgg16 alexnet)")
    p.add_argument("--width", type=float, default=0.25, help="channel width multiplier of the baselines (default 0.25)")
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.6, 0.7],
                   help="uniform per-layer pruning rates in [0, 1) (default 0.5 0.6 0.7)")
    p.add_argument("--criteria", nargs="+", default=DEFAULT_VARIANTS,
                   help="criterion variants: dsfp-<low|high>-<kl mode>, kl[-<kl mode>], grad, taylor, l1, l2, "
                        f"taylor_fo, fpgm, random (default: {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds of the random criterion (one run each: its scores, BN recalibration and fine-tuning); "
                        "the deterministic criteria use the first (default 0 1 2)")
    p.add_argument("--all-seeds", action="store_true",
                   help="run every criterion with every seed (measures the fine-tuning noise; default off)")
    p.add_argument("--dataset", default="cifar10",
                   help="cifar10 (default) or synthetic (the in-process toy data set, for smoke tests)")
    p.add_argument("--data-dir", default=None, help="folder holding cifar10 (default: $PRUNING_ENV_DATA, else the "
                                                    "cache); e.g. /work/shared/data")
    p.add_argument("--baseline-epochs", nargs="+", default=["30", "alexnet=15"],
                   help="training epochs of the cached baselines, as a default N and/or NET=N entries; picks the "
                        "checkpoint default_checkpoint_path(net, dataset, width, N) (default: 30 alexnet=15)")
    p.add_argument("--baseline-seed", type=int, default=0, help="seed of the baseline checkpoints (default 0)")
    p.add_argument("--train-missing", action=argparse.BooleanOptionalAction, default=True,
                   help="train a missing baseline with pruning_env.train's recipe (default on)")
    p.add_argument("--calib-size", type=int, default=128, help="calibration images from the TRAIN split (default 128)")
    p.add_argument("--calib-seed", type=int, default=0, help="seed drawing the calibration images (default 0)")
    p.add_argument("--bn-recal-batches", type=int, default=10,
                   help="training batches of 128 for BatchNorm recalibration after pruning (default 10)")
    p.add_argument("--finetune-epochs", type=int, default=1,
                   help="fixed KD fine-tuning budget in epochs, the same for every row (0 = none; default 1)")
    p.add_argument("--finetune-limit", type=int, default=20000,
                   help="training images per fine-tuning epoch: the first N of the (already shuffled, class-mixed) "
                        "train split, the same N every epoch and row (0 = all; default 20000)")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="fine-tuning peak learning rate (default 0.01)")
    p.add_argument("--finetune-optimizer", choices=["sgd", "adam"], default="sgd",
                   help="fine-tuning optimiser (default sgd; cosine decay, see pruning_env.training.finetune)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="evaluate on N test/validation images drawn with a fixed seed (smoke runs; default: all)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "criteria.md"),
                   help="Markdown report; the raw rows go to the same path with .json, the plot with .png")
    p.add_argument("--scores-cache", default=None,
                   help="file caching the criteria scores across runs (default: --out with suffix .scores.pt; "
                        "keyed by baseline checkpoint hash and calibration batch)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the rows already in the JSON and skip them (default on; --no-resume starts over)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the .md and .png from the JSON")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    args = p.parse_args(argv)
    for name in ("calib_size", "bn_recal_batches", "finetune_epochs", "finetune_limit"):
        if getattr(args, name) < (1 if name == "calib_size" else 0):
            p.error(f"--{name.replace('_', '-')} out of range: {getattr(args, name)}")
    if any(not 0 <= r < 1 for r in args.rates):
        p.error(f"--rates must be in [0, 1), got {args.rates}")
    try:
        args.variants = [parse_variant(c) for c in args.criteria]
        args.epochs = _parse_epochs(args.baseline_epochs, args.nets)
    except ValueError as exc:
        p.error(str(exc))
    return args


def _setup(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that changes the numbers of a row besides its key (net, variant, rate, seed)."""
    return {"dataset": args.dataset, "width": args.width, "calib_size": args.calib_size,
            "calib_seed": args.calib_seed, "bn_recal_batches": args.bn_recal_batches,
            "finetune_epochs": args.finetune_epochs, "finetune_limit": args.finetune_limit,
            "finetune_lr": args.finetune_lr, "finetune_optimizer": args.finetune_optimizer,
            "eval_limit": args.eval_limit, "baseline_seed": args.baseline_seed}


def main(argv: list[str] | None = None) -> int:
    t_start = time.time()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    md_path = Path(args.out)
    json_path = md_path.with_suffix(".json")
    say = (lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True))
    setup = _setup(args)

    data: dict[str, Any] = {"format": JSON_FORMAT, "setup": setup, "baselines": {}, "scoring": {}, "rows": [],
                            "runs": []}
    if json_path.is_file() and (args.resume or args.report_only):
        old = json.loads(json_path.read_text())
        if args.report_only:
            write_report(old, md_path)
            print(md_path.read_text())
            return 0
        if old.get("setup") != setup:
            diff = {k: (old.get("setup", {}).get(k), v) for k, v in setup.items() if old.get("setup", {}).get(k) != v}
            print(f"error: {json_path} holds results of another setup ({diff}, as (stored, now)); pass --no-resume "
                  "to overwrite it or choose another --out", file=sys.stderr)
            return 2
        data = old
    elif args.report_only:
        print(f"error: {json_path} does not exist", file=sys.stderr)
        return 2

    try:
        device = resolve_device(args.device)
        run_info = {"command": "PYTHONPATH=. python benchmarks/criteria.py " + shlex.join(
                        argv if argv is not None else sys.argv[1:]),
                    "commit": _commit(), "machine": _machine() + f", device {device}",
                    "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "wall_s": 0.0}
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def save() -> None:
        run_info["wall_s"] = round(time.time() - t_start, 1)
        _atomic_write_text(json_path, json.dumps(data, indent=1, default=float))
        write_report(data, md_path)

    cache_path = Path(args.scores_cache) if args.scores_cache else md_path.with_suffix(".scores.pt")
    disk: dict[str, Any] = torch.load(cache_path, weights_only=True) if cache_path.is_file() else {}

    def save_cache() -> None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f".{cache_path.name}.tmp")
        torch.save(disk, tmp)
        os.replace(tmp, cache_path)

    done = {(r["net"], r["variant"], float(r["rate"]), int(r["seed"])) for r in data["rows"]}
    jobs = []
    for net in args.nets:
        for v in args.variants:
            seeds = args.seeds if (v.seeded or args.all_seeds) else args.seeds[:1]
            for rate in args.rates:
                for seed in seeds:
                    if (net, v.name, float(rate), seed) not in done:
                        jobs.append((net, v, float(rate), seed))
    say(f"{len(jobs)} rows to run ({len(done)} already in {json_path})")

    bar = tqdm(total=len(jobs), disable=not args.progress, file=sys.stderr, desc="rows", dynamic_ncols=True)
    net_ctx: dict[str, Any] | None = None
    try:
        for net, variant, rate, seed in jobs:
            if net_ctx is None or net_ctx["net"] != net:
                net_ctx = prepare_net(net, args, device, data, disk, save_cache, say)
                save()
            bar.set_description(f"{net} {variant.name} {rate:.0%} s{seed}")
            row = run_row(net_ctx, variant, rate, seed, args, device)
            data["rows"].append(row)
            if not any(r is run_info for r in data["runs"]):
                data["runs"].append(run_info)  # an invocation is recorded once it has produced a row
            scoring = data["scoring"].setdefault(net, {})
            scoring[variant.name] = row["scoring_s"]
            save()
            bar.update(1)
            bar.set_postfix(ft=f"{row['test_ft'] or float('nan'):.2f}", bn=f"{row['test_bn']:.2f}")
    except ValueError as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        save()
        return 2
    except KeyboardInterrupt:
        bar.close()
        save()
        print(f"interrupted: {len(data['rows'])} finished rows are in {json_path}; rerun the same command to "
              "continue", file=sys.stderr)
        return 130
    bar.close()
    save()
    say(f"done in {(time.time() - t_start) / 60:.1f} min: {md_path}, {json_path}")
    print(md_path.read_text())
    return 0


def prepare_net(net: str, args: argparse.Namespace, device: torch.device, data: dict[str, Any], disk: dict[str, Any],
                save_cache, say) -> dict[str, Any]:
    """Load (or train) the baseline, its splits, layers, MACs model, calibration batch and score bank."""
    epochs = args.epochs[net]
    path, info = ensure_baseline(net, epochs, args, say)
    loaded = ckpt.load(path, map_location=device, expect_arch=net)
    base = loaded.model.eval()
    tcfg = loaded.train_config or {}
    splits = load_splits(args.dataset, args.data_dir, val_fraction=float(tcfg.get("val_fraction", 0.1)),
                         split_seed=int(tcfg.get("split_seed", 0)))
    layers = prunable_layers(base, splits.input_shape)
    macs_model = MacsModel.from_model(base, splits.input_shape, layers=layers)
    sha = _file_sha1(path)
    eval_splits = {name: _eval_subset(getattr(splits, name), args.eval_limit) for name in ("val", "test")}
    stored = data["baselines"].get(net)
    if stored is not None and stored["sha1"] != sha:
        raise ValueError(f"the baseline {path} changed since the stored rows were made (sha1 {stored['sha1']} -> "
                         f"{sha}); rerun with --no-resume or another --out")
    if stored is None:
        say(f"{net}: evaluating the baseline ...")
        stored = {"checkpoint": str(path), "sha1": sha, "epochs": epochs, "train_config": tcfg,
                  "macs": macs_model.base_macs, "params": macs_model.base_params,
                  "test_acc": evaluate(base, eval_splits["test"], mean=splits.mean, std=splits.std, device=device),
                  "val_acc": evaluate(base, eval_splits["val"], mean=splits.mean, std=splits.std, device=device),
                  **info}
        data["baselines"][net] = stored
    images, labels = _calibration_batch(splits, args.calib_size, args.calib_seed, device)
    key = f"{net}|{sha}|{args.dataset}|calib{args.calib_size}s{args.calib_seed}"
    bank = ScoreBank(base, [l.name for l in layers], images, labels, disk, key, save_cache)
    return {"net": net, "model": base, "splits": splits, "eval": eval_splits, "layers": layers, "macs": macs_model, "bank": bank,
            "baseline": stored}


if __name__ == "__main__":
    sys.exit(main())
