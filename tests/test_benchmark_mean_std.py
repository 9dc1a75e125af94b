"""The one mean ± std of the benchmark reports (benchmarks.common), and the reports that use it."""

import math

from benchmarks import marl_report
from benchmarks.common import fmt, fmt_values, mean_std


def test_mean_std_edge_cases():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, None)  # one value: no estimate of the spread, not 0
    assert mean_std([1.0, float("nan"), 3.0, None]) == (2.0, math.sqrt(2.0))  # NaN and None skipped
    assert mean_std([float("nan"), 5.0]) == (5.0, None)
    for empty in ([], [None], [float("nan")]):
        m, s = mean_std(empty)
        assert math.isnan(m) and s is None


def test_table_cells():
    assert fmt_values([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert fmt_values([4.0], 4) == "4.0000"
    assert fmt_values([float("nan"), 1.5, None, 2.5], 1) == "2.0 ± 0.7"
    assert fmt_values([]) == fmt_values([float("nan")]) == fmt(None, None) == "-"
    assert fmt(0.25, None, 2, sign="+") == "+0.25" and fmt(-0.25, 0.1, 2, sign="+") == "-0.25 ± 0.10"


def _state(qmix, dsfp):
    runs = {str(seed): {"finetune": {"qmix": {"test_acc": a, "macs_ratio": 0.5},
                                     "dsfp-uniform": {"test_acc": b, "macs_ratio": 0.5}}}
            for seed, (a, b) in enumerate(zip(qmix, dsfp))}
    return {"search_config": {"macs_target": 0.5}, "runs": runs}


def test_marl_report_uses_the_same_statistics():
    (one,) = marl_report.headline([_state([70.0], [69.0])])
    assert (one["qmix"], one["qmix_std"], one["difference"], one["difference_std"]) == (70.0, None, 1.0, None)
    (nan,) = marl_report.headline([_state([70.0, float("nan")], [69.0, 68.0])])  # a seed with no number
    assert nan["qmix"] == 70.0 and nan["qmix_std"] is None
    assert nan["dsfp_uniform"] == 68.5 and nan["dsfp_uniform_std"] == mean_std([69.0, 68.0])[1]
    (three,) = marl_report.headline([_state([70.0, 71.0, 72.0], [69.0, 69.0, 69.0])])
    assert (three["qmix"], three["qmix_std"], three["difference"]) == (71.0, 1.0, 2.0)
