"""The one rate rule: every caller keeps exactly the number of filters the engine's rule says.

``keep_count_for_rate`` (engine) is checked against the rule written out here with exact
fractions, then the plan builders (over widths 1..512 and every grid rate), the env (its actions,
``uniform_plan`` and observation features: every width up to 40 and either side of each power of two up to 512)
and the prune CLI are pinned to it.
"""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from pruning_env.cli.prune import main as prune_main
from pruning_env.core import checkpoint as ckpt
from pruning_env.core.data import load_splits
from pruning_env.engine.graph import prunable_layers
from pruning_env.engine.plan import RateRule, keep_count_for_rate, plan_per_layer, plan_uniform
from pruning_env.envs.env import FilterPruningEnv
from pruning_env.envs.plans import keep_count, uniform_plan

WIDTHS = list(range(1, 513))
# the env steps a network with one agent per width: the small widths, where rounding differs most, and both sides
# of every power of two (512 agents would take 15 s for the same check)
ENV_WIDTHS = sorted(set(range(1, 41)) | {w + d for w in (64, 128, 256, 512) for d in (-1, 0, 1) if w + d <= 512})
GRID = tuple(round(0.1 * i, 1) for i in range(10))
RULES = [RateRule(), RateRule(min_keep=3, round_to=4), RateRule(min_keep=8, round_to=1), RateRule(round_to=16)]


def _expected(width: int, rate: float, rule: RateRule) -> int:
    """The documented rule, with exact arithmetic: drop floor(rate * width) filters, round the kept count to the
    nearest multiple of round_to (at least one multiple, at most the width), then min_keep wins."""
    k = width - (Fraction(str(rate)) * width).__floor__()
    m = rule.round_to
    if m > 1:
        k = m * max(1, (Fraction(k, m) + Fraction(1, 2)).__floor__())
    return max(min(k, width), min(rule.min_keep, width))


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"min{r.min_keep}-round{r.round_to}")
def test_engine_rule_and_plan_builders_agree_on_every_width_and_rate(rule):
    gen = torch.Generator().manual_seed(0)
    scores = {f"w{w}": torch.rand(w, generator=gen) for w in WIDTHS}
    for rate in GRID:
        want = {f"w{w}": _expected(w, rate, rule) for w in WIDTHS}
        assert {f"w{w}": keep_count_for_rate(w, rate, min_keep=rule.min_keep, round_to=rule.round_to)
                for w in WIDTHS} == want
        assert {f"w{w}": rule.keep_count(w, rate) for w in WIDTHS} == want
        uniform = plan_uniform(scores, rate, min_keep=rule.min_keep, round_to=rule.round_to)
        per_layer = plan_per_layer(scores, dict.fromkeys(scores, rate), min_keep=rule.min_keep,
                                   round_to=rule.round_to)
        assert uniform.keep_counts() == want and per_layer.keep_counts() == want
        if rule == RateRule():  # never more than the rate removed, and never less than one filter kept
            assert all(w - want[f"w{w}"] <= rate * w + 1e-9 and want[f"w{w}"] >= 1 for w in WIDTHS)


class Branches(nn.Module):
    """One prunable 1x1 conv of every width in ``widths`` (each read out by its own Linear), summed.

    Cheap at any width (about 2 * sum(widths) parameters on a pooled 1x1 input), so one model
    holds a prunable layer of every width 1..512.
    """

    def __init__(self, widths: list[int], num_classes: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.prunable = nn.ModuleList(nn.Conv2d(3, w, 1) for w in widths)
        self.readout = nn.ModuleList(nn.Linear(w, num_classes) for w in widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        total = self.readout[0](torch.flatten(torch.relu(self.prunable[0](x)), 1))
        for conv, out in zip(self.prunable[1:], self.readout[1:]):
            total = total + out(torch.flatten(torch.relu(conv(x)), 1))
        return total


@pytest.fixture(scope="module")
def branches():
    torch.manual_seed(0)
    model = Branches(ENV_WIDTHS).eval()
    layers = prunable_layers(model)
    assert [lay.out_channels for lay in layers] == ENV_WIDTHS  # one agent per width
    return model, load_splits("synthetic")


def test_env_actions_and_uniform_plan_follow_the_rule(branches):
    model, splits = branches
    rule = RateRule()
    env = FilterPruningEnv(model, splits, rates=GRID, criterion="l1", kl="fisher", calib_size=16, eval_size=32,
                           bn_recal_batches=0, episode_length=1, min_keep=rule.min_keep, round_to=rule.round_to,
                           exact_budget=False)  # the raw action: no projection onto a MACs budget
    for k, rate in enumerate(GRID):
        want = {name: _expected(w, rate, rule) for name, w in env.plan.widths.items()}
        assert {name: keep_count(env, name, rate) for name in env.layer_names} == want
        assert [keep_count(env, i, rate) for i in range(len(env.layer_names))] == list(want.values())
        env.reset(seed=0)
        env.step({a: k for a in env.agents})
        assert env.plan.keep_counts() == want, rate
        assert uniform_plan(env, rate) == env.plan  # the DSFP-uniform plan is the network one step makes


@pytest.mark.long
def test_prune_cli_makes_the_envs_uniform_plan(branches, tmp_path, capsys):
    """The CLI's plan at the rates where rounding differs most (the builders' test covers every rate)."""
    model, splits = branches
    path = tmp_path / "branches.pt"
    ckpt.save(path, model, input_shape=splits.input_shape, dataset="synthetic", classes=splits.classes)
    env = FilterPruningEnv(model, splits, rates=GRID, criterion="l1", kl="fisher", calib_size=16, eval_size=32,
                           bn_recal_batches=0, round_to=4, min_keep=3)
    for rate in (0.3, 0.7, 0.9):
        out = tmp_path / f"pruned-{rate}.pt"
        code = prune_main(["--checkpoint", str(path), "--trust-pickle", "--criterion", "l1", "--rate", str(rate),
                           "--round-to", "4", "--min-keep", "3", "--bn-recal-batches", "0", "--latency-repeats",
                           "0", "--eval-limit", "64", "--device", "cpu", "--no-progress", "--out", str(out)])
        assert code == 0
        report = json.loads(out.with_suffix(".json").read_text())
        assert {n: v["kept"] for n, v in report["layers"].items()} == uniform_plan(env, rate).keep_counts(), rate
    capsys.readouterr()


@pytest.mark.parametrize("min_keep,round_to", [(1, 1), (3, 1), (1, 8), (5, 4)])
def test_the_vectorised_rule_is_the_rule(min_keep, round_to):
    """keep_counts_for_rates (the exact budget's bisection) equals keep_count_for_rate layer by layer."""
    from pruning_env.engine.plan import PlanError, keep_count_for_rate, keep_counts_for_rates

    rng = np.random.default_rng(0)
    widths = rng.integers(1, 520, size=4000)
    rates = np.concatenate([rng.uniform(0, 1, 3000), np.round(rng.uniform(0, 0.9, 1000), 1)])
    rates = np.minimum(rates, np.nextafter(1.0, 0.0))
    got = keep_counts_for_rates(widths, rates, min_keep=min_keep, round_to=round_to)
    want = [keep_count_for_rate(int(w), float(r), min_keep=min_keep, round_to=round_to) for w, r in zip(widths, rates)]
    assert got.dtype == np.int64 and got.tolist() == want
    with pytest.raises(PlanError, match="rates"):
        keep_counts_for_rates([4], [1.0])
