"""Exact MACs budgets: the projection rule (engine.budget) and the env that applies it to every joint action."""

import numpy as np
import pytest

from pruning_env.core.models import build
from pruning_env.engine.budget import budget_keep_counts, budget_keep_counts_batch, reachable_macs
from pruning_env.engine.macs import MacsModel
from pruning_env.engine.plan import RateRule
from pruning_env.envs.features import OBSERVATION_FEATURES
from pruning_env.envs.plans import uniform_plan
from pruning_env.envs.views import SequentialPruningEnv


@pytest.fixture(scope="module", params=["vgg16", "resnet56"])
def macs_model(request):
    return MacsModel.from_model(build(request.param, num_classes=10, width=0.25), (3, 32, 32))


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_final_step_meets_the_target_just_below(macs_model, target):
    rng = np.random.default_rng(0)
    rule, widths = RateRule(), macs_model.widths
    budget = target * macs_model.base_macs
    gaps = []
    for trial in range(60):
        current = widths if trial % 2 == 0 else np.array([rule.keep_count(int(w), r) for w, r in
                                                           zip(widths, rng.uniform(0, 0.3, len(widths)))])
        proposed = rng.uniform(0, 0.9, len(widths)) if trial % 3 else np.full(len(widths), rng.uniform(0, 0.9))
        if macs_model.predict_array(current)[0] <= budget:
            continue
        keep = budget_keep_counts(macs_model, rule, current, proposed, budget, final=True, max_rate=0.9)
        assert (keep >= 1).all() and (keep <= current).all()
        macs = macs_model.predict_array(keep)[0]
        assert macs <= budget
        gaps.append(target - macs / macs_model.base_macs)
    assert gaps and max(gaps) < 0.01, max(gaps)


def test_earlier_steps_never_go_below_the_target(macs_model):
    rng = np.random.default_rng(1)
    rule, widths = RateRule(), macs_model.widths
    budget = 0.5 * macs_model.base_macs
    for _ in range(40):
        proposed = rng.uniform(0, 0.9, len(widths))
        keep = budget_keep_counts(macs_model, rule, widths, proposed, budget, final=False, max_rate=0.9)
        as_is = np.array([rule.keep_count(int(w), r) for w, r in zip(widths, proposed)])
        if macs_model.predict_array(as_is)[0] >= budget:
            np.testing.assert_array_equal(keep, as_is)  # a proposal above the budget is taken as is
        else:
            assert macs_model.predict_array(keep)[0] >= budget
            assert (keep >= as_is).all()  # pruned less, never more than proposed


def test_the_agents_allocation_survives_the_projection(macs_model):
    rule, widths = RateRule(), macs_model.widths
    n = len(widths)
    for proposed in (np.linspace(0.0, 0.6, n), np.linspace(0.6, 0.0, n)):  # back-heavy, front-heavy
        keep = budget_keep_counts(macs_model, rule, widths, proposed, 0.4 * macs_model.base_macs, final=True,
                                  max_rate=0.9)
        rates = 1 - keep / widths
        order = np.argsort(proposed, kind="stable")
        # rates follow the proposal's order up to one filter of rounding
        assert (np.diff(rates[order]) >= -1.0 / widths[order][1:] - 1e-9).all()
    uniform = budget_keep_counts(macs_model, rule, widths, np.full(n, 0.2), 0.4 * macs_model.base_macs,
                                 final=True, max_rate=0.9)
    rates = 1 - uniform / widths
    assert rates.max() - rates.min() <= 1.0 / widths.min() + 1e-9  # a uniform proposal stays uniform


def test_unreachable_target_is_refused_before_any_work(tiny_env_factory):
    env = tiny_env_factory()
    floor = reachable_macs(env.macs_model, env.config.rule, 0.9) / env.base_macs
    with pytest.raises(ValueError, match="cannot be met"):
        tiny_env_factory(macs_target=floor / 2)


@pytest.mark.parametrize("target,episode_length", [(0.3, 3), (0.5, 1), (0.6, 2)])
def test_every_episode_of_the_env_ends_at_the_target(tiny_env_factory, target, episode_length):
    env = tiny_env_factory(macs_target=target, max_cycles=episode_length)
    rng = np.random.default_rng(2)
    finals = []
    for episode in range(8):
        env.reset(seed=episode)
        for _ in range(episode_length):
            actions = {a: int(rng.integers(10)) for a in env.agents}
            _, _, terms, _, infos = env.step(actions)
            macs_ratio = infos["layer_0"]["macs_ratio"]
            if not all(terms.values()):
                assert macs_ratio >= target - 1e-12
        finals.append(macs_ratio)
        assert macs_ratio <= target + 1e-12
    # Tiny's layers have 8-16 filters, so one filter is a coarse step; still close to the target
    assert min(finals) > target - 0.1


