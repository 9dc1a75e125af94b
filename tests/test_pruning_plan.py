"""Pruning plans as values, their validation, and the plan builders."""

import copy
import json
import pickle

import pytest
import torch

from pruning_env.core.models import build
from pruning_env.engine.graph import prunable_layers
from pruning_env.engine.plan import (
    PlanError,
    PruningPlan,
    keep_count_for_rate,
    plan_global,
    plan_per_layer,
    plan_top_k,
    plan_uniform,
    top_k_indices,
)


@pytest.fixture(scope="module")
def vgg_layers():
    return prunable_layers(build("vgg11", num_classes=10, width=0.25))


def test_plan_round_trips_and_compares():
    plan = PruningPlan({"a": [3, 0, 2], "b": torch.tensor([1])}, {"a": 4, "b": 2})
    assert plan.keep["a"] == (0, 2, 3) and plan.indices("b").tolist() == [1]
    assert plan.keep_ratio("a") == 0.75 and plan.keep_ratios() == {"a": 0.75, "b": 0.5}
    assert plan.pruned("a") == (1,) and plan.keep_counts() == {"a": 3, "b": 1}
    for again in (PruningPlan.from_json(plan.to_json()), PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict())))):
        assert again == plan and hash(again) == hash(plan) and again.key() == plan.key()
    other = PruningPlan({"a": [0, 2], "b": [1]}, {"a": 4, "b": 2})
    assert other != plan and other.key() != plan.key()
    assert len({plan, other, PruningPlan.from_json(plan.to_json())}) == 2
    # identity entries do not change the key (a plan equals its padded version for caching)
    assert PruningPlan({"a": [0, 2, 3], "c": [0, 1]}, {"a": 4, "c": 2}).key() == \
        PruningPlan({"a": [0, 2, 3]}, {"a": 4}).key()
    masks = PruningPlan.from_masks({"a": [True, False, True, True]})
    assert masks.keep["a"] == (0, 2, 3) and masks.widths["a"] == 4


def test_plan_pickles_and_copies():
    plan = PruningPlan({"a": [0, 2]}, {"a": 4})
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert copy.deepcopy(plan) == plan and copy.copy(plan) == plan


def test_plan_is_immutable():
    plan = PruningPlan({"a": [0, 1]}, {"a": 4})
    with pytest.raises(TypeError):
        plan.keep["a"] = (0,)  # type: ignore[index]
    idx = plan.indices("a")
    idx[0] = 3
    assert plan.keep["a"] == (0, 1) and plan.indices("a").tolist() == [0, 1]


def test_validation_errors(vgg_layers):
    first = vgg_layers[0]
    w = first.out_channels
    PruningPlan.full(vgg_layers).validate(vgg_layers)
    cases = [
        (PruningPlan({"features.999": [0]}, {"features.999": 4}), "not a prunable layer"),
        (PruningPlan({first.name: [0, w]}, {first.name: w}), "out of range"),
        (PruningPlan({first.name: [-1, 0]}, {first.name: w}), "out of range"),
        (PruningPlan({first.name: [1, 1, 2]}, {first.name: w}), "duplicate"),
        (PruningPlan({first.name: []}, {first.name: w}), "keeps no filter"),
        (PruningPlan({first.name: [0]}, {first.name: w + 1}), "made for"),
    ]
    for plan, message in cases:
        with pytest.raises(PlanError, match=message):
            plan.validate(vgg_layers)
    with pytest.raises(PlanError, match="integers"):
        PruningPlan({"a": [0.5]}, {"a": 2})
    with pytest.raises(PlanError, match="widths missing"):
        PruningPlan({"a": [0]}, {})
    with pytest.raises(PlanError, match="not a pruning plan"):
        PruningPlan.from_dict({"keep": {}})
    with pytest.raises(PlanError, match="JSON"):
        PruningPlan.from_json("{oops")


def test_top_k_keeps_highest_scores_and_breaks_ties_by_index():
    scores = {"a": torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3])}
    assert plan_top_k(scores, {"a": 2}).keep["a"] == (0, 2)
    assert plan_top_k(scores, {"a": 4}).keep["a"] == (0, 2, 3, 4)  # tie 0.1: index 1 pruned first
    with pytest.raises(PlanError, match="outside"):
        plan_top_k(scores, {"a": 0})
    with pytest.raises(PlanError, match="NaN"):
        plan_top_k({"a": torch.tensor([1.0, float("nan")])}, {})


