"""Scale out on Ray (``pruning_env.search.parallel``): flags, the optional extra, the plan evaluator, identical
results for any number of workers, a killed worker, and train_marl.py with --workers 2 (Ctrl-C, resume).

The Ray tests run where the extra is installed (CI: the RLlib virtual environment) and start and stop a local
Ray of 2 CPUs themselves; elsewhere they are skipped and only the Ray-free checks run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import interrupt_training

from pruning_env.core.config import SettingError
from pruning_env.envs.plans import uniform_plan
from pruning_env.search import Search, SearchConfig, algorithm_env
from pruning_env.search.parallel import PlanEvaluator, WorkersConfig, ray_session, scale_out

ROOT = Path(__file__).resolve().parents[1]
HAS_RAY = importlib.util.find_spec("ray") is not None
# QMIX with 4 episodes per policy snapshot (pymarl's parallel runner); learning starts after the first snapshot
SNAPSHOT = {"episodes_per_snapshot": 4, "learning_starts": 4, "batch_size": 4, "eps_anneal_steps": 12}
needs_ray = pytest.mark.skipif(not HAS_RAY, reason='Ray not installed (pip install -e ".[ray]")')


# ----------------------------------------------------------------------------- without Ray

@pytest.mark.parametrize("kwargs,message", [
    ({"workers": 0}, "--workers"),
    ({"workers": 2, "ray_address": "not an address"}, "--ray-address"),
    ({"workers": 1, "ray_address": "auto"}, "needs --workers >= 2"),
    ({"workers": 2, "worker_threads": 0}, "--worker-threads"),
])
def test_bad_workers_settings_are_refused(kwargs, message):
    with pytest.raises((SettingError, ValueError), match=message):
        WorkersConfig(**kwargs)


@pytest.mark.parametrize("script", ["train_marl.py", "benchmarks.marl"])
def test_bad_workers_flag_fails_before_any_work(tmp_path, script):
    cmd = [sys.executable, "train_marl.py", "--preset", "smoke", "--logdir", str(tmp_path / "x")] \
        if script == "train_marl.py" else [sys.executable, "-m", "benchmarks.marl", "--out-dir", str(tmp_path / "x")]
    out = subprocess.run([*cmd, "--env", "pruning_env/Tiny-v1", "--workers", "0"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 2 and "--workers" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_missing_ray_is_named_with_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail as if it were not installed
    with pytest.raises(ValueError, match=r'pip install torch==2.13.0 -e "\.\[ray\]"'):
        WorkersConfig(workers=2).check()
    WorkersConfig(workers=1).check()  # one worker never needs Ray


def test_one_worker_never_imports_ray():
    code = ("import sys, pruning_env, pruning_env.cli.marl, benchmarks.marl\n"
            "from pruning_env.search.parallel import WorkersConfig, ray_session\n"
            "with ray_session(WorkersConfig()) as r:\n    assert r is None\n"
            "assert 'ray' not in sys.modules, 'ray imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_a_policy_snapshot_is_fixed_for_its_episodes(tiny_env_factory):
    import agents

    algo = agents.make_algorithm("qmix", tiny_env_factory(), seed=0, **SNAPSHOT)
    assert agents.make_algorithm("qmix", tiny_env_factory(), seed=0).upcoming_policies(4) == []  # default: none
    assert len(algo.upcoming_policies(8)) == 4  # the rest of the snapshot only
    for episode in range(1, 9):
        algo.train_episode()
        assert algo.gradient_steps == (0 if episode < 4 else 4 * 4 if episode < 8 else 8 * 4)
        assert len(algo.upcoming_policies(8)) == 4 - episode % 4


# ----------------------------------------------------------------------------- train_marl.py on Ray

def _run(tmp_path, *extra):
    from pruning_env.cli import marl as train_marl

    argv = ["--env", "pruning_env/Tiny-v1", "--preset", "smoke", "--logdir", str(tmp_path), "--no-progress",
            "--algo", "random", "--plans", "12", "--latency-repeats", "0", *extra]
    return train_marl.main(argv)


def _results(logdir: Path) -> dict:
    """report.json without what may differ between equal runs: wall times and the run's own settings."""
    report = json.loads((logdir / "report.json").read_text())
    report.pop("config")
    report["finetune"].pop("seconds", None)
    state = __import__("torch").load(logdir / "train_state.pt", weights_only=True)
    return {"report": report, "points": state["points"], "curve": state["curve"], "best": state["best"]}


