"""The final selection: pick the network to deliver among a search's best plans by a short real fine-tune.

Why: a search's objective (the env's cheap validation proxy) is a good FILTER of plans but a poor JUDGE of
what fine-tuning makes of them (``benchmarks/results/reward_fidelity.md``). So the plan finalized is chosen
by a real, if short, knowledge-distillation fine-tune of several candidates:

* the candidates (:func:`selection_candidates`): the ``k`` best distinct plans of the search by its
  validation objective (:attr:`pruning_env.search.Search.top`), plus reference plans at the same MACs
  budget (:func:`pruning_env.envs.plans.reference_plans`: ``"uniform"``, ``"gradual"``, ``"global"``); each
  is named by its source (:data:`SOURCES`);
* successive halving (:func:`select`): every candidate fine-tunes ``rung_epochs`` epochs of the run's own
  recipe (:class:`~pruning_env.training.finetune.FinetuneConfig`: its cosine schedule spans the full
  ``epochs``, so a rung is the start of the real run, not a different one); the better half by VALIDATION
  accuracy (the current weights', ties to the earlier candidate) goes on for ``rung_epochs`` more, and so on
  until one is left or the schedule ends. The test split is never read;
* the winner's fine-tune then continues to the full budget from its saved state (weights, optimiser,
  scheduler, RNG: :func:`finalize` resumes it), so its rung epochs are not thrown away
  (:func:`select_and_finalize`).

Cost, in fine-tuning epochs, for ``n`` candidates, rung ``R`` and ``E`` epochs: ``R * (n + ceil(n/2) +
ceil(n/4) + ...)`` over the rungs until one candidate is left (at most ``E`` epochs each), plus the winner's
remaining epochs; e.g. ``n = 9`` (k = 6 and three references), ``R = 0.25`` (the default), ``E = 8``:
``0.25 * (9 + 5 + 3 + 2) + (8 - 1) = 11.75`` epochs instead of 8 (``R = 1``: 23). The record's ``cost_epochs``
gives the rungs' share of a run. A rung may end inside an epoch (:func:`~pruning_env.training.finetune.finetune`'s
``stop_after``), plus one validation pass per candidate and rung.

State: ``selection.json`` (candidates, scores per rung, winner; rewritten atomically after every candidate's
rung) and one fine-tuning checkpoint per candidate (``candidate_<i>.pt``, :mod:`pruning_env.core.checkpoint`)
in the stage's folder; ``resume=True`` continues an interrupted stage to the same winner and weights.

Stages that share candidates (a benchmark's modes and methods at one budget and seed: the same reference plans,
a method's own plans in ``own`` and ``own+reference``) may share their rungs with ``shared_dir``: a candidate's
rung state and scores are kept there by the plan and the settings that make them (:func:`_candidate_tag`), and
a stage takes a score already measured instead of fine-tuning again (the same number: a candidate's fine-tune
depends only on its plan, the recipe and its seed). The winner's fine-tune continues on its own copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning_env.core import checkpoint as ckpt
from pruning_env.core.config import check_settings, option
from pruning_env.core.data import Splits
from pruning_env.engine.bn import BNRecalConfig
from pruning_env.engine.flops import count
from pruning_env.engine.graph import PrunableLayer
from pruning_env.engine.plan import PruningPlan
from pruning_env.engine.surgery import apply
from pruning_env.training.finalize import finalize
from pruning_env.training.finetune import FinetuneConfig, finetune
from pruning_env.training.teacher import TeacherCache

__all__ = ["MACS_SLACK", "REFERENCE_SOURCES", "SOURCES", "Candidate", "SelectionConfig", "check_finetune",
           "markdown_table", "select", "select_and_finalize", "selection_budget", "selection_candidates"]

REFERENCE_SOURCES = ("uniform", "gradual", "global")
"""The reference plans at a candidate's budget (:func:`pruning_env.envs.plans.reference_plans` makes them)."""
SOURCES = ("search", *REFERENCE_SOURCES)
"""Where a candidate comes from: the search's best plans, or a reference plan at the same budget."""

STATE_FILE = "selection.json"
MACS_SLACK = 0.005
"""How far above the MACs target a candidate's ratio may be (the exact budget's gap is about one filter)."""


