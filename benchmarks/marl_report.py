"""The report of ``benchmarks/marl.py``: plots, tables and the summary paragraph, written from ``marl.json``.

One run of ``benchmarks.marl`` searches at one MACs target. For several targets, run one per target
(each into its own ``--out-dir``; two may run side by side with ``--threads 1``), then combine them::

    python -m benchmarks.marl --macs-target 0.5 --threads 1 --out-dir runs/marl/target-0.5 &
    python -m benchmarks.marl --macs-target 0.3 --threads 1 --out-dir runs/marl/target-0.3
    python -m benchmarks.marl_report --runs runs/marl/target-0.5 runs/marl/target-0.3  # -> benchmarks/results

Every function takes the recorded state and the benchmark's settings as a flat namespace
(``SimpleNamespace(**flat_dict(cfg))``: one attribute per setting, by flat name).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import (
    RESULTS,
    atomic_write_text,
    command_line,
    commit,
    hold_outputs,
    parse_config,
    write_markdown,
)
from pruning_env.core.config import option
from pruning_env.search import pareto_front

__all__ = ["ALGOS", "LABELS", "SELECTIONS", "TP_NAME", "best_so_far", "curve_band", "headline", "load_run",
           "plan_placement", "plots", "result_rows", "row_selection", "selection_table", "summary", "write_report",
           "write_targets_report"]

ALGOS = ["qmix", "vdn", "iql", "amc", "random", "dsfp-uniform"]
TP_NAME = "torch-pruning"
SELECTIONS = ("none", "own", "own+reference")
"""How a method's final network is chosen: its search's best plan (``none``), the final selection over its own best
plans (``own``), or over those and the reference plans at the same budget (``own+reference``)."""
LABELS = {"qmix": "QMIX", "vdn": "VDN", "iql": "IQL", "amc": "AMC (DDPG)", "random": "random search",
          "dsfp-uniform": "DSFP-uniform", TP_NAME: "Torch-Pruning global L1"}


def best_so_far(curve: list[dict[str, Any]], grid: np.ndarray) -> np.ndarray:
    """A search's best-so-far objective after each plan count of ``grid`` (shape ``(len(grid),)``).

    ``curve`` is a recorded search's ``curve`` (one entry per episode: ``plans`` measured so far and the ``best``
    objective so far). Before the first episode ended the value is NaN; after the last it stays at the last best.
    """
    plans, best = np.asarray([p["plans"] for p in curve]), np.asarray([p["best"] for p in curve], dtype=np.float64)
    idx = np.searchsorted(plans, grid, side="right") - 1
    y = np.where(idx >= 0, best[np.clip(idx, 0, None)], np.nan)
    y[grid > plans[-1]] = best[-1]
    return y


def curve_band(curves: list[list[dict[str, Any]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(grid, mean, min, max)`` of several seeds' best-so-far curves on plan counts ``1 .. the largest``.

    Seeds start at different plan counts (after their first episode); the band starts where every seed has a value,
    so the mean of best-so-far values never decreases (NaN before that).
    """
    grid = np.arange(1, max(c[-1]["plans"] for c in curves) + 1)
    ys = np.asarray([best_so_far(c, grid) for c in curves])
    complete = ~np.isnan(ys).any(axis=0)
    filled = np.where(complete, ys, 0.0)
    return (grid, np.where(complete, filled.mean(axis=0), np.nan), np.where(complete, filled.min(axis=0), np.nan),
            np.where(complete, filled.max(axis=0), np.nan))