@needs_ray
def test_train_marl_with_two_workers_equals_one_also_after_ctrl_c_and_resume(tmp_path, monkeypatch,
                                                                              tiny_env_factory):
    import ray

    from pruning_env.cli import marl as train_marl
    from pruning_env.search import pareto_front

    assert not ray.is_initialized()
    assert _run(tmp_path / "serial") == 0
    reference = _results(tmp_path / "serial")

    with pytest.MonkeyPatch.context() as patch:  # Ctrl-C during the 3rd training episode (after 2 saved ones)
        interrupt_training(patch, train_marl, 3)
        assert _run(tmp_path / "ray", "--workers", "2") == 130
    assert not ray.is_initialized()  # the local Ray this run started is shut down after Ctrl-C
    assert _run(tmp_path / "ray", "--workers", "2", "--resume") == 0
    assert not ray.is_initialized()
    parallel = _results(tmp_path / "ray")
    assert parallel == reference
    assert pareto_front(parallel["points"]) == pareto_front(reference["points"])
    assert len({json.dumps(p, sort_keys=True) for p in parallel["points"]}) == len(parallel["points"])


@needs_ray
def test_benchmark_marl_starts_its_workers_once_and_equals_a_serial_run(tmp_path, monkeypatch, tiny_env_factory):
    import ray

    from benchmarks import marl

    def searches(out: Path, *extra: str) -> dict:
        argv = ["--env", "pruning_env/Tiny-v1", "--plans", "12", "--finetune-epochs", "0", "--seeds", "0", "1",
                "--algos", "random", "dsfp-uniform", "--out-dir", str(out), "--no-progress", *extra]
        assert marl.main(argv) == 0
        runs = json.loads((out / "marl.json").read_text())["runs"]
        for run in runs.values():
            for search in run["search"].values():
                search.pop("seconds"), search.pop("env_setup_seconds")
        return {seed: run["search"] for seed, run in runs.items()}

    started = []
    init = PlanEvaluator.__init__

    def counted(self, *args, **kwargs) -> None:
        started.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(PlanEvaluator, "__init__", counted)
    reference = searches(tmp_path / "serial")
    assert started == []  # one worker: no Ray, no evaluator
    parallel = searches(tmp_path / "ray", "--workers", "2")
    assert started == [1]  # one set of workers served all 4 searches (2 seeds x 2 algorithms)
    assert not ray.is_initialized()
    assert parallel == reference


@needs_ray
def test_a_cluster_that_cannot_be_joined_fails_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, "train_marl.py", "--env", "pruning_env/Tiny-v1", "--preset", "smoke",
                          "--logdir", str(tmp_path / "x"), "--workers", "2", "--ray-address", "auto"],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 2 and "cannot join the Ray cluster at --ray-address auto" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "x" / "train_state.pt").exists()


# ----------------------------------------------------------------------------- the evaluator

@pytest.fixture(scope="module")
def local_ray():
    if not HAS_RAY:
        pytest.skip('Ray not installed (pip install -e ".[ray]")')
    with ray_session(WorkersConfig(workers=2)) as ray:
        assert ray.cluster_resources().get("CPU") == 2
        yield ray
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def evaluator(local_ray, tiny_env_factory):
    """Two Tiny-v1 workers shared by the tests below (their store serves every Tiny-v1 env of the default config)."""
    with PlanEvaluator(tiny_env_factory(), 2) as ev:
        yield ev


WORKERS = WorkersConfig(workers=2)


def _search(env, name: str, plans: int, seed: int = 0, algo_config: dict | None = None, **cfg) -> Search:
    import agents

    cls = agents.get_algorithm(name)
    algo = agents.make_algorithm(name, algorithm_env(cls, env), seed=seed, **(algo_config or {}))
    return Search(algo, env, SearchConfig(plans=plans, eval_every=4, **cfg), progress=False)