@dataclass
class SelectionConfig:
    """The final selection among the search's best plans and reference plans (successive halving of short
    KD fine-tunes, judged on validation accuracy)."""

    enabled: bool = option(True, "choose the plan to finalize by short fine-tunes of several candidates "
                           "(successive halving on validation accuracy) instead of taking the search's best",
                           aliases=("selection",))
    k: int = option(6, "search plans entering the selection: the k best distinct final plans by the validation "
                    "objective", min=1)
    rung_epochs: float = option(0.25, "fine-tuning epochs per rung of successive halving, fractions allowed (of "
                                "the run's own schedule; the better half goes on each rung)", min=0,
                                min_exclusive=True)
    references: bool = option(True, "add the uniform plan (single-shot and gradual: the same keep counts in the "
                              "episode's steps, DSFP re-measured after each) and the global plan (Torch-Pruning's "
                              "iterative global group-L1 pruning, by our engine) at the same MACs budget as "
                              "candidates")

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class Candidate:
    """A plan entering the selection, its source (:data:`SOURCES`) and the search's objective of it (if any)."""

    plan: PruningPlan
    source: str
    objective: float | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"candidate source must be one of {SOURCES}, got {self.source!r}")


def check_finetune(finetune_cfg: FinetuneConfig) -> None:
    """Raise ``ValueError`` unless the recipe fine-tunes (the selection judges candidates by fine-tuning them)."""
    if finetune_cfg.epochs == 0:
        raise ValueError("the final selection judges plans by fine-tuning them: give --finetune-epochs >= 1, or "
                         "--no-selection to finalize the search's best plan without fine-tuning")


def selection_budget(reward: str, macs_target: float, best_macs_ratio: float) -> float:
    """The MACs ratio every candidate must meet: the budget reward's ``macs_target`` (exact or soft), else
    (``linear``, ``amc``) the search's best plan's ratio, so that validation accuracy compares networks of one cost
    (it would always favour the largest)."""
    return float(macs_target) if reward == "budget" else float(best_macs_ratio)


def selection_candidates(top: Sequence[Mapping[str, Any]], references: Mapping[str, PruningPlan] | None,
                         k: int, *, max_macs_ratio: float | None = None) -> list[Candidate]:
    """The candidates: the first ``k`` distinct plans of ``top`` (the search's best first: dicts with ``plan``, a
    plan dict, ``objective`` and ``macs_ratio``) at most ``max_macs_ratio`` (a soft budget's search may end above
    it), then each reference plan (``{source: plan}``) not already among them."""
    out: list[Candidate] = []
    keys: set[str] = set()
    for entry in top:
        plan = PruningPlan.from_dict(entry["plan"])
        if max_macs_ratio is not None and entry["macs_ratio"] > max_macs_ratio:
            continue
        if len(out) < k and plan.key() not in keys:
            keys.add(plan.key())
            out.append(Candidate(plan, "search", float(entry["objective"])))
    for source, plan in (references or {}).items():
        if plan.key() not in keys:
            keys.add(plan.key())
            out.append(Candidate(plan, source))
    if not out:
        raise ValueError("the selection has no candidate: no plan of the search is within the MACs budget and the "
                         "references are off; pass --selection-references (or --no-selection)")
    return out


def _build(base: nn.Module, splits: Splits, plan: PruningPlan, bn: BNRecalConfig, layers: Sequence[PrunableLayer]
           | None, bn_seed: int, device: torch.device) -> nn.Module:
    """The network finalize() fine-tunes for ``plan``: surgery, then BN re-estimated."""
    model = apply(base, plan, splits.input_shape, layers=layers).to(device).eval()
    if bn.bn_recal_batches > 0:
        bn.apply(model, splits, seed=bn_seed, device=device)
    return model


def _fresh_record(candidates: Sequence[Candidate], cfg: SelectionConfig, ft: FinetuneConfig,
                  macs: list[float]) -> dict[str, Any]:
    return {"config": dataclasses.asdict(cfg), "finetune_epochs": ft.epochs, "seed": ft.seed, "winner": None,
            "rungs": [], "cost_epochs": 0,
            "candidates": [{"index": i, "source": c.source, "search_objective": c.objective,
                            "macs_ratio": round(m, 6), "scores": {}, "plan": c.plan.to_dict()}
                           for i, (c, m) in enumerate(zip(candidates, macs))]}


