"""Learning curves of searches side by side: which variant of a search finds better plans with fewer measured plans.

An ablation of one search setting (QMIX's ``explore_radius``, its epsilon schedule, the episode length, ...)
is one ``benchmarks.marl`` run per variant, each into its own ``--out-dir``, with the same MACs target, seeds and
reward (``--finetune-epochs 0`` when only the search matters: the best plans are then reported before any
fine-tuning). This report reads the runs' ``marl.json`` and writes, per (run, algorithm):

* the best-so-far validation objective after 25, 50, 100, ... measured plans (``--at``), mean ± std over seeds
  (the search's budget is the last column), and the seed-paired difference to the first run at the end;
* the share of measured plans within 0.01 of the MACs target, and the best plan's validation accuracy ratio and
  TEST accuracy before (and, where the run fine-tuned, after) the fine-tune;
* a plot of the mean best-so-far curves (band: min..max over seeds).

Runs whose objectives are not in the same units (another reward, proxy, MACs target, baseline or number of reward
images) are refused: their curves cannot be compared. Every other setting may differ; the report names, per run,
the settings in which it differs from the first::

    python -m benchmarks.marl --macs-target 0.5 --algos qmix --finetune-epochs 0 \\
        --algo-config '{"qmix": {"explore_radius": 1}}' --out-dir runs/marl/explore1-0.5
    python -m benchmarks.search_curves --runs runs/marl/target-0.5 runs/marl/explore1-0.5 \\
        --labels "uniform exploration" "radius 1" --algos qmix --out benchmarks/results/exploration.md
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    atomic_write_text,
    command_line,
    commit,
    fmt,
    fmt_values,
    hold_outputs,
    mean_std,
    parse_config,
    results_path,
    write_markdown,
)
from benchmarks.marl_report import LABELS, STATE_FILE, best_so_far, curve_band, load_run, plan_placement
from pruning_env.core.config import config_mismatch, option

__all__ = ["OBJECTIVE_KEYS", "CurvesConfig", "compare", "main", "write"]

OBJECTIVE_KEYS = ("net", "dataset", "width", "env", "checkpoint", "baseline_epochs", "reward", "lam", "macs_target",
                  "budget_penalty", "proxy", "proxy_kd_steps", "proxy_kd_lr", "proxy_kd_batch_size", "eval_size",
                  "bn_recal_batches", "bn_recal_batch_size")
"""Search settings that define what the objective measures: runs that differ in one are not comparable."""


@dataclass
class CurvesConfig:
    """Every flag of ``python -m benchmarks.search_curves``."""

    runs: list[str] = option([], "the --out-dir folders of finished benchmarks.marl runs (each holds a "
                             "marl.json); the first is the reference of the paired differences")
    labels: list[str] | None = option(None, "one name per run for the tables and the plot (default: the folders' "
                                      "names)")
    algos: list[str] | None = option(None, "algorithms to compare (default: every algorithm each run searched "
                                     "with, except dsfp-uniform, whose few plans make no curve)")
    at: list[int] = option([25, 50, 100, 200], "plan counts at which the best-so-far objective is tabulated (the "
                           "runs' budget is always added)")
    out: str | None = option(None, "the report (.md; the .json and .png go next to it; default: "
                             "benchmarks/results/search_curves.md)")

    def __post_init__(self) -> None:
        if self.labels is not None and len(self.labels) != len(self.runs):
            raise ValueError(f"--labels needs one name per run: {len(self.runs)} runs, {len(self.labels)} labels")
        if any(a < 1 for a in self.at):
            raise ValueError(f"--at plan counts must be >= 1, got {self.at}")


def _differences(first: dict[str, Any], other: dict[str, Any]) -> list[str]:
    return sorted(config_mismatch(first, other))


def compare(states: list[dict[str, Any]], labels: list[str], algos: list[str] | None,
            at: list[int]) -> dict[str, Any]:
    """The comparison of recorded ``benchmarks.marl`` states (one per variant); raises ValueError if incomparable.

    Returns ``{"plans": budget, "at": plan counts, "rows": [...]}``; a row per (run, algorithm) holds ``label``,
    ``algo``, ``run`` (its index in ``states``), ``differs`` (settings unlike the first run's), ``seeds``,
    ``best_at`` (``{plan count: [per-seed best-so-far objective]}``), ``final`` (per-seed best objective at the
    budget), ``paired_difference`` (mean and std over the seeds both runs have, against the first run's same
    algorithm; None for the reference),
    ``near_target`` (share of plans within 0.01 MACs ratio), ``val_acc_ratio`` / ``test_acc_before_ft`` /
    ``test_acc_after_ft`` of the best plans (per seed; after-FT None where the run did not fine-tune).
    """
    first = states[0]["search_config"]
    for label, st in zip(labels[1:], states[1:]):
        bad = [k for k in _differences(first, st["search_config"]) if k in OBJECTIVE_KEYS]
        if bad:
            raise ValueError(f"run {label!r} measures another objective than {labels[0]!r} (it differs in "
                             f"{', '.join(bad)}): compare only runs with the same reward, proxy, target and baseline")
    budget = max(int(st["search_config"]["plans"]) for st in states)
    counts = sorted({*(a for a in at if a < budget), budget})
    rows: list[dict[str, Any]] = []
    reference: dict[str, dict[str, float]] = {}
    for i, (label, st) in enumerate(zip(labels, states)):
        searched = [a for a in dict.fromkeys(n for r in st["runs"].values() for n in r["search"])
                    if a != "dsfp-uniform"]
        wanted = [a for a in (algos or searched) if a in searched]
        differs = _differences(first, st["search_config"]) + _differences(states[0]["finetune_config"],
                                                                         st["finetune_config"])
        fine_tuned = int(st["finetune_config"].get("finetune_epochs", 0)) > 0
        target = float(st["search_config"]["macs_target"])
        for algo in wanted:
            seeds = sorted((s for s, r in st["runs"].items() if algo in r["search"]), key=int)
            searches = [st["runs"][s]["search"][algo] for s in seeds]
            grid = np.asarray(counts)
            best = np.asarray([best_so_far(s["curve"], grid) for s in searches])
            final = {s: float(v) for s, v in zip(seeds, best[:, -1])}
            ft = [st["runs"][s].get("finetune", {}).get(algo) for s in seeds]
            row: dict[str, Any] = {
                "run": i, "label": label, "algo": algo, "differs": differs, "seeds": [int(s) for s in seeds],
                "best_at": {str(c): [None if np.isnan(v) else float(v) for v in best[:, j]]
                            for j, c in enumerate(counts)},
                "final": list(final.values()), "paired_difference": None,
                "near_target": plan_placement(searches, target)["near_target"],
                "val_acc_ratio": [s["best"]["acc_ratio"] for s in searches],
                "test_acc_before_ft": [f["test_acc_before_finetune"] if f else None for f in ft],
                "test_acc_after_ft": [f["test_acc"] if f and fine_tuned else None for f in ft],
            }
            if i == 0:
                reference[algo] = final
            elif algo in reference:
                common = [s for s in seeds if s in reference[algo]]
                if common:
                    m, sd = mean_std([final[s] - reference[algo][s] for s in common])
                    row["paired_difference"] = {"mean": m, "std": sd, "seeds": len(common)}
            rows.append(row)
    return {"plans": budget, "at": counts, "rows": rows}


def _plot(states: list[dict[str, Any]], result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, row in enumerate(result["rows"]):
        runs = states[row["run"]]["runs"]
        curves = [runs[str(s)]["search"][row["algo"]]["curve"] for s in row["seeds"]]
        grid, mean, lo, hi = curve_band(curves)
        color = plt.cm.tab10(k % 10)
        ax.plot(grid, mean, color=color,
                label=f"{row['label']}: {LABELS.get(row['algo'], row['algo'])} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(grid, lo, hi, color=color, alpha=0.15)
    ax.set_xlabel("plans measured (env.num_evaluations, greedy evaluations included)")
    ax.set_ylabel("best-so-far validation objective")
    ax.set_title("Search progress (mean over seeds, band = min..max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(states: list[dict[str, Any]], result: dict[str, Any], out: Path, command: str, commit_id: str) -> None:
    """``out`` (.md), its .json (``result`` plus command and commit) and its .png."""
    counts = result["at"]
    md = ["# Search curves: best-so-far validation objective against plans measured", "",
          f"Command: `{command}`  ", f"Commit: {commit_id}  "]
    for row_state, label in dict.fromkeys((r["run"], r["label"]) for r in result["rows"]):
        h = states[row_state].get("header", {})
        md.append(f"Run {label!r}: `{h.get('command', '?')}` (commit {h.get('commit', '?')}, {h.get('date', '?')})  ")
    first = states[0]["search_config"]
    md += ["", f"Objective: reward {first['reward']} at MACs target {first['macs_target']:g}, proxy "
           f"{first.get('proxy', 'acc')}, {first['eval_size']} validation images; budget {result['plans']} measured "
           "plans. Mean ± std over seeds; the paired difference is against the first run's same algorithm, over "
           "the seeds both have. Accuracies of each seed's best plan (TEST split, before / after the run's "
           "fine-tune; `-`: the run did not fine-tune).", "",
           "## Best-so-far objective", "",
           "| run | algorithm | differs from the first run | seeds | " + " | ".join(f"@{c}" for c in counts)
           + " | paired difference at the end | plans within 0.01 of the target |",
           "|---|---|---|---|" + "---|" * len(counts) + "---|---|"]
    for row in result["rows"]:
        pd = row["paired_difference"]
        if row["run"] == 0:
            diff = "reference"
        elif pd is None:
            diff = "-"
        else:
            diff = fmt(pd["mean"], pd["std"], 4, sign="+") + f" ({pd['seeds']} seeds)"
        md.append(f"| {row['label']} | {LABELS.get(row['algo'], row['algo'])} | {', '.join(row['differs']) or '-'} "
                  f"| {len(row['seeds'])} | " + " | ".join(fmt_values(row["best_at"][str(c)], 4) for c in counts)
                  + f" | {diff} | {100 * row['near_target']:.0f} % |")
    md += ["", "## The best plans", "",
           "| run | algorithm | val acc ratio before FT | TEST acc before FT (%) | TEST acc after FT (%) |",
           "|---|---|---|---|---|"]
    for row in result["rows"]:
        md.append(f"| {row['label']} | {LABELS.get(row['algo'], row['algo'])} | "
                  f"{fmt_values(row['val_acc_ratio'], 4)} | {fmt_values(row['test_acc_before_ft'], 2)} | "
                  f"{fmt_values(row['test_acc_after_ft'], 2)} |")
    md += ["", f"![curves]({out.with_suffix('.png').name})", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(out, "\n".join(md))
    atomic_write_text(out.with_suffix(".json"), json.dumps({"benchmark": "search_curves", "command": command,
                                                             "commit": commit_id, **result}, indent=1))
    _plot(states, result, out.with_suffix(".png"))


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.search_curves --runs DIR [DIR ...]``: the comparison report of the runs."""
    cfg = parse_config(CurvesConfig, argv, "search_curves", __doc__)
    if not cfg.runs:
        print("error: --runs needs at least one --out-dir of a finished benchmarks.marl run", file=sys.stderr)
        return 2
    out = results_path(cfg.out, "search_curves.md")
    # its report, and the runs it reads: a run still writing its marl.json is not reported on
    with hold_outputs("search_curves", files=[("--out", out), *(("--runs", Path(r) / STATE_FILE) for r in cfg.runs)]):
        return _main(cfg, argv, out)


def _main(cfg: CurvesConfig, argv: list[str] | None, out: Path) -> int:
    labels = cfg.labels or [Path(r).name for r in cfg.runs]
    try:
        states = [load_run(r) for r in cfg.runs]
        searched = sorted({a for st in states for r in st["runs"].values() for a in r["search"]})
        unused = [a for a in cfg.algos or () if a not in searched]
        if unused:
            raise ValueError(f"--algos: no run searched with {', '.join(unused)}; they searched with "
                             f"{', '.join(searched)}")
        result = compare(states, labels, cfg.algos, cfg.at)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not result["rows"]:
        print(f"error: none of the runs searched with {cfg.algos}: name algorithms they ran (--algos)",
              file=sys.stderr)
        return 2
    write(states, result, out, command_line("search_curves", argv), commit())
    print(json.dumps({"out": str(out), "rows": [{k: r[k] for k in ("label", "algo", "final", "paired_difference")}
                                                for r in result["rows"]]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
