"""The memoised static DSFP scores (dynamic=False, the surrogate env) equal the direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pruning_env.engine.plan import PruningPlan
from pruning_env.envs.measure import StaticDsfp, dsfp_order_and_features, surviving
from pruning_env.envs.plans import keep_count


def _plans(env, n, seed):
    """Plans of nested survivors, as episodes make them: random subsets of random subsets of each layer."""
    rng = np.random.default_rng(seed)
    widths = {name: env.plan.keep_count(name) for name in env.layer_names}
    plans = []
    for _ in range(n):
        keep = {}
        for name, w in widths.items():
            kept = np.arange(w)
            for _ in range(int(rng.integers(0, 3))):
                kept = np.sort(rng.choice(kept, size=int(rng.integers(1, len(kept) + 1)), replace=False))
            keep[name] = kept.tolist()
        plans.append(PruningPlan(keep, widths))
    return plans


def _same(a, b):
    (order_a, feats_a), (order_b, feats_b) = a, b
    assert order_a.keys() == order_b.keys() and all(torch.equal(order_a[k], order_b[k]) for k in order_a)
    assert feats_a.keys() == feats_b.keys() and all(np.array_equal(feats_a[k], feats_b[k]) for k in feats_a)


@pytest.mark.parametrize("direction", ["low", "high"])
def test_memoised_scores_equal_the_direct_ones_on_hits_and_after_eviction(tiny_env_factory, direction):
    env = tiny_env_factory(dynamic=False, direction=direction)
    env.reset(seed=0)
    base, names, rates = env.base_sensitivities, env.layer_names, list(env.config.rates)
    def rule(i, rate):
        return keep_count(env, i, rate)

    static = StaticDsfp(base, names, direction, rates, rule, per_layer=3)  # small: evictions happen
    plans = _plans(env, 12, seed=1)
    for plan in plans + plans[::-1] + [env.plan]:  # first calls, memo hits (in reverse), the unpruned plan
        direct = dsfp_order_and_features(names, *surviving(base, plan, names), direction, rates, rule)
        _same(static(plan), direct)
    # a caller changing the order it was given does not change the memo
    order, _ = static(plans[0])
    order[names[0]].add_(100.0)
    direct = dsfp_order_and_features(names, *surviving(base, plans[0], names), direction, rates, rule)
    _same(static(plans[0]), direct)


def test_static_env_observations_are_those_of_the_direct_scores(tiny_env_factory):
    env = tiny_env_factory(dynamic=False)
    env.reset(seed=0)
    while env.agents:
        env.step({a: env.action_space(a).sample() for a in env.agents})
    names, base = env.layer_names, env.base_sensitivities
    plan = env.plan
    order, feats = dsfp_order_and_features(names, *surviving(base, plan, names), env.config.scoring.direction,
                                           list(env.config.rates),
                                           lambda i, rate: keep_count(env, i, rate))
    measured = env.measure(plan)
    _same((dict(measured.scores), dict(measured.features)), (order, feats))


def test_combine_dsfp_refuses_layers_with_other_statistics():
    """The layers' statistics are combined by position, so layers that do not share one feature set are refused."""
    import dataclasses

    from pruning_env.envs.features import combine_dsfp, layer_dsfp

    comps = [torch.tensor([0.1, 0.5, 0.2]), torch.tensor([0.3, 0.1, 0.9]), torch.tensor([0.2, 0.2, 0.4])]
    one = layer_dsfp(*comps, torch.ones(3), torch.arange(3.0))
    kept = np.array([[3, 2], [3, 2]])
    feats = combine_dsfp([one, one], kept)
    assert feats["fused_mean"].shape == (2,) and feats["grad_share"].tolist() == [0.5, 0.5]
    other = dataclasses.replace(one, row={k: one.row[k] for k in reversed(one.row)})  # the same keys, other order
    for layers in ([other, other], [one, other], [other, one]):  # read by name, whatever the order
        assert {k: v.tolist() for k, v in combine_dsfp(layers, kept).items()} == {k: v.tolist() for k, v in
                                                                                 feats.items()}
    with pytest.raises(ValueError, match="different features"):
        combine_dsfp([one, dataclasses.replace(one, row={**one.row, "extra": 0.0})], kept)