def _load_record(path: Path, fresh: dict[str, Any]) -> dict[str, Any]:
    """The stage's saved state, refused unless made for the same candidates and settings."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot resume the selection from {path} ({exc}); delete it to run the stage afresh") \
            from None
    same = [(c["source"], PruningPlan.from_dict(c["plan"]).key()) for c in saved.get("candidates", [])] == \
        [(c["source"], PruningPlan.from_dict(c["plan"]).key()) for c in fresh["candidates"]]
    settings = {k: saved.get(k) for k in ("config", "finetune_epochs", "seed")} == \
        {k: fresh[k] for k in ("config", "finetune_epochs", "seed")}
    if not (same and settings):
        raise ValueError(f"{path} is the selection of other candidates or settings; delete its folder (or pass "
                         "--overwrite) to run the stage afresh")
    return saved


def select(base: nn.Module, splits: Splits, candidates: Sequence[Candidate], cfg: SelectionConfig,
           finetune_cfg: FinetuneConfig, *, out_dir: str | Path, bn: BNRecalConfig | None = None,
           layers: Sequence[PrunableLayer] | None = None, resume: bool = False, max_macs_ratio: float | None = None,
           writer: Any = None, bn_seed: int = 0, teacher_cache: TeacherCache | None = None,
           shared_dir: str | Path | None = None) -> dict[str, Any]:
    """Successive halving of short fine-tunes over ``candidates`` (see the module docstring).

    Args:
        base: the unpruned, trained network (the KD teacher; not modified).
        splits: ``train`` to fine-tune on, ``val`` to judge on (``test`` is not read).
        candidates: the plans to choose among, in priority order (ties go to the earlier).
        cfg: the stage's settings (``enabled`` is the caller's business).
        finetune_cfg: the run's full fine-tuning recipe (``epochs`` >= 1), ``seed`` and ``device`` included.
        out_dir: the stage's folder (``selection.json``, ``candidate_<i>.pt``).
        bn: BN re-estimation before fine-tuning, as :func:`finalize` does.
        layers: ``base``'s prunable layers if known.
        resume: continue the stage saved in ``out_dir`` (else its earlier files are replaced).
        max_macs_ratio: refuse (``ValueError``, before any work) a candidate whose MACs ratio exceeds this.
        writer: a TensorBoard ``SummaryWriter``: ``selection/val_acc/<index>_<source>`` per rung (x: the rung),
            ``selection/winner`` and a ``selection`` text table.
        bn_seed, teacher_cache: as for :func:`finalize`.
        shared_dir: a folder of rung states and scores shared with other stages of the same ``base`` (see the
            module docstring); ``None``: the stage's own folder only.

    Returns:
        The record (also in ``selection.json``): ``candidates`` (``index``, ``source``, ``search_objective``,
        ``macs_ratio``, ``scores`` ``{epochs: validation accuracy %}``, ``plan``), ``rungs`` (``epochs``,
        ``candidates``, ``kept``), ``winner`` (index), ``winner_source``, ``cost_epochs`` (fine-tuning epochs
        of the rungs, as a stage alone spends them), ``shared_epochs`` (those taken from ``shared_dir``) and
        ``checkpoint`` (the winner's fine-tuning state, to continue).
    """
    bn = bn if bn is not None else BNRecalConfig()
    ft = finetune_cfg
    ft.check()
    check_finetune(ft)
    if not candidates:
        raise ValueError("the selection needs at least one candidate")
    device = next(base.parameters()).device
    ft = dataclasses.replace(ft, device=str(device)) if ft.device == "auto" else ft
    base_macs = count(base, splits.input_shape).macs
    macs = [count(apply(base, c.plan, splits.input_shape, layers=layers), splits.input_shape).macs / base_macs
            for c in candidates]
    if max_macs_ratio is not None:
        over = [(i, c.source, round(m, 4)) for i, (c, m) in enumerate(zip(candidates, macs)) if m > max_macs_ratio]
        if over:
            raise ValueError(f"selection candidates above the MACs budget {max_macs_ratio:.4f} (index, source, "
                             f"ratio): {over}; every candidate must be at the budget")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    record = _fresh_record(candidates, cfg, ft, macs)
    if resume and state_path.is_file():
        record = _load_record(state_path, record)
    else:
        for stale in [state_path, *out.glob("candidate_*.pt")]:  # an earlier stage's files: not continued
            stale.unlink(missing_ok=True)
    entries = record["candidates"]
    path_of = lambda i: out / f"candidate_{i}.pt"
    shared = None if shared_dir is None else Path(shared_dir)
    tags = [_candidate_tag(c.plan, ft, bn, bn_seed) for c in candidates] if shared is not None else []
    rung_path = (lambda i: shared / f"{tags[i]}.pt") if shared is not None else path_of
    save = lambda: ckpt.atomic_write_text(state_path, json.dumps(record, indent=1))
    teacher = base if ft.kd else None
    alive, rung = list(range(len(candidates))), 0
    while True:
        stop = min((rung + 1) * cfg.rung_epochs, ft.epochs)
        key = _epochs_key(stop)
        for i in alive:
            if key in entries[i]["scores"]:  # done before an interruption
                continue
            score = None if shared is None else _shared_scores(shared, tags[i]).get(key)
            if score is None:
                model = _build(base, splits, candidates[i].plan, bn, layers, bn_seed, device)
                summary = finetune(model, splits, ft, teacher=teacher, out=rung_path(i), resume=True,
                                   plan=candidates[i].plan.to_dict(), meta={"selection_candidate": i},
                                   teacher_cache=teacher_cache if ft.kd else None, stop_after=stop)
                score = summary["last_val_acc"] if summary.get("paused") else summary["val_acc"]
                if shared is not None:
                    _share_score(shared, tags[i], key, score)
            else:
                record["shared_epochs"] = round(record.get("shared_epochs", 0) + stop - rung * cfg.rung_epochs, 6)
            entries[i]["scores"][key] = score
            record["cost_epochs"] = round(record["cost_epochs"] + stop - rung * cfg.rung_epochs, 6)
            save()
            if writer is not None:
                writer.add_scalar(f"selection/val_acc/{i}_{candidates[i].source}", score, rung)
        ranked = sorted(alive, key=lambda i: (-entries[i]["scores"][key], i))
        last = stop >= ft.epochs or len(alive) == 1
        kept = ranked[:1] if last else ranked[:math.ceil(len(alive) / 2)]
        if len(record["rungs"]) <= rung:
            record["rungs"].append({"epochs": key, "candidates": list(alive), "kept": sorted(kept)})
        if last or len(kept) == 1:  # the winner: its fine-tune goes on in finalize()
            break
        alive, rung = sorted(kept), rung + 1
    winner = kept[0]
    if shared is not None and not path_of(winner).is_file():  # the winner goes on in its own copy: the shared
        shutil.copyfile(rung_path(winner), path_of(winner))  # state stays at its rung for the other stages
    record.update(winner=winner, winner_source=candidates[winner].source, checkpoint=str(path_of(winner)))
    save()
    if writer is not None:
        writer.add_scalar("selection/winner", winner, 0)
        writer.add_text("selection", markdown_table(record), 0)
        writer.flush()
    return record


def _candidate_tag(plan: PruningPlan, ft: FinetuneConfig, bn: BNRecalConfig, bn_seed: int) -> str:
    """A candidate's name in a shared folder: a digest of its plan and of the settings its rungs depend on."""
    recipe = {k: v for k, v in dataclasses.asdict(ft).items() if k != "progress"}
    settings = {"plan": plan.key(), "finetune": recipe, "bn": dataclasses.asdict(bn),
                "bn_seed": bn_seed}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _shared_scores(shared: Path, tag: str) -> dict[str, float]:
    """``{rung end: validation accuracy}`` measured for a candidate in ``shared`` (empty when none)."""
    path = shared / f"{tag}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _share_score(shared: Path, tag: str, key: str, score: float) -> None:
    shared.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(shared / f"{tag}.json", json.dumps({**_shared_scores(shared, tag), key: score}))


def _epochs_key(epochs: float) -> str:
    """A rung's end as the record's key: fine-tuning epochs, e.g. ``"0.25"``, ``"1"``."""
    return f"{round(epochs, 6):g}"


def markdown_table(record: Mapping[str, Any]) -> str:
    """The record as a markdown table: one row per candidate, its validation accuracy per rung, the winner."""
    epochs = [r["epochs"] for r in record["rungs"]]
    head = "| # | source | search objective | MACs ratio | " + " | ".join(f"val @ {e} ep" for e in epochs) + " |"
    rows = [head, "|" + "---|" * (4 + len(epochs))]
    for c in record["candidates"]:
        obj = "-" if c["search_objective"] is None else f"{c['search_objective']:.4f}"
        scores = " | ".join(f"{c['scores'][e]:.2f}" if e in c["scores"] else "-" for e in epochs)
        mark = " **winner**" if c["index"] == record["winner"] else ""
        rows.append(f"| {c['index']}{mark} | {c['source']} | {obj} | {c['macs_ratio']:.4f} | {scores} |")
    return "\n".join(rows)


def select_and_finalize(
    base: nn.Module,
    splits: Splits,
    candidates: Sequence[Candidate],
    cfg: SelectionConfig,
    finetune_cfg: FinetuneConfig,
    *,
    out_dir: str | Path,
    meta: dict[str, Any] | None = None,
    eval_limit: int | None = None,
    bn: BNRecalConfig | None = None,
    layers: Sequence[PrunableLayer] | None = None,
    bn_seed: int = 0,
    teacher_cache: TeacherCache | None = None,
    **stage: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`select` the winner, then :func:`finalize` it, its fine-tune continued to the full budget from its
    rung state (the run benchmarks and ``train_marl.py`` finalize). ``meta`` and ``eval_limit`` go to
    ``finalize``, ``stage`` (``resume``, ``max_macs_ratio``, ``writer``) to ``select``, the rest to both. Returns
    ``finalize``'s ``(network, report)`` with the stage's record under ``report["selection"]``."""
    shared = dict(bn=bn, layers=layers, bn_seed=bn_seed, teacher_cache=teacher_cache)
    record = select(base, splits, candidates, cfg, finetune_cfg, out_dir=out_dir, **shared, **stage)
    winner = candidates[record["winner"]]
    model, report = finalize(base, splits, plan=winner.plan, finetune_cfg=finetune_cfg, out=record["checkpoint"],
                             resume=True, meta={**(meta or {}), "selection_candidate": record["winner"]},
                             eval_limit=eval_limit, **shared)
    report["selection"] = record
    return model, report
