"""One measurement record: infos, ``env.measure``, search points and the workers' transport are all derived from
``Measurement``, so adding a metric is one edit; observations are assembled by feature name."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

import agents
from pruning_env.envs import measure as measure_mod
from pruning_env.envs.env import INFO_KEYS, FilterPruningEnv
from pruning_env.envs.features import FEATURES, GLOBAL_FEATURES, OBSERVATION_FEATURES, assemble, observation_features
from pruning_env.envs.measure import Measurement, metric
from pruning_env.search import Search, SearchConfig, algorithm_env
from pruning_env.search.loop import search_point

ROOT = Path(__file__).resolve().parents[1]


def _search(env, plans: int = 6) -> Search:
    algo = agents.make_algorithm("random", algorithm_env(agents.get_algorithm("random"), env), seed=0)
    search = Search(algo, env, SearchConfig(plans=plans), progress=False)
    search.run()
    return search


def test_the_infos_are_the_records_info_form_and_the_layer_rate(tiny_env_factory):
    assert (*Measurement.info_keys(), "rate") == INFO_KEYS
    assert Measurement.metrics() == ("acc", "acc_ratio", "quality", "macs_ratio", "params_ratio", "macs", "params",
                                     "objective")
    env = tiny_env_factory()
    _, infos = env.reset(seed=0)
    for _ in range(env.config.episode_length):
        _, _, _, _, infos = env.step({a: 4 for a in env.agents})
        m = env.measure(env.plan)
        for i, info in enumerate(infos.values()):
            assert tuple(info) == INFO_KEYS
            assert {k: v for k, v in info.items() if k != "rate"} == m.info()
            assert info["rate"] == 1.0 - env.plan.keep_ratio(env.layer_names[i])
    # the info form of the exact counts: millions, floats (the values the env has always given)
    assert m.info()["mmacs"] == m.macs / 1e6 and m.info()["mparams"] == m.params / 1e6
    assert type(m.macs) is int and type(m.to_dict()["macs"]) is int and type(m.to_dict()["acc"]) is float


def test_search_points_and_the_best_plan_carry_the_records_metrics(tiny_env_factory):
    env = tiny_env_factory()
    search = _search(env)
    assert search.points and all(set(p) == {*Measurement.metrics(), "order"} for p in search.points)
    m = env.measured_plans()[-1]
    assert search_point(m, 3) == {**{k: (round(v, 6) if isinstance(v, float) else v)
                                     for k, v in m.to_dict().items()}, "order": 3}
    assert set(Measurement.metrics()) <= set(search.best)
    json.dumps(search.result())  # the results files stay plain JSON


def test_stored_results_files_use_the_records_names():
    """Cached runs in benchmarks/results keep loading: every key their points and best plans store is still a
    metric of the record (or one of the search's own keys)."""
    own = {"order", "episode", "source", "plans_used", "plan"}
    files = sorted((ROOT / "benchmarks" / "results").glob("marl*.json"))
    assert files
    seen: set[str] = set()

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "points" and isinstance(v, list):
                    seen.update(key for p in v for key in p)
                elif k == "best" and isinstance(v, dict) and "objective" in v:
                    seen.update(v)
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for path in files:
        walk(json.loads(path.read_text()))
    assert {"acc_ratio", "macs_ratio", "objective"} <= seen
    assert seen - own <= set(Measurement.metrics())


def test_adding_one_metric_is_one_edit(tiny_env_factory, monkeypatch):
    """A metric declared once, in the record, is in the infos, env.measure, every search point and the docs."""

    @dataclasses.dataclass(frozen=True)
    class WithLatency(Measurement):
        latency_ms: float = metric("CPU latency of one image in ms", info="latency")

    original = measure_mod.PlanMeter.record

    def record(self, plan, acc, quality, macs, params, **rest):
        m = original(self, plan, acc, quality, macs, params, **rest)
        return WithLatency(**{f.name: getattr(m, f.name) for f in dataclasses.fields(m)}, latency_ms=1.5)

    monkeypatch.setattr(measure_mod.PlanMeter, "record", record)
    env = tiny_env_factory()
    _, infos = env.reset(seed=0)
    assert infos["layer_0"]["latency"] == 1.5 and tuple(infos["layer_0"]) == (*WithLatency.info_keys(), "rate")
    assert env.measure(env.plan).to_dict()["latency_ms"] == 1.5
    assert WithLatency.meanings()["latency"] == "CPU latency of one image in ms"
    search = _search(env, plans=3)
    assert all(p["latency_ms"] == 1.5 for p in search.points) and search.best["latency_ms"] == 1.5


def test_the_record_is_frozen_compared_by_its_metrics_and_picklable(tiny_env_factory):
    env = tiny_env_factory()
    env.reset(seed=0)
    env.step({a: 5 for a in env.agents})
    m = env.measure(env.plan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.acc = 0.0  # type: ignore[misc]
    again = pickle.loads(pickle.dumps(m))  # what a Ray worker sends back
    assert again == m and again.plan == m.plan and set(again.scores) == set(env.layer_names)
    assert dataclasses.replace(m, features={}) == m  # the non-metrics are not compared
    assert dataclasses.replace(m, acc=m.acc + 1) != m
    assert env.measured_plans()[-1] is m and env.measure(env.plan) is m  # cached: the same record


def test_a_replicas_record_is_taken_as_the_envs_own(tiny_env_factory):
    source = tiny_env_factory()
    env = tiny_env_factory()
    calls = []

    def replica(plan):
        calls.append(plan)
        return source.measure(plan)

    env.measurement_source = replica
    env.reset(seed=0)
    _, _, _, _, infos = env.step({a: 3 for a in env.agents})
    assert calls and env.measure(env.plan) == source.measure(env.plan)
    reference = tiny_env_factory()
    reference.reset(seed=0)
    assert reference.step({a: 3 for a in reference.agents})[4] == infos


def test_observations_are_assembled_by_feature_name(tiny_env_factory):
    env = tiny_env_factory()  # exact budget at macs_target 0.5
    k = len(env.config.rates)
    names = observation_features(k)
    assert env.observation_space(env.possible_agents[0]).shape == (len(names),)
    assert names[: len(FEATURES)] == OBSERVATION_FEATURES and len(set(names)) == len(names)
    assert names[len(FEATURES):] == tuple(f"removed_mass_{i}" for i in range(k))
    obs, _ = env.reset(seed=0)
    obs, _, _, _, infos = env.step({a: 6 for a in env.agents})
    col = {n: i for i, n in enumerate(names)}
    for i, agent in enumerate(env.possible_agents):
        o, info = obs[agent], infos[agent]
        assert o[col["macs_target"]] == np.float32(0.5)
        assert o[col["macs_ratio"]] == np.float32(info["macs_ratio"])
        assert o[col["keep_ratio"]] == pytest.approx(1.0 - info["rate"])
        assert o[col["progress"]] == np.float32(1 / env.config.episode_length)
        assert o[col["macs_to_cut"]] == np.float32(max(0.0, info["macs_ratio"] - 0.5))
        for name, column in env.static_features.items():
            assert o[col[name]] == column[i]
    state = env.state()
    tail = dict(zip(GLOBAL_FEATURES, state[-len(GLOBAL_FEATURES):]))
    assert tail["macs_ratio"] == np.float32(infos["layer_0"]["macs_ratio"])
    assert tail["params_ratio"] == np.float32(infos["layer_0"]["params_ratio"])


def test_assemble_refuses_columns_that_are_not_the_declared_ones():
    cols = {"a": np.zeros(2), "b": np.ones(2)}
    assert assemble(cols, ("b", "a")).tolist() == [[1.0, 0.0], [1.0, 0.0]]
    with pytest.raises(ValueError, match=r"declared but not computed \['c'\]"):
        assemble(cols, ("a", "b", "c"))
    with pytest.raises(ValueError, match=r"computed but not declared \['b'\]"):
        assemble(cols, ("a",))
    # every column has one value per layer, none broadcast; values clipped to [0, 1] in float32
    with pytest.raises(ValueError, match=r"'b' has shape \(1,\), 'a' has \(2,\)"):
        assemble({"a": np.zeros(2), "b": np.ones(1)}, ("a", "b"))
    # N plans at once: (N, L) columns, the (L,) ones repeated per plan
    many = assemble({"a": np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]), "b": np.array([0.7, 0.8])}, ("a", "b"))
    assert many.shape == (3, 2, 2) and many[2].tolist() == assemble({"a": np.array([0.5, 0.6]), "b": np.array(
        [0.7, 0.8])}, ("a", "b")).tolist()
    z = np.zeros
    for a, b in ((z((3, 2)), z((2, 2))), (z((3, 2)), z(3)), (z(2), z((3, 1)))):
        with pytest.raises(ValueError, match="all of one L and N"):
            assemble({"a": a, "b": b}, ("a", "b"))
    out = assemble({"a": np.array([-0.5, 1.5]), "b": np.array([0.25, np.float64(1 / 3)])}, ("a", "b"))
    assert out.dtype == np.float32 and out.tolist() == [[0.0, 0.25], [1.0, np.float32(1 / 3)]]
    assert assemble({"a": np.array([-0.0])}, ("a",)).tobytes() == np.float32(-0.0).tobytes()  # as np.clip keeps it
    with pytest.raises(ValueError, match="no feature names"):
        assemble({}, ())


def test_the_documented_tables_are_generated_from_the_declarations():
    doc = FilterPruningEnv.__doc__
    rows = [line.split() for line in doc.splitlines()]
    table = {r[1]: r[0] for r in rows if len(r) > 2 and (r[0].isdigit() or r[0].endswith("+k"))}
    assert {name: table.get(name) for name in OBSERVATION_FEATURES} == {f.name: str(i) for i, f in
                                                                         enumerate(FEATURES)}
    assert table["removed_mass_<k>"] == f"{len(FEATURES)}+k"
    assert f"(Box(0, 1, ({len(FEATURES)} + K,)" in doc.replace("``", "(")
    for key, meaning in Measurement.meanings().items():
        assert f"{key}" in doc and meaning[:40] in doc.replace("\n    ", " ")
