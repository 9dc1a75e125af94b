"""Interval tables of ``benchmarks.marl`` results: every method and selection against the best non-learned
baseline, seed-paired, with stratified-bootstrap 95 % intervals and the probability of improvement
(:mod:`benchmarks.stats`), and the goal of the project's default network (QMIX with the final selection over its
own candidates and the reference plans, what ``train_marl.py`` delivers) at each MACs target.

An *arm* is one (method, selection) pair, e.g. ``("qmix", "own+reference")``; its runs are its rows' TEST accuracies
after the fine-tune, one per seed. The rows are :func:`benchmarks.marl_report.result_rows`' (``selection`` set).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks import common
from benchmarks.stats import Interval, mean_interval, paired_differences, probability_of_improvement

__all__ = ["DEFAULT_ARM", "NON_LEARNED", "arm_runs", "best_baseline", "goal_records", "interval_records",
           "interval_section"]

Arm = tuple[str, str]

NON_LEARNED = ("dsfp-uniform", "random", "torch-pruning")
"""The methods that learn nothing: one uniform rate, random search, Torch-Pruning's global L1 ranking."""
DEFAULT_ARM: Arm = ("qmix", "own+reference")
"""What ``python train_marl.py`` delivers by default: QMIX, then the final selection with the reference plans."""
MIN_SEEDS = 2
"""An arm with fewer seeds at a target is listed but neither chosen as the baseline nor given an interval."""


def arm_runs(rows: Sequence[dict[str, Any]], target: float) -> dict[Arm, dict[int, float]]:
    """Per arm at ``target``: seed -> TEST accuracy after the fine-tune (%)."""
    out: dict[Arm, dict[int, float]] = {}
    for r in rows:
        if r["target"] == target:
            out.setdefault((r["method"], r["selection"]), {})[int(r["seed"])] = float(r["test_acc_after_ft"])
    return out


def _mean(runs: dict[int, float]) -> float:
    return common.mean_std(list(runs.values()))[0]


def best_baseline(arms: dict[Arm, dict[int, float]]) -> Arm | None:
    """The non-learned arm with the highest mean test accuracy among those with >= :data:`MIN_SEEDS` seeds (ties:
    the more seeds, then the name)."""
    cands = [a for a in arms if a[0] in NON_LEARNED and len(arms[a]) >= MIN_SEEDS]
    return max(cands, key=lambda a: (_mean(arms[a]), len(arms[a]), a), default=None)


def _contrast(a: dict[int, float], b: dict[int, float], seed: int) -> dict[str, Any]:
    """Seed-paired difference ``a - b`` (points) with its interval, and ``P(a > b)`` with its interval."""
    seeds, diff = paired_differences(a, b)
    if len(seeds) < MIN_SEEDS:
        return {"paired_seeds": seeds, "difference": None, "prob_improvement": None, "higher": None}
    return {"paired_seeds": seeds, "difference": mean_interval([diff], seed=seed).as_dict(),
            "prob_improvement": probability_of_improvement([[a[s] for s in seeds]], [[b[s] for s in seeds]],
                                                           seed=seed).as_dict(),
            "higher": int((diff > 0).sum())}


def interval_records(rows: Sequence[dict[str, Any]], target: float, seed: int = 0) -> list[dict[str, Any]]:
    """One record per arm at ``target``: its mean ± std over seeds, and its seed-paired contrast with the best
    non-learned baseline (the baseline's own record has no contrast)."""
    arms = arm_runs(rows, target)
    base = best_baseline(arms)
    out = []
    for arm in sorted(arms, key=lambda a: -_mean(arms[a])):
        mean, std = common.mean_std(list(arms[arm].values()))
        rec = {"target": target, "method": arm[0], "selection": arm[1], "seeds": sorted(arms[arm]), "mean": mean,
               "std": std, "baseline": None if base is None else {"method": base[0], "selection": base[1]}}
        if base is not None and arm != base:
            rec.update(_contrast(arms[arm], arms[base], seed))
        out.append(rec)
    return out