def plots(state: dict[str, Any], cfg: Any, out_dir: Path, suffix: str = "") -> None:
    """``marl_curves<suffix>.png`` (best-so-far objective against plans measured) and ``marl_pareto<suffix>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = [a for a in cfg.algos if any(a in r["search"] for r in state["runs"].values())]
    colors = {a: plt.cm.tab10(i) for i, a in enumerate(ALGOS + [TP_NAME])}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a in algos:
        curves = [r["search"][a]["curve"] for r in state["runs"].values() if a in r["search"]]
        grid, mean, lo, hi = curve_band(curves)
        ax.plot(grid, mean, color=colors[a], label=f"{LABELS[a]} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(grid, lo, hi, color=colors[a], alpha=0.15)
    ax.axvline(cfg.plans, color="grey", ls=":", lw=1)
    ax.set_xlabel("plans evaluated (env.num_evaluations, greedy evaluations included)")
    ax.set_ylabel(f"best-so-far validation objective ({cfg.reward})")
    ax.set_title("Search progress at equal budget (mean over seeds, band = min..max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"marl_curves{suffix}.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a in algos:
        pts = [p for r in state["runs"].values() if a in r["search"] for p in r["search"][a]["points"]]
        ax.scatter([p["macs_ratio"] for p in pts], [p["acc_ratio"] for p in pts], s=5, alpha=0.15, color=colors[a])
        front = pareto_front(pts)
        ax.plot([p["macs_ratio"] for p in front], [p["acc_ratio"] for p in front], ".-", color=colors[a], ms=3,
                label=f"{LABELS[a]} ({len(pts)} plans)")
        bests = [r["search"][a]["best"] for r in state["runs"].values() if a in r["search"]]
        ax.plot([b["macs_ratio"] for b in bests], [b["acc_ratio"] for b in bests], "*", color=colors[a], ms=11,
                mec="k", mew=0.5)
    tps = [r["finetune"][TP_NAME] for r in state["runs"].values() if TP_NAME in r.get("finetune", {})]
    if tps:
        ax.plot([t["macs_ratio"] for t in tps], [t["val_acc_ratio"] for t in tps], "kX", ms=9,
                label=LABELS[TP_NAME])
    if cfg.reward == "budget":
        ax.axvline(cfg.macs_target, color="grey", ls=":", lw=1, label=f"MACs target {cfg.macs_target:g}")
    ax.set_xlabel("MACs ratio (pruned / unpruned)")
    ax.set_ylabel("validation accuracy ratio (before fine-tuning)")
    ax.set_title("Every plan measured, all seeds pooled; Pareto fronts; stars = best plans")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"marl_pareto{suffix}.png", dpi=120)
    plt.close(fig)


def _acc_at_target(search: dict[str, Any], target: float) -> float | None:
    """Best validation accuracy ratio among ALL plans the search measured with MACs ratio <= target."""
    accs = [p["acc_ratio"] for p in search["points"] if p["macs_ratio"] <= target]
    return max(accs) if accs else None


def plan_placement(searches: list[dict[str, Any]], target: float, near: float = 0.01) -> dict[str, Any]:
    """Where searches measured their plans: how many, the share within ``near`` of ``target`` MACs, the share at or
    below it, and the 5th / 50th / 95th percentiles of the MACs ratio (every plan of every search pooled)."""
    macs = np.asarray([p["macs_ratio"] for s in searches for p in s["points"]], dtype=np.float64)
    if macs.size == 0:
        return {"plans": 0, "near_target": float("nan"), "at_or_below": float("nan"),
                "macs_percentiles": [float("nan")] * 3}
    return {"plans": int(macs.size), "near_target": float(np.mean(np.abs(macs - target) <= near)),
            "at_or_below": float(np.mean(macs <= target + 1e-9)),
            "macs_percentiles": [float(q) for q in np.percentile(macs, [5, 50, 95])]}


def _compare(state: dict[str, Any], a: str, b: str, section: str, key: str) -> dict[str, Any] | None:
    pairs = []
    for run in state["runs"].values():
        ra, rb = run.get(section, {}).get(a), run.get(section, {}).get(b)
        if ra and rb:
            if key.startswith("acc_at_"):
                va, vb = (_acc_at_target(r, float(key[len("acc_at_"):])) for r in (ra, rb))
                if va is None or vb is None:
                    continue
            else:
                va = ra["best"][key] if section == "search" else ra[key]
                vb = rb["best"][key] if section == "search" else rb[key]
            ma = ra["best"]["macs_ratio"] if section == "search" else ra["macs_ratio"]
            mb = rb["best"]["macs_ratio"] if section == "search" else rb["macs_ratio"]
            pairs.append((va, vb, ma, mb))
    if not pairs:
        return None
    d = [p[0] - p[1] for p in pairs]
    return {"n": len(pairs), "a": common.mean_std([p[0] for p in pairs]), "b": common.mean_std([p[1] for p in pairs]),
            "diff": common.mean_std(d), "wins": sum(x > 0 for x in d), "ties": sum(x == 0 for x in d),
            "macs_a": common.mean_std([p[2] for p in pairs])[0], "macs_b": common.mean_std([p[3] for p in pairs])[0]}


def _verdict(c: dict[str, Any], noise: float = 0.0) -> str:
    m, _ = c["diff"]
    if abs(m) <= noise:
        return "is within measurement noise of"
    if c["wins"] == c["n"] and m > 0:
        return "beats"
    if c["wins"] == 0:
        return "does not beat" if c["ties"] < c["n"] else "ties with"
    return "is mixed against"


def summary(state: dict[str, Any], cfg: Any) -> str:
    """A paragraph written from the recorded numbers only."""
    n_seeds = len(state["runs"])
    if "qmix" not in cfg.algos:
        return "QMIX was not among the algorithms run, so no QMIX comparison is made."
    eval_size = state.get("baseline", {}).get("env_config", {}).get("eval_size", cfg.eval_size)
    res = 100.0 / eval_size
    epochs = f"{cfg.finetune_epochs} epoch{'s' if cfg.finetune_epochs != 1 else ''}"
    parts, head_val, head_test = [], [], []
    for other in ("dsfp-uniform", "random"):
        if other not in cfg.algos:
            continue
        m = _compare(state, "qmix", other, "search", f"acc_at_{cfg.macs_target}") if cfg.reward == "budget" else None
        f = _compare(state, "qmix", other, "finetune", "test_acc")
        if m is not None:
            head_val.append(f"{_verdict(m, 2 * res / 100)} {LABELS[other]} ({m['diff'][0]:+.4f} accuracy ratio, "
                            f"QMIX higher in {m['wins']} of {m['n']})")
        if f is not None:
            head_test.append(f"{_verdict(f)} {LABELS[other]} ({f['diff'][0]:+.2f} points, higher in {f['wins']} of "
                             f"{f['n']}, at MACs ratios {f['macs_a']:.3f} vs {f['macs_b']:.3f})")
    if head_val:
        parts.append(f"Headline: among all plans measured with MACs ratio <= {cfg.macs_target:g}, QMIX "
                     + " and ".join(head_val) + " on validation accuracy (before fine-tuning)"
                     + ("; after identical fine-tuning of each best plan, QMIX " + " and ".join(head_test)
                        + " on test accuracy" if head_test else "") + ".")
    elif head_test:
        parts.append("Headline: after identical fine-tuning of each best plan, QMIX " + " and ".join(head_test)
                     + " on test accuracy.")
    for other in ("dsfp-uniform", "random"):
        if other not in cfg.algos:
            continue
        c = _compare(state, "qmix", other, "search", "objective")
        if c is None:
            continue
        text = (f"On the validation objective of the search, QMIX {_verdict(c, 2 * res / 100)} {LABELS[other]}: "
                f"{c['a'][0]:.4f} vs {c['b'][0]:.4f} (difference {common.fmt(*c['diff'], 4, sign='+')}"
                f"; QMIX higher in {c['wins']} of {c['n']} seed{'s' if c['n'] > 1 else ''}), at MACs ratios "
                f"{c['macs_a']:.3f} vs {c['macs_b']:.3f}")
        if abs(c["macs_a"] - c["macs_b"]) > 0.05:
            text += " (the MACs are NOT well matched: compare with care)"
        if cfg.reward == "budget":
            m = _compare(state, "qmix", other, "search", f"acc_at_{cfg.macs_target}")
            if m is not None:
                text += (f". At strictly matched MACs (the best of ALL plans measured with MACs ratio <= "
                         f"{cfg.macs_target:g}) the validation accuracy ratio is {m['a'][0]:.4f} vs {m['b'][0]:.4f} "
                         f"(QMIX higher in {m['wins']} of {m['n']})")
        f = _compare(state, "qmix", other, "finetune", "test_acc")
        if f is not None:
            kd = ", KD" if cfg.finetune_kd else ""
            text += (f". After identical fine-tuning ({epochs}{kd}) the test accuracy is "
                     f"{f['a'][0]:.2f} % vs {f['b'][0]:.2f} % "
                     f"(difference {common.fmt(*f['diff'], 2, sign='+')} points"
                     f"; QMIX higher in {f['wins']} of {f['n']}): QMIX {_verdict(f)} it after fine-tuning")
        parts.append(text + ".")
    t = _compare(state, "qmix", TP_NAME, "finetune", "test_acc")
    if t is not None:
        parts.append(f"Against Torch-Pruning's global L1-magnitude pruning (MACs ratio {t['macs_b']:.3f} vs QMIX's "
                     f"{t['macs_a']:.3f}), QMIX's fine-tuned test accuracy is {t['a'][0]:.2f} % vs {t['b'][0]:.2f} % "
                     f"(difference {t['diff'][0]:+.2f} points; QMIX higher in {t['wins']} of {t['n']}).")
    if not parts:
        return "Not enough finished results for a QMIX comparison yet."
    caveat = (f" One validation image is {res:.2f} % of the reward subset ({eval_size} images), so objective "
              f"differences below about {2 * res / 100:.3f} are within measurement noise")
    caveat += (f"; with {n_seeds} seed{'s' if n_seeds > 1 else ''} "
               + ("there is no estimate of seed-to-seed variation, so none of this is a statistical claim."
                  if n_seeds == 1 else "the ± figures are standard deviations over seeds, not confidence intervals."))
    return " ".join(parts) + caveat


def write_report(state: dict[str, Any], cfg: Any, out_dir: Path | None, header: dict[str, str],
                 suffix: str = "") -> str:
    """The markdown report of one target (written to ``out_dir/marl.md`` unless ``out_dir`` is None)."""
    runs = state["runs"]
    seeds = sorted(runs, key=int)
    base = state.get("baseline", {})
    algos = [a for a in cfg.algos if any(a in runs[s]["search"] for s in seeds)]
    md = ["# MARL search benchmark: QMIX vs other searches at equal budget and matched MACs", "",
          f"Command: `{header['command']}`  ", f"Commit: {header['commit']}  ", f"Machine: {header['machine']}  ",
          f"Date: {header['date']}  ",
          f"Problem: {header['problem']}  ",
          f"Seeds: {', '.join(seeds)}; budget: {cfg.plans} measured plans per algorithm and seed (greedy "
          f"evaluations included; greedy every {cfg.eval_every} episodes); reward `{cfg.reward}`"
          + (f" with MACs target {cfg.macs_target:g}" if cfg.reward == "budget" else "")
          + (f" (lam {cfg.lam:g})" if cfg.reward == "linear" else "") + f"; episode length {cfg.episode_length}; "
          f"rates {cfg.rates}  ",
          f"Total wall time of this invocation: {header['wall']}", ""]
    if base:
        md += [f"Unpruned baseline: test accuracy {base['test_acc']:.2f} %, validation accuracy on the reward subset "
               f"{base['val_acc']:.2f} %, {base['macs'] / 1e6:.2f} M MACs, {base['params'] / 1e6:.3f} M params.", ""]
    md += ["## Summary", "", summary(state, cfg), "",
           "## Search (validation, before fine-tuning)", "",
           "Mean ± std over seeds. Best plan = the final plan of a training or greedy episode with the highest "
           "validation objective. Search time excludes env set-up (DSFP scores of the unpruned network).", "",
           "| algorithm | seeds | plans used | episodes | best val objective | val acc ratio | MACs ratio | "
           f"params ratio | best val acc ratio of all plans at MACs <= {cfg.macs_target:g} | search wall (s) | "
           "stopped early |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in algos:
        rs = [runs[s]["search"][a] for s in seeds if a in runs[s]["search"]]
        cells = [common.fmt_values([r["plans_used"] for r in rs], 0), common.fmt_values([r["episodes"] for r in rs], 0),
                 *(common.fmt_values([r["best"][k] for r in rs], 4) for k in ("objective", "acc_ratio", "macs_ratio",
                                                                      "params_ratio")),
                 common.fmt_values([_acc_at_target(r, cfg.macs_target) for r in rs], 4),
                 common.fmt_values([r["seconds"] for r in rs], 1), f"{sum(r['exhausted'] for r in rs)} of {len(rs)}"]
        md.append(f"| {LABELS[a]} | {len(rs)} | " + " | ".join(cells) + " |")
    if cfg.reward == "budget":
        md += ["", "Where the searches measured their plans (every plan, intermediate steps of episodes included; "
               f"all seeds pooled): the share within 0.01 of the MACs target {cfg.macs_target:g}, the share at or "
               "below it, and percentiles of the MACs ratio.", "",
               "| algorithm | plans | within 0.01 of target | at or below target | MACs ratio 5 / 50 / 95 % |",
               "|---|---|---|---|---|"]
        for a in algos:
            p = plan_placement([runs[s]["search"][a] for s in seeds if a in runs[s]["search"]], cfg.macs_target)
            md.append(f"| {LABELS[a]} | {p['plans']} | {p['near_target']:.0%} | {p['at_or_below']:.0%} | "
                      + " / ".join(f"{q:.3f}" for q in p["macs_percentiles"]) + " |")
    ft_names = [a for a in [*algos, TP_NAME] if any(a in runs[s].get("finetune", {}) for s in seeds)]
    if ft_names:
        epochs = f"{cfg.finetune_epochs} epoch{'s' if cfg.finetune_epochs != 1 else ''}"
        md += ["", f"## After identical fine-tuning ({epochs}, "
               + ("KD from the unpruned network" if cfg.finetune_kd else "cross-entropy")
               + (f", {cfg.finetune_train_limit} training images per epoch" if cfg.finetune_train_limit
                  else ", full training split")
               + ")", "",
               "TEST accuracy. 'Before' = right after pruning with BatchNorm re-estimated as in the env's reward. "
               "MACs and params ratios counted on the pruned network (`pruning_env.engine.flops.count`). "
               "Val objective = "
               "the env's objective of the pruned network before fine-tuning (for the searches: the value the "
               "search saw). Torch-Pruning: `MagnitudePruner` with `MagnitudeImportance(p=1)`, global pruning of "
               "the same convs (all Linears ignored), per-layer cap = the largest grid rate, iterative steps until "
               "the MACs ratio is <= "
               + ("the QMIX best plan's MACs ratio of the same seed." if cfg.tp_target == "qmix" and "qmix" in algos
                  else f"{cfg.macs_target:g}."), "",
               "The searches' best plans were re-measured here from scratch: "
               + ("the validation objective matches the search's in every case."
                  if all(abs(r["val_objective"] - r["search_val_objective"]) < 1e-9 for s in seeds
                         for r in runs[s].get("finetune", {}).values() if r.get("search_val_objective") is not None)
                  else "**the validation objective differs from the search's for some plans** (see marl.json: "
                       "val_objective vs search_val_objective)."), "",
               "| method | seeds | MACs ratio | params ratio | val objective | test acc before FT (%) | "
               "test acc after FT (%) | retention | FT wall (s) |", "|---|---|---|---|---|---|---|---|---|"]
        for a in ft_names:
            rs = [runs[s]["finetune"][a] for s in seeds if a in runs[s].get("finetune", {})]
            digits = {"macs_ratio": 4, "params_ratio": 4, "val_objective": 4, "test_acc_before_finetune": 2,
                      "test_acc": 2, "retention": 4, "seconds": 1}
            md.append(f"| {LABELS[a]} | {len(rs)} | "
                      + " | ".join(common.fmt_values([r[k] for r in rs], d) for k, d in digits.items()) + " |")
    rows = result_rows(state, cfg.macs_target)
    if any(row_selection(r) != "none" for r in rows):
        k, rung = getattr(cfg, "selection_k", "k"), getattr(cfg, "selection_rung_epochs", "R")
        md += ["", "## Final selection: each method with its own candidates, and with the references added", "",
               f"`none`: the search's best plan, fine-tuned as above. `own`: successive halving of short KD "
               f"fine-tunes ({rung} epoch per rung, the better half by VALIDATION accuracy goes on) over the "
               f"method's own {k} best distinct plans, the winner's fine-tune continued to the full budget. "
               "`own+reference`: the same with the uniform plan, the gradual uniform plan (the same keep "
               "counts in the episode's equal steps, the DSFP scores re-measured after each) and the global "
               "plan (Torch-Pruning's "
               "iterative global group-L1 pruning rebuilt by our engine, its last step's filters given back "
               "while the budget holds) at the same MACs budget added (the same references for every method). "
               "Torch-Pruning's network is compared as it is. TEST accuracy after the fine-tune, mean ± std "
               "over seeds (n = seeds); winners: the source of the selected network per seed (search = one of "
               "the method's own plans).", "", *selection_table(rows)]
    md += ["", "## Per seed", "",
           "| seed | method | plans used | best val objective | MACs ratio | test before FT (%) | test after FT (%) "
           "| search wall (s) | FT wall (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        for a in [*algos, TP_NAME]:
            sr, fr = runs[s]["search"].get(a), runs[s].get("finetune", {}).get(a)
            if not sr and not fr:
                continue
            cells = [s, LABELS[a], sr["plans_used"] if sr else "-",
                     f"{sr['best']['objective'] if sr else fr['val_objective']:.4f}",
                     f"{fr['macs_ratio'] if fr else sr['best']['macs_ratio']:.4f}",
                     f"{fr['test_acc_before_finetune']:.2f}" if fr else "-", f"{fr['test_acc']:.2f}" if fr else "-",
                     f"{sr['seconds']:.1f}" if sr else "-", f"{fr['seconds']:.1f}" if fr else "-"]
            md.append("| " + " | ".join(str(c) for c in cells) + " |")
    md += ["", f"![learning curves](marl_curves{suffix}.png)", "", f"![Pareto fronts](marl_pareto{suffix}.png)", "",
           "## How to read this", "",
           "* Budget = distinct plans the algorithm's own env measured (`env.num_evaluations`, cache misses): "
           "re-visiting a plan is free, greedy evaluations cost like training episodes. Episodes are never cut, "
           "so 'plans used' can exceed the budget by up to episode_length - 1.",
           "* The Pareto plot pools every plan measured, including the intermediate steps of episodes; the best "
           "plan is chosen among episode-final plans, as `train_marl.py` does.",
           "* Exploration schedules are scaled to the budget by each algorithm's `budget_overrides` hook "
           "(QMIX/VDN/IQL: epsilon 1 -> 0.05 over half the budget's env steps; AMC: warm-up of 1/8 of the expected "
           "episodes); all other hyper-parameters are the algorithms' defaults"
           + (f" plus `--algo-config {cfg.algo_config}`" if cfg.algo_config else "") + ".",
           "* DSFP-uniform can only produce one plan per grid rate; it stops once it has tried them all.", ""]
    text = "\n".join(md)
    if out_dir is not None:
        write_markdown(out_dir / "marl.md", text)
    return text


# ----------------------------------------------------------------------------- several MACs targets


def result_rows(state: dict[str, Any], target: float) -> list[dict[str, Any]]:
    """One flat row per (target, method, seed, selection) of the finished fine-tunes and selections (method names
    as in ``--algos``, plus ``torch-pruning``; ``selection`` one of :data:`SELECTIONS`): MACs ratio, validation
    objective and TEST accuracy before / after the fine-tune, and the source of the network (``winner_source``:
    ``search``, ``uniform`` or ``global``; ``torch-pruning`` for its network)."""
    rows = []
    for seed, run in sorted(state["runs"].items(), key=lambda kv: int(kv[0])):
        done = [("none", method, ft) for method, ft in run["finetune"].items()]
        done += [(mode, method, r) for mode in SELECTIONS[1:] for method, r in run.get("selection", {}).get(mode,
                                                                                                       {}).items()]
        for mode, method, r in done:
            source = r.get("winner_source", TP_NAME if method == TP_NAME else "search")
            rows.append({"target": target, "method": method, "seed": int(seed), "selection": mode,
                         "macs_ratio": r["macs_ratio"], "val_objective": r["val_objective"],
                         "test_acc_before_ft": r["test_acc_before_finetune"], "test_acc_after_ft": r["test_acc"],
                         "winner_source": source})
    return rows


def row_selection(row: dict[str, Any]) -> str:
    """A row's selection mode: rows recorded before the modes existed are the search's best plan (``none``)."""
    return row.get("selection", "none")


def selection_table(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table of one target's rows: per method, the TEST accuracy after the fine-tune in each selection
    mode (mean ± std over seeds) and the sources of the winners (``source count``, over seeds)."""
    methods = [m for m in [*ALGOS, TP_NAME] if any(r["method"] == m for r in rows)]
    md = ["| method | " + " | ".join(f"test acc, {m} (%)" for m in SELECTIONS) + " | "
          + " | ".join(f"winners, {m}" for m in SELECTIONS[1:]) + " |", "|---|" + "---|" * (2 * len(SELECTIONS) - 1)]
    for method in methods:
        by_mode = {m: [r for r in rows if r["method"] == method and row_selection(r) == m] for m in SELECTIONS}
        accs = [common.fmt(*common.mean_std([r["test_acc_after_ft"] for r in by_mode[m]]), 2)
                + (f" (n={len(by_mode[m])})" if by_mode[m] else "") for m in SELECTIONS]
        sources = []
        for m in SELECTIONS[1:]:
            counts = {}
            for r in by_mode[m]:
                counts[r["winner_source"]] = counts.get(r["winner_source"], 0) + 1
            sources.append(", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-")
        md.append(f"| {LABELS[method]} | " + " | ".join(accs + sources) + " |")
    return md