def test_observation_shows_the_budget_and_what_remains(tiny_env_factory):
    env = tiny_env_factory(macs_target=0.4, max_cycles=2)
    i_target, i_cut = OBSERVATION_FEATURES.index("macs_target"), OBSERVATION_FEATURES.index("macs_to_cut")
    obs, _ = env.reset(seed=0)
    assert obs["layer_0"][i_target] == pytest.approx(0.4) and obs["layer_0"][i_cut] == pytest.approx(0.6)
    obs, _, _, _, infos = env.step({a: 1 for a in env.agents})  # 10 %: well above the budget
    assert obs["layer_2"][i_cut] == pytest.approx(infos["layer_0"]["macs_ratio"] - 0.4, abs=1e-6)
    obs, _, _, _, _ = env.step({a: 1 for a in env.agents})
    assert obs["layer_2"][i_cut] == 0.0
    soft = tiny_env_factory(exact_budget=False)
    obs, _ = soft.reset(seed=0)
    assert obs["layer_0"][i_target] == 0.0 and obs["layer_0"][i_cut] == 0.0


def test_soft_budget_keeps_the_raw_action(tiny_env_factory):
    env = tiny_env_factory(exact_budget=False, max_cycles=1)
    env.reset(seed=0)
    _, _, _, _, infos = env.step({a: 9 for a in env.agents})
    assert infos["layer_0"]["macs_ratio"] < 0.2  # 90 % of every layer: far below the 0.5 target
    assert infos["layer_0"]["objective"] == pytest.approx(infos["layer_0"]["quality"])


def test_plan_from_rates_and_the_amc_view_meet_the_budget(tiny_env_factory):
    env = tiny_env_factory(macs_target=0.45)
    n = len(env.possible_agents)
    for rates in (np.full(n, 0.1), np.linspace(0.0, 0.8, n), np.full(n, 0.9)):
        plan = env.plan_from_rates(rates)
        ratio = env.measure(plan).macs_ratio
        assert ratio <= 0.45 + 1e-12
    assert env.plan_from_rates(np.full(n, 0.3), budget=False) == uniform_plan(env, 0.3)
    with pytest.raises(ValueError, match="pruning rates in"):
        env.plan_from_rates([0.5])
    view = SequentialPruningEnv(tiny_env_factory(macs_target=0.45, max_cycles=1))
    view.reset(seed=0)
    done, info = False, {}
    while not done:
        _, _, done, _, info = view.step(np.array([0.95], np.float32))  # keep 95 %: far above the budget
    assert info["macs_ratio"] <= 0.45 + 1e-12


def _plain_bisection(macs_model, rule, current, proposed_rates, target_macs, *, final, max_rate):
    """The rule as first written: one scalar s at a time, 48 halvings (the oracle of the many-points search)."""
    widths = np.asarray(macs_model.widths, dtype=np.int64)
    cur = np.asarray(current, dtype=np.int64)
    current_rate = 1.0 - cur / widths
    proposed = np.maximum(np.asarray(proposed_rates, dtype=np.float64), current_rate)
    r_max = np.maximum(float(max_rate), proposed)

    def keep(s):
        rates = proposed + s * (r_max - proposed) if s >= 0 else current_rate + (1.0 + s) * (proposed - current_rate)
        rates = np.clip(rates, 0.0, np.nextafter(1.0, 0.0))
        return np.minimum([rule.keep_count(int(w), float(r)) for w, r in zip(widths, rates)], cur)

    def macs(k):
        return macs_model.predict_array(k)[0]

    if final:
        if macs(keep(-1.0)) <= target_macs or macs(keep(1.0)) > target_macs:
            return keep(-1.0) if macs(keep(-1.0)) <= target_macs else keep(1.0)
        lo, hi = -1.0, 1.0
        for _ in range(48):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if macs(keep(mid)) <= target_macs else (mid, hi)
        k, room, grew = keep(hi).copy(), keep(lo) - keep(hi), True  # give back filters, layer by layer in turn
        while grew:
            grew = False
            for i in np.flatnonzero(room > 0):
                k[i] += 1
                if macs(k) <= target_macs:
                    room[i], grew = room[i] - 1, True
                else:
                    k[i], room[i] = k[i] - 1, 0
        return k
    as_proposed = keep(0.0)
    if macs(as_proposed) >= target_macs or macs(keep(-1.0)) < target_macs:
        return as_proposed if macs(as_proposed) >= target_macs else keep(-1.0)
    lo, hi = -1.0, 0.0
    for _ in range(48):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if macs(keep(mid)) >= target_macs else (lo, mid)
    return keep(lo)


@pytest.mark.parametrize("rule", [RateRule(), RateRule(min_keep=2, round_to=4)])
def test_the_many_points_search_is_the_plain_bisection(macs_model, rule):
    """budget_keep_counts searches 63 points at a time on the same dyadic grid: the same keep counts as 48 plain
    halvings, on 300 random proposals from random current states, final and earlier steps."""
    rng = np.random.default_rng(0)
    widths = macs_model.widths
    for k in range(300):
        current = np.maximum(1, (widths * rng.uniform(0.3, 1.0, size=widths.size)).astype(np.int64))
        if k % 3 == 0:
            current = widths.copy()
        proposed = rng.uniform(0.0, 0.9, size=widths.size)
        target = rng.uniform(0.15, 0.8) * macs_model.base_macs
        for final in (True, False):
            got = budget_keep_counts(macs_model, rule, current, proposed, target, final=final, max_rate=0.9)
            want = _plain_bisection(macs_model, rule, current, proposed, target, final=final, max_rate=0.9)
            assert got.tolist() == np.asarray(want).tolist(), (k, final)