def test_uniform_rate_counts_min_keep_and_round_to():
    scores = {"a": torch.arange(64.0), "b": torch.arange(10.0), "c": torch.arange(3.0)}
    plan = plan_uniform(scores, 0.7)
    assert plan.keep_counts() == {"a": 64 - 44, "b": 3, "c": 1}  # floor(0.7 * C) pruned
    assert plan.keep["a"] == tuple(range(44, 64))  # the highest scores survive
    assert plan_uniform(scores, 0.0).keep_counts() == {"a": 64, "b": 10, "c": 3}
    assert plan_uniform(scores, 0.7, min_keep=4).keep_counts() == {"a": 20, "b": 4, "c": 3}
    rounded = plan_uniform(scores, 0.7, round_to=8).keep_counts()
    assert rounded == {"a": 24, "b": 8, "c": 3}  # nearest multiple, >= one multiple, <= width
    assert all(c % 8 == 0 or c == w for c, w in zip(rounded.values(), (64, 10, 3)))
    assert keep_count_for_rate(64, 0.5, round_to=16) == 32
    for bad in (1.0, -0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(PlanError, match=r"\[0, 1\)"):
            plan_uniform(scores, bad)
    with pytest.raises(PlanError, match="min_keep"):
        plan_uniform(scores, 0.5, min_keep=0)
    with pytest.raises(PlanError, match="round_to"):
        plan_uniform(scores, 0.5, round_to=0)


def test_per_layer_rates():
    scores = {"a": torch.arange(10.0), "b": torch.arange(10.0)}
    plan = plan_per_layer(scores, {"a": 0.5})
    assert plan.keep_counts() == {"a": 5, "b": 10}
    with pytest.raises(PlanError, match="without scores"):
        plan_per_layer(scores, {"zzz": 0.5})
    with pytest.raises(PlanError, match="layer 'b'"):
        plan_per_layer(scores, {"a": 0.5, "b": 1.0})


def test_global_ranking_normalises_per_layer():
    # Layer b's scores are 100x larger but have the same shape: after per-layer
    # normalisation both lose the same number of filters.
    scores = {"a": torch.arange(1.0, 11.0), "b": 100 * torch.arange(1.0, 11.0)}
    plan = plan_global(scores, 0.5)
    assert plan.keep_counts() == {"a": 5, "b": 5}
    # A layer whose scores are nearly uniform relative to their mean loses the fewest
    # (its lowest filter is close to its average), a skewed layer the most.
    skewed = {"flat": torch.tensor([9.0, 10.0, 10.0, 11.0]), "skew": torch.tensor([0.0, 0.0, 1.0, 10.0])}
    counts = plan_global(skewed, 0.5).keep_counts()
    assert counts["flat"] > counts["skew"] and sum(counts.values()) == 4
    # min_keep protects every layer, even when all its filters rank lowest
    lopsided = {"a": torch.tensor([0.0, 0.0, 0.0, 0.0]), "b": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    assert plan_global(lopsided, 0.75, min_keep=2).keep_counts()["a"] == 2
    with pytest.raises(PlanError):
        plan_global(scores, 1.0)


def test_one_tie_break_for_every_plan():
    tied = torch.tensor([0.2, 0.1, 0.2, 0.1, 0.2])
    assert top_k_indices(tied, 3).tolist() == [0, 2, 4]
    assert top_k_indices(tied, 4).tolist() == [0, 2, 3, 4]  # of the tied 0.1s, index 1 is pruned first
    assert top_k_indices(tied, 5).tolist() == [0, 1, 2, 3, 4] and top_k_indices(tied, 5).dtype == torch.int64
    assert plan_top_k({"a": tied}, {"a": 4}).keep["a"] == tuple(top_k_indices(tied, 4).tolist())
    # plan_global never prunes a layer's min_keep best filters, the same ones under ties
    scores = {"a": torch.zeros(6), "b": torch.ones(4)}
    assert plan_global(scores, 0.9, min_keep=2).keep == {"a": (4, 5), "b": (2, 3)}


def test_top_k_of_half_precision_scores_is_that_of_their_float32_values():
    from pruning_env.engine.plan import top_k_indices

    scores = torch.tensor([0.5, 0.25, 0.25, 1.0, 0.125])
    want = top_k_indices(scores, 3)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(top_k_indices(scores.to(dtype), 3), want)