def state_settings(state: dict[str, Any]) -> SimpleNamespace:
    """The flat settings of a recorded run (as :func:`summary` and :func:`write_report` take them)."""
    algos = [a for a in ALGOS if any(a in r["search"] for r in state["runs"].values())]
    return SimpleNamespace(**state["search_config"], **state["finetune_config"], **state.get("selection_config", {}),
                           algos=algos)


MACS_SLACK = 0.005
"""A final network may sit at most this far above its MACs target (the issue's acceptance)."""


def headline(states: list[dict[str, Any]], goal: float = 1.0) -> list[dict[str, Any]]:
    """Per target: QMIX against DSFP-uniform after identical fine-tuning (test accuracy, paired by seed).

    A target without both fine-tunes for any seed gets ``seeds: 0`` and None values; the standard deviations are
    None with a single seed (no estimate of seed-to-seed variation)."""
    out = []
    for state in states:
        target = state["search_config"]["macs_target"]
        c = _compare(state, "qmix", "dsfp-uniform", "finetune", "test_acc")
        if c is None:
            out.append({"target": target, "seeds": 0, "qmix": None, "qmix_std": None, "dsfp_uniform": None,
                        "dsfp_uniform_std": None, "difference": None, "difference_std": None, "qmix_higher": 0,
                        "goal_points": goal, "goal_met": None})
            continue
        out.append({"target": target, "seeds": c["n"], "qmix": c["a"][0], "qmix_std": c["a"][1],
                    "dsfp_uniform": c["b"][0], "dsfp_uniform_std": c["b"][1], "difference": c["diff"][0],
                    "difference_std": c["diff"][1], "qmix_higher": c["wins"], "goal_points": goal,
                    "goal_met": c["diff"][0] >= goal})
    return out