@pytest.mark.parametrize("rule", [RateRule(), RateRule(min_keep=2, round_to=4)])
def test_the_batched_budget_is_the_budget_row_for_row(macs_model, rule):
    """budget_keep_counts_batch (48 halvings of every row at once, the give-back in lockstep) gives each row
    budget_keep_counts' keep counts: 200 random proposals from random current states, at targets that are met at
    once, searched, or unreachable, final and earlier steps."""
    rng = np.random.default_rng(3)
    widths = macs_model.widths
    current = np.maximum(1, (widths * rng.uniform(0.3, 1.0, size=(200, widths.size)))).astype(np.int64)
    current[::3] = widths
    proposed = rng.uniform(0.0, 0.9, size=current.shape)
    proposed[::7] = 0.0
    for target in (0.05, 0.2, 0.4, 0.7, 0.97):
        for final in (True, False):
            got = budget_keep_counts_batch(macs_model, rule, current, proposed, target * macs_model.base_macs,
                                           final=final, max_rate=0.9)
            want = [budget_keep_counts(macs_model, rule, c, p, target * macs_model.base_macs, final=final,
                                       max_rate=0.9) for c, p in zip(current, proposed)]
            assert got.dtype == np.int64 and got.tolist() == np.asarray(want).tolist(), (target, final)
    with pytest.raises(ValueError, match=r"\(N, "):
        budget_keep_counts_batch(macs_model, rule, widths, proposed[0], 1.0, final=True, max_rate=0.9)
    bad = proposed[:2].copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        budget_keep_counts_batch(macs_model, rule, current[:2], bad, 1.0, final=True, max_rate=0.9)


def test_predict_batch_is_predict_array(macs_model):
    rng = np.random.default_rng(1)
    keep = np.maximum(1, (macs_model.widths * rng.uniform(0.05, 1.0, size=(50, macs_model.widths.size))).astype(int))
    macs, params = macs_model.predict_batch(keep)
    assert [(int(m), int(p)) for m, p in zip(macs, params)] == [macs_model.predict_array(k) for k in keep]
    from pruning_env.engine.macs import MacsModel

    # one term per kind: bilinear in two layers, a fixed input, a fixed output (columns as in MacsModel)
    terms = [[0, 8, 1, 2, 8, 9, 1, 0, 0, 9, 1, 0, 0], [1, 4, -1, 1, 3, 3, 0, 0, 5, 3, 0, 0, 0],
             [-1, 10, 1, 4, 16, 1, 0, 0, 0, 1, 0, 0, 0]]
    mm = MacsModel(["a", "b"], [8, 4], terms, 7, 11)
    k = np.array([[5, 3], [8, 4], [1, 1]])
    o = np.array([k[:, 0], k[:, 1], np.full(3, 10)]).T
    i = np.array([k[:, 1] * 2, np.full(3, 3), k[:, 1] * 4]).T
    want = 7 + 5 + (o * i * [9, 3, 1]).sum(1) + o[:, 0]  # the constant, the d of term 2, then a*O*I and b*O
    assert mm.predict_batch(k)[0].tolist() == want.tolist()
    with pytest.raises(ValueError, match="outside"):  # a term naming a layer the model does not have
        MacsModel(["a"], [4], [[1, 5, -1, 1, 3, 1, 0, 0, 0, 1, 0, 0, 0]], 0, 0)


def test_hints_only_change_the_rounds_never_the_result():
    """The search's breakpoint hints (or wrong ones) give the same grid pair as no hints."""
    from pruning_env.engine.budget import _bisect

    rng = np.random.default_rng(3)
    for _ in range(50):
        flip = rng.uniform(-1.0, 1.0)

        def first_true(points, flip=flip):
            ok = points >= flip
            return int(np.argmax(ok)) if ok.any() else len(points)

        want = _bisect(first_true, -1.0, 1.0)
        assert want[0] < flip <= want[1] and want[1] - want[0] == 2.0 / 2**48
        for hints in (np.array([flip]), rng.uniform(-3, 3, size=40), np.array([np.nan, np.inf, flip + 1e-13])):
            assert _bisect(first_true, -1.0, 1.0, hints) == want


def test_non_finite_proposals_are_refused(macs_model):
    rule = RateRule()
    widths = macs_model.widths
    for bad in (np.nan, np.inf):
        proposed = np.full(widths.size, 0.3)
        proposed[0] = bad
        with pytest.raises(ValueError, match="finite pruning rates"):
            budget_keep_counts(macs_model, rule, widths, proposed, 0.4 * macs_model.base_macs, final=True,
                               max_rate=0.9)
