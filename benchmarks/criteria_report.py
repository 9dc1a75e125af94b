"""The report of ``python -m benchmarks.criteria``: Markdown tables, a generated conclusion and a plot.

Everything here reads the benchmark's JSON (``{"setup", "baselines", "scoring", "rows", "runs"}``)
only, so ``python -m benchmarks.criteria --report-only`` rebuilds the report of any stored run.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import fmt, mean_std, write_markdown
from pruning_env.training.train import with_legacy_values

__all__ = ["DEFAULT_VARIANTS", "PAPER_RATE", "PAPER_RETENTION", "RECIPE_DEFAULTS", "STAGES", "STAGE_NAMES",
           "conclusion", "describe_training", "write_report"]

PAPER_RETENTION = 98.23  # DSFP abstract: % of the baseline accuracy kept at 70 % pruning
PAPER_RATE = 0.7
DEFAULT_VARIANTS = ["dsfp-low-exact", "dsfp-low-fisher", "dsfp-high-exact", "dsfp-high-fisher", "grad", "taylor",
                    "kl", "l1", "l2", "taylor_fo", "fpgm", "random"]
STAGES = ("pruned", "bn", "ft")
STAGE_NAMES = {"pruned": "after pruning", "bn": "after BN recalibration", "ft": "after KD fine-tuning"}
RECIPE_DEFAULTS: dict[str, Any] = {
    "finetune_momentum": 0.9, "finetune_weight_decay": 5e-4, "finetune_batch_size": 128, "finetune_kd": True,
    "finetune_temperature": 4.0, "finetune_alpha_start": 0.5, "finetune_alpha_end": 0.1,
    "finetune_label_smoothing": 0.0, "finetune_augment": True, "bn_recal_batch_size": 128, "min_keep": 1,
    "round_to": 1,
}
"""Settings of the recipe every stored result used before they became flags: a run's ``setup`` records one
of them only when it differs, so the stored results stay comparable (and resumable) as they are."""


def _get(setup: dict[str, Any], name: str) -> Any:
    """A setting of a run's ``setup`` (absent: the recipe value of :data:`RECIPE_DEFAULTS`)."""
    return setup.get(name, RECIPE_DEFAULTS.get(name))


def _rule_text(setup: dict[str, Any]) -> str:
    min_keep, round_to = _get(setup, "min_keep"), _get(setup, "round_to")
    text = f"min {min_keep} filter{'s' if min_keep > 1 else ''} kept"
    return text + (f", kept counts rounded to multiples of {round_to}" if round_to > 1 else "")


def _finetune_text(setup: dict[str, Any]) -> str:
    """How the rows were fine-tuned, in words."""
    if not setup["finetune_epochs"]:
        return "none"
    if _get(setup, "finetune_kd"):
        how = (f"knowledge distillation from the unpruned network (T = {_get(setup, 'finetune_temperature'):g}, "
               f"alpha {_get(setup, 'finetune_alpha_start'):g} -> {_get(setup, 'finetune_alpha_end'):g}, ")
    else:
        how = "cross-entropy training without distillation ("
    others = [f"{k.removeprefix('finetune_').replace('_', ' ')} {setup[k]}" for k in
              ("finetune_momentum", "finetune_weight_decay", "finetune_batch_size", "finetune_label_smoothing",
               "finetune_augment") if k in setup]
    return (f"{setup['finetune_epochs']} epoch(s) of {how}{setup['finetune_optimizer']} lr {setup['finetune_lr']} "
            f"cosine{''.join(', ' + o for o in others)}) on {setup['finetune_limit'] or 'all'} training images, "
            "best-VALIDATION weights kept (incl. the starting ones)")


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


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str, float], list[dict[str, Any]]]:
    out: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["net"], r["variant"], float(r["rate"])), []).append(r)
    return out


def _cell_means(rows: list[dict[str, Any]], metric: str) -> dict[tuple[str, str, float], float]:
    """{(net, variant, rate): mean of metric over seeds}."""
    out = {}
    for k, rs in _groups(rows).items():
        m, _ = mean_std([r[metric] for r in rs])
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
                    for s in [mean_std([x[metric] for x in rs])[1]] if s is not None]
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
        f"TRAIN images (seed {setup['calib_seed']}); uniform per-layer rate (`plan_uniform`, {_rule_text(setup)}); "
        f"BN recalibration on {setup['bn_recal_batches']} training batches of {_get(setup, 'bn_recal_batch_size')}; "
        f"fine-tuning: {_finetune_text(setup)}"
        + f"; accuracies on {str(setup['eval_limit']) + ' seeded random images of ' if setup['eval_limit'] else ''}"
          "the TEST split, retention = test accuracy / baseline test accuracy.", ""]

    lines += ["## Baselines", "",
              "| net | width | test acc % | val acc % | MACs (M) | params (M) | training | checkpoint |",
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
                cells.append(fmt(*mean_std([x[f"retention_{stage}"] for x in rs])) if rs else "-")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("| *paper (DSFP)* | " + " | ".join(f"*{PAPER_RETENTION}*" if abs(r - PAPER_RATE) < 1e-9 and
                                                         n.startswith("vgg16") else "" for n, r in cols) + " |")
        lines.append("")

    for net in nets:
        b = data["baselines"].get(net, {})
        lines += [f"## {net}", "", f"Baseline test accuracy {b.get('test_acc', float('nan')):.2f} %. Test accuracy "
                  "(%) after each stage; retention in % of the baseline; MACs and parameter reductions of the "
                  "physically pruned network.", "",
                  "| criterion | rate | MACs red. | params red. | test: pruned | test: + BN recal | "
                  "test: + KD fine-tune | retention BN | retention FT | seeds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rates:
            for v in order:
                rs = groups.get((net, v, r))
                if not rs:
                    continue
                ms = {k: mean_std([x[k] for x in rs]) for k in
                      ("macs_reduction", "params_reduction", "test_pruned", "test_bn", "test_ft", "retention_bn",
                       "retention_ft")}
                lines.append(
                    f"| {v} | {r:.0%} | {ms['macs_reduction'][0]:.1%} | {ms['params_reduction'][0]:.1%} | "
                    f"{fmt(*ms['test_pruned'])} | {fmt(*ms['test_bn'])} | {fmt(*ms['test_ft'])} | "
                    f"{fmt(*ms['retention_bn'])} | {fmt(*ms['retention_ft'])} | {len(rs)} |")
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
    write_markdown(md_path, "\n".join(lines))


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
            pts = sorted((r, mean_std([x[f"retention_{stage}"] for x in rs]))
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
            ax.plot([PAPER_RATE * 100], [PAPER_RETENTION], "k*", ms=12,
                    label=f"paper DSFP, VGG-16 ({PAPER_RETENTION} %)")
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