def _check_comparable(states: list[dict[str, Any]]) -> None:
    """Refuse runs that differ in anything but the MACs target (they would be reported as one benchmark)."""
    def key(st: dict[str, Any]) -> dict[str, Any]:
        return {**{k: v for k, v in st["search_config"].items() if k != "macs_target"}, **st["finetune_config"],
                **st.get("selection_config", {})}
    first = key(states[0])
    for st in states[1:]:
        other = key(st)
        diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if diff:
            raise ValueError("the runs differ in more than the MACs target (" + ", ".join(diff) + "): combine only "
                             "runs of one benchmark setting")
    names = [f"{st['search_config']['macs_target']:g}" for st in states]
    if len(set(names)) != len(names):
        raise ValueError(f"two runs have the same MACs target ({', '.join(names)}): pass one run per target")


def write_targets_report(states: list[dict[str, Any]], out_dir: Path, command: str, commit: str) -> dict[str, Any]:
    """``marl.md`` / ``marl.json`` / plots of several per-target runs of ``benchmarks/marl.py``.

    ``marl.json``: ``{"rows": [one per (target, method, seed)], "headline": [...], "targets": {target: the
    run's state}}``; ``marl.md``: the headline and an overview of every method at every target, then each
    target's full report (plots ``marl_curves-<t>.png`` / ``marl_pareto-<t>.png``)."""
    if not states:
        raise ValueError("no runs to combine")
    _check_comparable(states)
    states = sorted(states, key=lambda st: -st["search_config"]["macs_target"])
    targets = [st["search_config"]["macs_target"] for st in states]
    rows = [r for st, t in zip(states, targets) for r in result_rows(st, t)]
    head = headline(states)
    over = [r for r in rows if r["macs_ratio"] > r["target"] + MACS_SLACK]
    md = [f"# MARL search benchmark: QMIX vs the other searches at exact MACs budgets (targets "
          f"{', '.join(f'{t:g}' for t in targets)})", "",
          f"Report: `{command}` at commit {commit}. Each target's own command, commit, machine and wall time are "
          "in its section.", "", "## Headline: QMIX vs DSFP-uniform after identical fine-tuning", "",
          "| MACs target | seeds | QMIX test acc (%) | DSFP-uniform test acc (%) | difference (points) | QMIX higher "
          "in | goal (>= +1.0) |", "|---|---|---|---|---|---|---|"]
    for h in head:
        goal = "-" if h["goal_met"] is None else ("met" if h["goal_met"] else "not met")
        md.append(f"| {h['target']:g} | {h['seeds']} | {common.fmt(h['qmix'], h['qmix_std'])} | "
                  f"{common.fmt(h['dsfp_uniform'], h['dsfp_uniform_std'])} | "
                  f"{common.fmt(h['difference'], h['difference_std'], sign='+')} | "
                  f"{h['qmix_higher']} of {h['seeds']} | {goal} |")
    if any(h["seeds"] < 3 for h in head):
        md += ["", "Fewer than 3 seeds at some target (0: QMIX or DSFP-uniform not fine-tuned yet): no statistical "
               "claim; a ± is a standard deviation over seeds, shown from 2 seeds on."]
    from benchmarks.marl_stats import interval_section  # it reads this module's rows and labels
    stats_md, stats = interval_section(rows, targets, LABELS)
    md += ["", *stats_md, "Each target's unpruned baseline (one run per target; a digest differs when the cached "
           "baseline was retrained, e.g. on another CPU): " + "; ".join(
               f"{t:g}: test {st['baseline']['test_acc']:.2f} %, weights {st.get('baseline_digest') or 'not recorded'}"
               for st, t in zip(states, targets) if "baseline" in st) + ".", ""]
    plain = [r for r in rows if row_selection(r) == "none"]
    methods = [m for m in [*ALGOS, TP_NAME] if any(r["method"] == m for r in plain)]
    md += ["", "## Every method at every target (the search's best plan: TEST accuracy after the fine-tune, mean ± "
           "std over seeds)", "",
           "| method | " + " | ".join(f"MACs ratio @{t:g} (max) | test acc @{t:g} (%)" for t in targets) + " |",
           "|---|" + "---|---|" * len(targets)]
    for m in methods:
        cells = []
        for t in targets:
            rs = [r for r in plain if r["method"] == m and r["target"] == t]
            cells += [f"{max(r['macs_ratio'] for r in rs):.4f}" if rs else "-",
                      common.fmt_values([r["test_acc_after_ft"] for r in rs], 2)]
        md.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    md += ["", (f"Every final network is at or below its target + {MACS_SLACK} MACs ratio." if not over else
                f"**{len(over)} final networks exceed their target + {MACS_SLACK}**: "
                + ", ".join(f"{r['method']} ({row_selection(r)}) seed {r['seed']} @{r['target']:g} "
                            f"({r['macs_ratio']:.4f})"
                            for r in over) + "."), ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    for st, t in zip(states, targets):
        suffix = f"-{t:g}"
        cfg = state_settings(st)
        plots(st, cfg, out_dir, suffix)
        text = write_report(st, cfg, None, st["header"], suffix)
        md += [f"## MACs target {t:g}", ""] + ["#" + line if line.startswith("#") else line
                                               for line in text.splitlines()[1:]]
    result = {"benchmark": "marl", "command": command, "commit": commit, "rows": rows, "headline": head, **stats,
              "macs_slack": MACS_SLACK, "rows_over_target": over, "targets": {f"{t:g}": st for st, t in
                                                                               zip(states, targets)}}
    write_markdown(out_dir / "marl.md", "\n".join(md))
    atomic_write_text(out_dir / "marl.json", json.dumps(result, indent=1))
    return result


STATE_FILE = "marl.json"
"""The recorded state of a ``benchmarks.marl`` run in its ``--out-dir``: its runs lock it (a report reading it too)."""


def load_run(run: str | Path) -> dict[str, Any]:
    """The recorded state (``marl.json``) of a finished ``benchmarks.marl`` run in the folder ``run``.

    Raises ValueError (saying what to do) when the folder holds no ``marl.json`` or an unfinished run.
    """
    path = Path(run) / STATE_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist: pass the --out-dir of a finished `python -m benchmarks.marl` run")
    state = json.loads(path.read_text())
    if "header" not in state or state.get("benchmark") != "marl":
        raise ValueError(f"{path} is not a finished benchmarks.marl run (no report header): finish it with "
                         "--resume first")
    return state


@dataclass
class TargetsConfig:
    """Every flag of ``python -m benchmarks.marl_report``."""

    runs: list[str] = option(["runs/marl/target-0.5", "runs/marl/target-0.3"], "the --out-dir folders of "
                             "finished benchmarks.marl runs, one per MACs target (each holds a marl.json)")
    out_dir: str = option(str(RESULTS), "folder of the combined marl.md, marl.json and plots")


def main(argv: list[str] | None = None) -> int:
    """The report of several targets' runs: ``python -m benchmarks.marl_report --runs DIR [DIR ...]``."""
    cfg = parse_config(TargetsConfig, argv, "marl_report", __doc__)
    # its own outputs, and the runs it reads: a run still writing its marl.json is not reported on
    outputs = [("--out-dir", Path(cfg.out_dir) / STATE_FILE), *(("--runs", Path(r) / STATE_FILE) for r in cfg.runs)]
    with hold_outputs("marl_report", files=outputs):
        return _main(cfg, argv)


def _main(cfg: TargetsConfig, argv: list[str] | None) -> int:
    try:
        states = [load_run(run) for run in cfg.runs]
        result = write_targets_report(states, Path(cfg.out_dir), command_line("marl_report", argv), commit())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result["headline"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
