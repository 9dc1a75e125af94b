"""benchmarks.stats: stratified-bootstrap intervals and the probability of improvement."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from benchmarks.stats import Interval, mean_interval, paired_differences, probability_of_improvement


def test_probability_of_improvement_counts_pairs_and_ties_half():
    # x = 1, 2, 3 against y = 2, 2, 2: 0 + 3/2 + 3 of 9 pairs
    assert probability_of_improvement([[1, 2, 3]], [[2, 2, 2]]).point == pytest.approx(0.5)
    assert probability_of_improvement([[3, 4]], [[1, 2]]).point == 1.0
    assert probability_of_improvement([[1, 2]], [[3, 4]]).point == 0.0
    # tasks count equally: 1.0 on one, 0.0 on the other
    assert probability_of_improvement([[3, 4], [0]], [[1, 2], [5, 6, 7]]).point == pytest.approx(0.5)


def test_probability_of_improvement_interval_matches_a_plain_loop():
    """The vectorised resampling (counts @ scores @ counts) equals resampling the runs one by one."""
    x, y = np.array([0.3, 1.2, 0.8, 2.0]), np.array([0.5, 0.1, 1.0])
    reps = 500
    est = probability_of_improvement([x], [y], reps=reps, seed=3)
    rng = np.random.default_rng(3)
    ix = rng.integers(0, x.size, size=(reps, x.size))
    iy = rng.integers(0, y.size, size=(reps, y.size))
    loop = [np.mean([(np.sign(a - b) + 1) / 2 for a, b in itertools.product(x[i], y[j])]) for i, j in zip(ix, iy)]
    lo, hi = np.percentile(loop, [2.5, 97.5])
    assert (est.low, est.high) == pytest.approx((lo, hi))
    assert est.low <= est.point <= est.high


def test_mean_interval_resamples_within_tasks_only():
    # two tasks with constant runs: resampling within a task changes nothing, so the interval is the point
    est = mean_interval([[0.0, 0.0, 0.0], [10.0, 10.0, 10.0]])
    assert (est.point, est.low, est.high) == (5.0, 5.0, 5.0)
    # tasks count equally whatever their run counts
    assert mean_interval([[0.0], [10.0, 10.0, 10.0, 10.0]]).point == 5.0


def test_mean_interval_covers_the_true_mean_about_95_percent():
    """Coverage over 300 seeded experiments of 20 normal runs: the percentile interval of the mean is near 95 %."""
    rng = np.random.default_rng(0)
    hits = 0
    for k in range(300):
        est = mean_interval([rng.normal(1.0, 2.0, size=20)], reps=1000, seed=k)
        hits += est.low <= 1.0 <= est.high
    assert 0.88 <= hits / 300 <= 0.98


def test_same_seed_same_interval_and_single_runs_have_none():
    a = mean_interval([[0.1, -0.4, 0.9]], seed=7)
    assert a == mean_interval([[0.1, -0.4, 0.9]], seed=7)
    single = mean_interval([[0.3], [0.5]])
    assert single.point == pytest.approx(0.4) and single.low is None and single.cell() == "+0.40"
    assert not single.above_zero()


def test_interval_cell_and_above_zero():
    assert Interval(0.5, 0.1, 0.9, 3).cell() == "+0.50 [+0.10, +0.90]"
    assert Interval(0.5, 0.1, 0.9, 3).above_zero()
    assert not Interval(0.5, -0.1, 0.9, 3).above_zero()


def test_paired_differences_use_common_seeds():
    seeds, d = paired_differences({0: 81.0, 1: 80.5, 2: 79.0}, {1: 80.0, 2: 80.0, 3: 70.0})
    assert seeds == [1, 2] and d.tolist() == pytest.approx([0.5, -1.0])


@pytest.mark.parametrize("bad", [[], [[]], [[1.0, float("nan")]]])
def test_bad_input_is_refused(bad):
    with pytest.raises(ValueError, match="run"):
        mean_interval(bad)


def test_mismatched_tasks_and_settings_are_refused():
    with pytest.raises(ValueError, match="same tasks"):
        probability_of_improvement([[1.0], [2.0]], [[1.0]])
    with pytest.raises(ValueError, match="confidence"):
        mean_interval([[1.0, 2.0]], confidence=95)
    with pytest.raises(ValueError, match="reps"):
        mean_interval([[1.0, 2.0]], reps=10)


# ----------------------------------------------------------------------------- the marl benchmark's interval tables


def _rows(target, accs):
    """Rows as benchmarks.marl_report.result_rows writes them: accs = {(method, selection): [acc per seed]}."""
    return [{"target": target, "method": m, "selection": sel, "seed": s, "test_acc_after_ft": a, "macs_ratio": target}
            for (m, sel), vals in accs.items() for s, a in enumerate(vals)]


def test_interval_records_pair_by_seed_against_the_best_non_learned_arm():
    from benchmarks.marl_stats import best_baseline, interval_records

    rows = _rows(0.2, {("torch-pruning", "none"): [70.0, 71.0, 72.0], ("dsfp-uniform", "none"): [69.0, 69.0, 69.0],
                       ("random", "own+reference"): [70.5, 70.5, 70.5], ("qmix", "own+reference"): [71.0, 72.0, 73.0],
                       ("qmix", "own"): [75.0]})  # one seed: listed, never the baseline, no interval
    rows += _rows(0.5, {("torch-pruning", "none"): [99.0, 99.0, 99.0]})  # another target: not mixed in
    recs = {(r["method"], r["selection"]): r for r in interval_records(rows, 0.2)}
    assert best_baseline({k: dict(enumerate([r["mean"]] * len(r["seeds"]))) for k, r in recs.items()}) == \
        ("torch-pruning", "none")
    q = recs[("qmix", "own+reference")]
    assert q["baseline"] == {"method": "torch-pruning", "selection": "none"}
    assert q["difference"]["point"] == pytest.approx(1.0) and q["difference"]["low"] == pytest.approx(1.0)
    assert q["prob_improvement"]["point"] == pytest.approx(7 / 9) and q["higher"] == 3
    assert "difference" not in recs[("torch-pruning", "none")]
    assert recs[("qmix", "own")]["difference"] is None and recs[("qmix", "own")]["seeds"] == [0]


def test_goal_records_compare_the_default_network_with_every_baseline():
    from benchmarks.marl_stats import goal_records, interval_section

    base = {("torch-pruning", "none"): [70.0, 71.0, 72.0], ("dsfp-uniform", "none"): [69.0, 69.0, 69.0],
            ("random", "own+reference"): [70.5, 70.5, 70.5], ("random", "own"): [70.0, 70.2, 70.1]}
    win = _rows(0.3, {**base, ("qmix", "own+reference"): [71.0, 72.0, 73.0], ("qmix", "own"): [71.0, 71.5, 71.2]})
    lose = _rows(0.2, {**base, ("qmix", "own+reference"): [70.0, 70.0, 70.0]})
    g3, g2 = goal_records(win + lose, [0.3, 0.2])
    assert g3["met"] is True and g3["own_above_zero"] is True
    assert g3["own_vs_random"]["difference"]["point"] == pytest.approx(1.1333333)
    assert g2["met"] is False and g2["own_above_zero"] is None  # below random + selection and Torch-Pruning
    assert g2["torch-pruning"]["contrast"]["difference"]["point"] == pytest.approx(-1.0)
    (g0,) = goal_records(_rows(0.5, base), [0.5])
    assert g0["met"] is None and g0["default"]["seeds"] == []  # no QMIX yet: no verdict
    md, js = interval_section(win + lose, [0.3, 0.2], {m: m for m, _ in base} | {"qmix": "QMIX"})
    text = "\n".join(md)
    assert "| 0.3 | 72.00 (n=3) |" in text and "| yes |" in text and "| no |" in text
    assert "### MACs target 0.2: against torch-pruning (none)" in text
    assert js["goal"] == [g3, g2] and len(js["intervals"]) == 11
