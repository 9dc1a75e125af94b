"""Filter-importance criteria head to head: DSFP (both directions, exact and Fisher KL) vs the baselines.

For every network (CIFAR-10, trained baseline from the cache, trained here if missing), every
criterion variant and every uniform pruning rate it:

1. scores the filters of every prunable conv on ONE calibration batch drawn from the TRAINING
   split (``--calib-size`` images, ``--calib-seed``, :func:`pruning_env.core.data.calibration_batch`);
   scores are computed once per (net, criterion) and reused by every rate: the exact KL, the
   expensive part, is computed once per net and shared by ``kl`` and both ``dsfp-*-exact`` variants
   (the DSFP fusion is recomputed from the cached grad/Taylor/KL components exactly as
   ``pruning_env.criteria.score`` does). Scores are also cached on disk (``--scores-cache``), so a
   rerun does not pay for them again;
2. prunes the same fraction of every layer (``plan_uniform`` with the rate rule ``--min-keep`` /
   ``--round-to``: lowest scores first);
3. finalizes the plan with :func:`pruning_env.training.finalize.finalize`, the package's one
   pipeline: physical surgery, then BatchNorm re-estimation (``--bn-recal-batches`` training
   batches of ``--bn-recal-batch-size``, drawn with the row's seed), then a fixed
   knowledge-distillation fine-tuning budget (``--finetune-epochs`` over at most
   ``--finetune-train-limit`` (alias ``--finetune-limit``; 0 = all) training images, teacher = the
   unpruned network, every ``--finetune-*`` setting of :class:`FinetuneConfig`; model selection
   inside fine-tuning uses the VALIDATION split), measuring TEST accuracy after each step;
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
``.json``). With ``--resume`` the rows already there (same setup) are kept and skipped, so an
interrupted run loses at most the row in flight; without it the run starts over. The Markdown
report (``--out``, written by :mod:`benchmarks.criteria_report`), the JSON and a PNG of retention
vs rate are rewritten after every row; the report's "Conclusion" is generated from the numbers.
The last line printed is one JSON object (the paths written and the row counts).

Run from the repository root (every flag is a field of :class:`CriteriaBenchConfig`; ``--help``)::

    python -m benchmarks.criteria --data-dir /work/shared/data
    python -m benchmarks.criteria --data-dir /work/shared/data --resume   # continue an interrupted run
    python -m benchmarks.criteria --report-only          # rebuild .md/.png from the JSON
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.common import atomic_write_text, command_line, commit, hold_outputs, log, machine, results_path
from benchmarks.common import parse_config as _parse
from benchmarks.criteria_report import DEFAULT_VARIANTS, RECIPE_DEFAULTS, STAGES, write_report
from pruning_env import criteria
from pruning_env.cli.options import print_json
from pruning_env.core import checkpoint as ckpt
from pruning_env.core.config import get_setting, nested, option, resolve_device
from pruning_env.core.data import CalibrationConfig, Split, calibration_batch, load_splits
from pruning_env.core.models import list_models
from pruning_env.criteria.config import ScoringConfig
from pruning_env.engine.bn import BNRecalConfig
from pruning_env.engine.flops import count
from pruning_env.engine.graph import prunable_layers
from pruning_env.engine.plan import RateRule, plan_uniform
from pruning_env.training.finalize import accuracy, finalize
from pruning_env.training.finetune import FinetuneConfig
from pruning_env.training.train import TrainConfig, default_checkpoint_path, train

__all__ = ["CriteriaBenchConfig", "ScoreBank", "Variant", "main", "parse_variant"]

JSON_FORMAT = "pruning_env.bench.criteria/1"


# ----------------------------------------------------------------------------- criterion variants


@dataclass(frozen=True)
class Variant:
    """One row label of the tables: a name and the ScoringConfig (criterion and its options) it stands for."""

    name: str
    scoring: ScoringConfig

    @property
    def criterion(self) -> str:
        return self.scoring.criterion

    @property
    def direction(self) -> str | None:
        """The dsfp direction (None for criteria without one)."""
        return self.scoring.direction if "direction" in criteria.get_criterion(self.criterion).options else None

    @property
    def kl(self) -> str | None:
        """The KL mode (None for criteria without a KL component)."""
        return self.scoring.kl if self.scoring.uses_kl else None

    @property
    def seeded(self) -> bool:
        """Whether the scores themselves depend on the seed."""
        return criteria.get_criterion(self.criterion).uses_seed


def parse_variant(name: str) -> Variant:
    """``dsfp-low-exact`` -> the dsfp criterion, direction low, KL exact; ``kl`` = ``kl-exact``."""
    parts = name.split("-")
    if parts[0] == "dsfp":
        if len(parts) != 3 or parts[1] not in criteria.DIRECTIONS or parts[2] not in criteria.KL_MODES:
            raise ValueError(f"{name!r}: write dsfp variants as dsfp-<{'|'.join(criteria.DIRECTIONS)}>-"
                             f"<{'|'.join(criteria.KL_MODES)}>, e.g. dsfp-low-exact")
        return Variant(name, ScoringConfig(criterion="dsfp", direction=parts[1], kl=parts[2]))
    if parts[0] == "kl":
        if len(parts) > 2 or (len(parts) == 2 and parts[1] not in criteria.KL_MODES):
            raise ValueError(f"{name!r}: write kl or kl-<{'|'.join(criteria.KL_MODES)}>")
        return Variant(name, ScoringConfig(criterion="kl", kl=parts[1] if len(parts) == 2 else "exact"))
    if name not in criteria.list_criteria() or name == "dsfp":
        raise ValueError(f"unknown criterion variant {name!r}; choose from {', '.join(DEFAULT_VARIANTS)} "
                         f"(dsfp-<low|high>-<kl mode>, kl-<kl mode>, kl modes: {', '.join(criteria.KL_MODES)})")
    return Variant(name, ScoringConfig(criterion=name))


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
            else:  # "<criterion>" or, for criteria whose scores depend on the seed, "<criterion>:<seed>"
                name, _, seed = prim.partition(":")
                images, labels = ((self.images, self.labels) if criteria.get_criterion(name).needs_data
                                  else (None, None))
                parts = {"s": criteria.score(self.model, images, labels, name, layers=self.layer_names,
                                             seed=int(seed or 0))}
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
            return criteria.apply_direction(fused, variant.direction), sec_g + sec_k
        parts, sec = self._primitive(f"{c}:{seed}" if variant.seeded else c)
        return parts["s"], sec


# ----------------------------------------------------------------------------- configuration


def parse_epochs(items: tuple[str, ...], nets: tuple[str, ...]) -> dict[str, int]:
    """``("30", "alexnet=15")`` -> {net: epochs} for every net (a bare number is the default)."""
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
            if net not in list_models():
                raise ValueError(f"--baseline-epochs {item!r}: {net!r} is not an architecture; NET is one of "
                                 f"{', '.join(list_models())}")
            per_net[net] = epochs
        else:
            default = epochs
    out = {}
    for net in nets:
        if net not in per_net and default is None:
            raise ValueError(f"no --baseline-epochs for {net}: add {net}=N or a bare default N")
        out[net] = per_net.get(net, default)
    return out


@dataclass
class CriteriaBenchConfig:
    """Every flag of ``python -m benchmarks.criteria`` (the command line is generated from these fields)."""

    nets: tuple[str, ...] = option(("vgg16", "alexnet"), "architectures")
    width: float = option(0.25, "channel width multiplier of the baselines")
    uniform_rates: tuple[float, ...] = option((0.5, 0.6, 0.7), "uniform per-layer pruning rates in [0, 1)",
                                              aliases=("rates",))
    criteria: tuple[str, ...] = option(tuple(DEFAULT_VARIANTS), "criterion variants: dsfp-<low|high>-<kl mode>, "
                                       "kl[-<kl mode>], grad, taylor, l1, l2, taylor_fo, fpgm, random")
    seeds: tuple[int, ...] = option((0, 1, 2), "seeds of the random criterion (one run each: its scores, BN "
                                    "recalibration and fine-tuning); the deterministic criteria use the first")
    all_seeds: bool = option(False, "run every criterion with every seed (measures the fine-tuning noise)")
    dataset: str = option("cifar10", "cifar10 or synthetic (the in-process toy data set, for smoke tests)")
    data_dir: str | None = option(None, "folder holding cifar10 (none: $PRUNING_ENV_DATA, else the cache); "
                                  "e.g. /work/shared/data")
    baseline_epochs: tuple[str, ...] = option(("30", "alexnet=15"), "training epochs of the cached baselines, as "
                                              "a default N and/or NET=N entries; picks the checkpoint "
                                              "default_checkpoint_path(net, dataset, width, N)")
    baseline_seed: int = option(0, "seed of the baseline checkpoints")
    train_missing: bool = option(True, "train a missing baseline with pruning_env.train's recipe")
    calibration: CalibrationConfig = nested(CalibrationConfig, "the scoring batch of every criterion")
    calib_seed: int = option(0, "seed drawing the calibration images")
    rule: RateRule = nested(RateRule, "how a rate becomes a number of kept filters (plan_uniform)")
    bn: BNRecalConfig = nested(
        BNRecalConfig, "BatchNorm re-estimation after pruning (10 batches here)",
        default=BNRecalConfig(bn_recal_batches=10))
    finetune: FinetuneConfig = nested(
        FinetuneConfig, "the fixed fine-tuning budget, the same for every row (1 epoch on 20000 images here; "
        "a train limit of 0 means all)", prefix="finetune", default=FinetuneConfig(epochs=1, train_limit=20000))
    eval_limit: int | None = option(None, "measure test accuracy on N test images drawn with a fixed seed (smoke "
                                    "runs; none: all); validation accuracy is always on the whole split")
    device: str = option("auto", "auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    threads: int | None = option(None, "torch CPU threads (none: torch's choice)")
    out: str | None = option(None, "Markdown report (none: benchmarks/results/criteria.md); the raw rows go to the "
                             "same path with .json, the plot with .png")
    scores_cache: str | None = option(None, "file caching the criteria scores across runs (none: --out with suffix "
                                      ".scores.pt; keyed by baseline checkpoint hash and calibration batch)")
    resume: bool = option(False, "keep the rows already in the JSON (same setup) and skip them; off: start over")
    report_only: bool = option(False, "only rebuild the .md and .png from the JSON")
    progress: bool = option(True, "progress bars")

    def __post_init__(self) -> None:
        if self.finetune.train_limit == 0:  # the benchmark's "0 = all", kept for recorded command lines
            self.finetune = dataclasses.replace(self.finetune, train_limit=None)
        self.finetune.check()
        if any(not 0 <= r < 1 for r in self.uniform_rates):
            raise ValueError(f"--rates must be in [0, 1), got {list(self.uniform_rates)}")
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        for name in self.criteria:
            parse_variant(name)  # raises on an unknown variant
        parse_epochs(self.baseline_epochs, self.nets)

    @property
    def variants(self) -> list[Variant]:
        """The parsed ``--criteria``."""
        return [parse_variant(c) for c in self.criteria]

    @property
    def epochs(self) -> dict[str, int]:
        """``{net: baseline epochs}`` from ``--baseline-epochs``."""
        return parse_epochs(self.baseline_epochs, self.nets)

    def setup(self) -> dict[str, Any]:
        """Everything that changes the numbers of a row besides its key (net, variant, rate, seed).

        The keys of the first stored results, then any setting of :data:`RECIPE_DEFAULTS` that differs from
        the recipe those results used (so stored results of that recipe stay resumable).
        """
        ft = self.finetune
        setup: dict[str, Any] = {
            "dataset": self.dataset, "width": self.width, "calib_size": self.calibration.calib_size,
            "calib_seed": self.calib_seed,
            "bn_recal_batches": self.bn.bn_recal_batches, "finetune_epochs": ft.epochs,
            "finetune_limit": ft.train_limit or 0, "finetune_lr": ft.lr, "finetune_optimizer": ft.optimizer,
            "eval_limit": self.eval_limit, "baseline_seed": self.baseline_seed}
        for name, recipe in RECIPE_DEFAULTS.items():
            value = get_setting(self, name)
            if value != recipe:
                setup[name] = value
        return setup


# ----------------------------------------------------------------------------- helpers


def _file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _eval_subset(split: Split, limit: int | None) -> Split:
    """``limit`` examples drawn with a fixed seed (the image-folder test split is sorted by class, so its first
    N images would be one or two classes only); the whole split when ``limit`` is None."""
    if limit is None or limit >= len(split):
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:limit]
    return Split(split.images[idx], split.labels[idx])


# ----------------------------------------------------------------------------- baselines


def ensure_baseline(net: str, epochs: int, cfg: CriteriaBenchConfig) -> tuple[Path, dict[str, Any]]:
    """The cached baseline of ``net`` (trained now if missing and ``--train-missing``); returns (path, info)."""
    path = default_checkpoint_path(net, cfg.dataset, cfg.width, epochs, seed=cfg.baseline_seed)
    info: dict[str, Any] = {}
    if not path.is_file():
        if not cfg.train_missing:
            raise ValueError(f"no baseline at {path}; train it with python -m pruning_env.train --net {net} "
                             f"--width {cfg.width:g} --epochs {epochs} --dataset {cfg.dataset}, or pass "
                             "--train-missing")
        log(f"training the {net} baseline ({epochs} epochs) into {path} ...")
        summary = train(TrainConfig(net=net, dataset=cfg.dataset, data_dir=cfg.data_dir, width=cfg.width,
                                    epochs=epochs, seed=cfg.baseline_seed, device=cfg.device, out=str(path),
                                    progress=cfg.progress))
        info = {"trained_by_benchmark": True, "train_seconds": summary["seconds"]}
    loaded = ckpt.load(path, expect_arch=net)
    state = loaded.extra.get("train_state")
    done = state.get("epoch") if isinstance(state, dict) else None
    if "test_acc" not in loaded.metrics or (done is not None and done < epochs):
        data_dir = f" --data-dir {cfg.data_dir}" if cfg.data_dir else ""
        raise ValueError(f"the baseline {path} is not finished (epoch {done}/{epochs}): wait for its training, or "
                         f"resume it with python -m pruning_env.train --net {net} --width {cfg.width:g} "
                         f"--epochs {epochs} --dataset {cfg.dataset}{data_dir} --resume")
    return path, info


def prepare_net(net: str, cfg: CriteriaBenchConfig, device: torch.device, data: dict[str, Any],
                disk: dict[str, Any], save_cache) -> dict[str, Any]:
    """Load (or train) the baseline, its splits, layers, calibration batch and score bank."""
    epochs = cfg.epochs[net]
    path, info = ensure_baseline(net, epochs, cfg)
    loaded = ckpt.load(path, map_location=device, expect_arch=net)
    base = loaded.model.eval()
    tcfg = loaded.train_config or {}
    splits = load_splits(cfg.dataset, cfg.data_dir, val_fraction=float(tcfg.get("val_fraction", 0.1)),
                         split_seed=int(tcfg.get("split_seed", 0)))
    layers = prunable_layers(base, splits.input_shape)
    sha = _file_sha1(path)
    # The test images the rows are measured on: all, or --eval-limit seeded ones. The validation split stays
    # whole: fine-tuning selects its weights on it.
    eval_splits = dataclasses.replace(splits, test=_eval_subset(splits.test, cfg.eval_limit))
    stored = data["baselines"].get(net)
    if stored is not None and stored["sha1"] != sha:
        raise ValueError(f"the baseline {path} changed since the stored rows were made (sha1 {stored['sha1']} -> "
                         f"{sha}); rerun without --resume, or with another --out")
    if stored is None:
        log(f"{net}: evaluating the baseline ...")
        cost = count(base, splits.input_shape)
        acc = accuracy(base, eval_splits, device=device)
        stored = {"checkpoint": str(path), "sha1": sha, "epochs": epochs, "train_config": tcfg,
                  "macs": cost.macs, "params": cost.params, "test_acc": acc["test"], "val_acc": acc["val"], **info}
        data["baselines"][net] = stored
    images, labels = calibration_batch(splits, cfg.calibration.calib_size, seed=cfg.calib_seed, device=device)
    key = f"{net}|{sha}|{cfg.dataset}|calib{cfg.calibration.calib_size}s{cfg.calib_seed}"
    bank = ScoreBank(base, [layer.name for layer in layers], images, labels, disk, key, save_cache)
    return {"net": net, "model": base, "splits": eval_splits, "layers": layers, "bank": bank, "baseline": stored}


# ----------------------------------------------------------------------------- one row


def run_row(net_ctx: dict[str, Any], variant: Variant, rate: float, seed: int, cfg: CriteriaBenchConfig,
            device: torch.device) -> dict[str, Any]:
    """Score, plan, then finalize (surgery -> BN re-estimation -> KD fine-tuning -> accuracies) one row."""
    base, splits = net_ctx["model"], net_ctx["splits"]
    t0 = time.perf_counter()
    scores, score_s = net_ctx["bank"].scores(variant, seed)
    plan = plan_uniform(scores, rate, min_keep=cfg.rule.min_keep, round_to=cfg.rule.round_to)
    ft_cfg = dataclasses.replace(cfg.finetune, seed=seed, device=str(device), progress=False)
    baseline = net_ctx["baseline"]
    _, report = finalize(base, splits, plan=plan, bn=cfg.bn, finetune_cfg=ft_cfg, layers=net_ctx["layers"],
                         bn_seed=seed, baseline_accuracy={"val": baseline["val_acc"], "test": baseline["test_acc"]})
    stages = report["accuracy"]
    # BN re-estimation on 0 batches leaves the network as pruned: its accuracy is the pruned one.
    acc = {"pruned": stages["after_pruning"], "bn": stages["after_bn_recal"] or stages["after_pruning"],
           "ft": stages["after_finetune"]}
    ft: dict[str, Any] = {}
    if report["finetune"] is not None:
        n_train = len(splits.train)
        ft = {"best_epoch": report["finetune"]["best_epoch"], "finetune_s": report["finetune"]["seconds"],
              "finetune_images": min(ft_cfg.train_limit, n_train) if ft_cfg.train_limit else n_train}
    base_test = baseline["test_acc"]
    row: dict[str, Any] = {
        "net": net_ctx["net"], "variant": variant.name, "criterion": variant.criterion,
        "direction": variant.direction, "kl": variant.kl, "rate": rate, "seed": seed,
        "macs": report["macs"], "params": report["params"], "macs_reduction": report["macs_reduction"],
        "params_reduction": report["params_reduction"],
        "filters_kept": plan.kept_filters, "filters_total": plan.total_filters,
        "scoring_s": round(score_s, 3), **ft, "row_s": round(time.perf_counter() - t0, 1),
    }
    for stage in STAGES:
        a = acc[stage]
        row[f"test_{stage}"] = a["test"] if a else None
        row[f"val_{stage}"] = a["val"] if a else None
        row[f"retention_{stage}"] = 100.0 * a["test"] / base_test if a and base_test > 0 else None
    return row


# ----------------------------------------------------------------------------- main


def parse_config(argv: list[str] | None = None) -> CriteriaBenchConfig:
    """The :class:`CriteriaBenchConfig` of a command line (``None``: ``sys.argv[1:]``)."""
    return _parse(CriteriaBenchConfig, argv, "criteria", __doc__)


def main(argv: list[str] | None = None) -> int:
    t_start = time.time()
    cfg = parse_config(argv)
    md_path = results_path(cfg.out, "criteria.md")
    cache_path = Path(cfg.scores_cache) if cfg.scores_cache else md_path.with_suffix(".scores.pt")
    with hold_outputs("criteria", files=[("--out", md_path), ("--scores-cache", cache_path)]):
        return _main(cfg, argv, t_start, md_path, cache_path)


def _main(cfg: CriteriaBenchConfig, argv: list[str] | None, t_start: float, md_path: Path, cache_path: Path) -> int:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    json_path = md_path.with_suffix(".json")
    setup = cfg.setup()

    data: dict[str, Any] = {"format": JSON_FORMAT, "setup": setup, "baselines": {}, "scoring": {}, "rows": [],
                            "runs": []}
    if json_path.is_file() and (cfg.resume or cfg.report_only):
        old = json.loads(json_path.read_text())
        if cfg.report_only:
            write_report(old, md_path)
            print(md_path.read_text())
            print_json({"report": str(md_path), "json": str(json_path), "rows": len(old["rows"]), "rows_run": 0})
            return 0
        if old.get("setup") != setup:
            stored = old.get("setup", {})
            diff = {k: (stored.get(k), setup.get(k)) for k in {*stored, *setup} if stored.get(k) != setup.get(k)}
            print(f"error: {json_path} holds results of another setup ({diff}, as (stored, now)); rerun without "
                  "--resume to overwrite it, or choose another --out", file=sys.stderr)
            return 2
        data = old
    elif cfg.report_only:
        print(f"error: {json_path} does not exist", file=sys.stderr)
        return 2
    elif json_path.is_file():
        log(f"starting over: {json_path} is overwritten (pass --resume to keep its rows)")

    try:
        device = resolve_device(cfg.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_info = {"command": command_line("criteria", argv), "commit": commit(),
                "machine": machine() + f", device {device}", "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                "wall_s": 0.0}

    def save() -> None:
        run_info["wall_s"] = round(time.time() - t_start, 1)
        atomic_write_text(json_path, json.dumps(data, indent=1, default=float))
        write_report(data, md_path)

    disk: dict[str, Any] = torch.load(cache_path, weights_only=True) if cache_path.is_file() else {}

    def save_cache() -> None:
        ckpt.atomic_save(disk, cache_path)

    done = {(r["net"], r["variant"], float(r["rate"]), int(r["seed"])) for r in data["rows"]}
    jobs = []
    for net in cfg.nets:
        for v in cfg.variants:
            seeds = cfg.seeds if (v.seeded or cfg.all_seeds) else cfg.seeds[:1]
            for rate in cfg.uniform_rates:
                for seed in seeds:
                    if (net, v.name, float(rate), seed) not in done:
                        jobs.append((net, v, float(rate), seed))
    log(f"{len(jobs)} rows to run ({len(done)} already in {json_path})")

    bar = tqdm(total=len(jobs), disable=not cfg.progress, file=sys.stderr, desc="rows", dynamic_ncols=True)
    net_ctx: dict[str, Any] | None = None
    try:
        for net, variant, rate, seed in jobs:
            if net_ctx is None or net_ctx["net"] != net:
                net_ctx = prepare_net(net, cfg, device, data, disk, save_cache)
                save()
            bar.set_description(f"{net} {variant.name} {rate:.0%} s{seed}")
            row = run_row(net_ctx, variant, rate, seed, cfg, device)
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
        print(f"interrupted: {len(data['rows'])} finished rows are in {json_path}; rerun the same command with "
              "--resume to continue", file=sys.stderr)
        return 130
    bar.close()
    save()
    log(f"done in {(time.time() - t_start) / 60:.1f} min: {md_path}, {json_path}")
    print(md_path.read_text())
    print_json({"report": str(md_path), "json": str(json_path), "rows": len(data["rows"]), "rows_run": len(jobs)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