def _result(search: Search) -> dict:
    out = search.result()
    out.pop("seconds")
    return out


def _from_workers(env, evaluator) -> bool:
    """Whether every plan the env holds, but the unpruned one (measured by the env itself), is in the workers' store."""
    return all(evaluator.source(m.plan) is not None for m in env.measured_plans() if m.macs < env.base_macs)


def _worker_share(env, evaluator) -> float:
    """The share of the env's plans (but the unpruned one) that came from the workers' store."""
    plans = [m for m in env.measured_plans() if m.macs < env.base_macs]
    return sum(evaluator.source(m.plan) is not None for m in plans) / max(len(plans), 1)


def test_evaluator_measures_each_plan_once_in_submission_order(evaluator, tiny_env_factory):
    import torch

    serial = tiny_env_factory()
    plans = [uniform_plan(serial, r) for r in (0.5, 0.2, 0.7, 0.2, 0.9, 0.5)]  # two repeats
    before = evaluator.measured
    records = evaluator.measure(plans)
    assert evaluator.measured - before == 4
    for plan, record in zip(plans, records):
        expected = serial.measure(plan)
        assert record.to_dict() == expected.to_dict()
        assert all(torch.equal(record.scores[n], expected.scores[n]) for n in expected.scores)
        assert all((record.features[k] == expected.features[k]).all() for k in expected.features)
    assert evaluator.measure(plans[:3]) == records[:3] and evaluator.measured - before == 4  # the shared cache


@pytest.mark.parametrize("algo,algo_config", [("random", None), ("dsfp-uniform", None), ("qmix", SNAPSHOT)])
def test_search_result_does_not_depend_on_the_workers(evaluator, tiny_env_factory, algo, algo_config):
    serial_env = tiny_env_factory()
    serial = _search(serial_env, algo, 18, algo_config=algo_config)
    serial.run()
    env = tiny_env_factory()
    search = _search(env, algo, 18, algo_config=algo_config)
    scale_out(search, WORKERS, evaluator)
    search.run()
    assert len(env.measured_plans()) > 5
    if algo == "qmix":  # greedy evaluations are not known ahead: the driver measures their new plans itself
        share = _worker_share(env, evaluator)
        assert share >= 0.5, share
    else:
        assert _from_workers(env, evaluator)  # the workers measured the plans
    if algo == "qmix":
        assert search.algorithm.gradient_steps > 0  # it learned between snapshots
    assert _result(search) == _result(serial)
    assert env.num_evaluations == serial_env.num_evaluations


def test_workers_beyond_the_free_cpus_are_refused(evaluator, tiny_env_factory):
    with pytest.raises(RuntimeError, match="need 1 free CPUs"):  # both CPUs are the evaluator's
        PlanEvaluator(tiny_env_factory(), 1, cpu_wait=0.0)


def test_a_killed_worker_costs_time_not_results(evaluator, local_ray, tiny_env_factory, monkeypatch):
    reference = _search(tiny_env_factory(), "random", 18, seed=1)  # plans no earlier test measured
    reference.run()
    env = tiny_env_factory()
    search = _search(env, "random", 18, seed=1)
    scale_out(search, WORKERS, evaluator)
    victim = evaluator.worker_pids()[0]
    real_wait, killed = local_ray.wait, []

    def wait_after_killing(refs, **kwargs):  # SIGKILL a worker while its first plan is in flight
        if not killed:
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
        return real_wait(refs, **kwargs)

    monkeypatch.setattr(local_ray, "wait", wait_after_killing)
    requeued = evaluator.requeued
    search.run()
    assert killed and evaluator.requeued > requeued
    assert victim not in evaluator.worker_pids()  # restarted in a new process
    assert _result(search) == _result(reference)
    keys = [m.plan.key() for m in env.measured_plans()]
    assert len(keys) == len(set(keys)) and search.plans_used == len({json.dumps(p) for p in search.points})