def goal_records(rows: Sequence[dict[str, Any]], targets: Sequence[float], seed: int = 0) -> list[dict[str, Any]]:
    """Per target, the project's goal: :data:`DEFAULT_ARM` against DSFP-uniform, random search with the same
    selection and Torch-Pruning (``met``: its mean at or above each one's), and QMIX's own candidates against random
    search's, both with the selection and without references (``own_above_zero``: the 95 % interval above 0)."""
    out = []
    for t in targets:
        arms = arm_runs(rows, t)
        mine = arms.get(DEFAULT_ARM, {})
        refs = {"dsfp-uniform": ("dsfp-uniform", "none"), "random": ("random", DEFAULT_ARM[1]),
                "torch-pruning": ("torch-pruning", "none")}
        rec: dict[str, Any] = {"target": t, "default": {"method": DEFAULT_ARM[0], "selection": DEFAULT_ARM[1],
                                                        "seeds": sorted(mine), "mean": _mean(mine) if mine else None}}
        met = bool(mine)
        for name, arm in refs.items():
            theirs = arms.get(arm, {})
            c = _contrast(mine, theirs, seed) if mine and theirs else None
            rec[name] = {"selection": arm[1], "seeds": sorted(theirs), "mean": _mean(theirs) if theirs else None,
                         "contrast": c}
            met = met and bool(theirs) and _mean(mine) >= _mean(theirs)
        rec["met"] = met if all(rec[n]["seeds"] for n in refs) and mine else None
        own_q, own_r = arms.get(("qmix", "own"), {}), arms.get(("random", "own"), {})
        own = _contrast(own_q, own_r, seed) if own_q and own_r else None
        rec["own_vs_random"] = own
        rec["own_above_zero"] = (None if own is None or own["difference"] is None
                                 else Interval(**own["difference"]).above_zero())
        out.append(rec)
    return out


def _cell(d: dict[str, Any] | None, digits: int = 2, sign: str = "+") -> str:
    return "-" if d is None else Interval(**d).cell(digits, sign)


def interval_section(rows: Sequence[dict[str, Any]], targets: Sequence[float], labels: dict[str, str],
                     seed: int = 0) -> tuple[list[str], dict[str, Any]]:
    """The markdown section (goal table, then one interval table per target) and its JSON
    (``{"goal": [...], "intervals": [...]}``)."""
    goal = goal_records(rows, targets, seed)
    records = [r for t in targets for r in interval_records(rows, t, seed)]
    md = ["## Goal: the default network (QMIX + selection with references) against every non-learned baseline", "",
          "TEST accuracy after the fine-tune (%), mean over seeds; in brackets the seed-paired difference of the "
          "default network to that baseline with its stratified-bootstrap 95 % interval (points). Met: the default's "
          "mean at or above all three. Last column: QMIX's own candidates against random search's, both through the "
          "same selection without references.", "",
          "| MACs target | QMIX + selection | DSFP-uniform | random + selection | Torch-Pruning | met | "
          "QMIX own - random own (95 % CI) |", "|---|---|---|---|---|---|---|"]
    for g in goal:
        cells = [common.fmt(g["default"]["mean"], None) + f" (n={len(g['default']['seeds'])})"]
        for name in ("dsfp-uniform", "random", "torch-pruning"):
            b, c = g[name], g[name]["contrast"]
            cells.append(common.fmt(b["mean"], None) + ("" if c is None or c["difference"] is None
                                                         else f" [{_cell(c['difference'])}]"))
        met = "-" if g["met"] is None else ("yes" if g["met"] else "no")
        own = g["own_vs_random"]
        own_cell = "-" if own is None else (_cell(own["difference"]) + f", n={len(own['paired_seeds'])}"
                                            + (", above 0" if g["own_above_zero"] else ""))
        md.append(f"| {g['target']:g} | " + " | ".join(cells) + f" | {met} | {own_cell} |")
    md += ["", "With 3 seeds a percentile bootstrap interval is narrow and under-covers (a resampled mean of 3 runs "
           "takes at most 10 values): read an interval that excludes 0 as suggestive, not as proof.", ""]
    for t in targets:
        recs = [r for r in records if r["target"] == t]
        base = recs[0]["baseline"] if recs else None
        md += [f"### MACs target {t:g}" + ("" if base is None else
                                          f": against {labels[base['method']]} ({base['selection']})"), ""]
        if base is None:
            md += [f"No non-learned baseline with {MIN_SEEDS} or more seeds at this target yet.", ""]
        md += ["| method | selection | seeds | test acc (%) | difference (points, 95 % CI) | P(improvement) (95 % CI) "
               "| higher in |", "|---|---|---|---|---|---|---|"]
        for r in recs:
            is_base = base is not None and (r["method"], r["selection"]) == (base["method"], base["selection"])
            diff = "baseline" if is_base else _cell(r.get("difference"))
            poi = "-" if is_base else _cell(r.get("prob_improvement"), 2, "")
            higher = "-" if r.get("higher") is None else f"{r['higher']} of {len(r['paired_seeds'])}"
            md.append(f"| {labels[r['method']]} | {r['selection']} | {len(r['seeds'])} | "
                      f"{common.fmt(r['mean'], r['std'])} | {diff} | {poi} | {higher} |")
        md.append("")
    return md, {"goal": goal, "intervals": records}
