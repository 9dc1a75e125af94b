"""benchmarks/scale_out.py: its cost model, and a --smoke run on Tiny-v1 with a local Ray of 2 CPUs."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math

import pytest

from benchmarks import scale_out

HAS_RAY = importlib.util.find_spec("ray") is not None


def test_cost_model_is_amdahl():
    kw = dict(plans=120, episode_length=3, cores=2, threads=1, lookahead=8)
    # no serial part: speed-up = workers busy, capped by the prefetch round's width
    assert [scale_out.cost_model(0.5, 0.0, 0.0, machines=k, **kw)["speedup"] for k in (1, 2, 8)] == \
        pytest.approx([2.0, 4.0, 8.0])
    # a serial learner bounds it: (P t + E l) / (E l) with E = 40 episodes
    bound = (120 * 0.5 + 40 * 1.0) / (40 * 1.0)
    model = [scale_out.cost_model(0.5, 0.01, 1.0, machines=k, **{**kw, "lookahead": 10**6})["speedup"]
             for k in (1, 4, 64, 4096)]
    assert all(a < b for a, b in itertools.pairwise(model)) and model[-1] < bound


def test_random_plans_are_distinct_one_step_plans(tiny_env_factory):
    env = tiny_env_factory()
    plans = scale_out.random_plans(env, 5, seed=0)
    assert len({p.key() for p in plans}) == 5
    assert all(env.measure(p).macs < env.base_macs for p in plans)


@pytest.mark.skipif(HAS_RAY, reason="checks the message shown without Ray")
def test_without_ray_it_names_the_extra(tmp_path, capsys):
    assert scale_out.main(["--smoke", "--out-dir", str(tmp_path)]) == 2
    assert '.[ray]' in capsys.readouterr().err


@pytest.mark.skipif(not HAS_RAY, reason='Ray not installed (pip install -e ".[ray]")')
def test_smoke_run_writes_the_table_plot_and_model(tmp_path, capsys, tiny_env_factory):
    import ray

    # 2 workers only (the model then uses their numbers) and no learner episode: the test's time
    assert scale_out.main(["--smoke", "--out-dir", str(tmp_path), "--workers", "2", "--learner-episodes", "0",
                           "--machines", "1", "4"]) == 0
    assert not ray.is_initialized()  # the local Ray it started is stopped
    state = json.loads((tmp_path / "scale_out.json").read_text())
    assert [r["setting"] for r in state["rows"]] == ["bare", "ray x2"] and state["learner_s_per_episode"] is None
    assert all(r["plans"] == 4 and r["plans_per_s"] > 0 for r in state["rows"])
    assert all(math.isfinite(r["overhead_share"]) for r in state["rows"][1:])
    assert [m["machines"] for m in state["model"]] == [1, 4]
    assert "| ray x2 | 1 | 4 |" in (tmp_path / "scale_out.md").read_text()
    assert (tmp_path / "scale_out.png").stat().st_size > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out_dir"] == str(tmp_path)


def test_one_worker_is_also_timed_at_the_threads_of_the_most_workers():
    def settings(workers, cores=2):
        return scale_out._settings(scale_out.ScaleOutConfig(workers=workers, cores=cores, net="tiny"))

    assert settings((1, 2)) == [(1, 2), (1, 1), (2, 1)]
    assert settings((1, 2, 4), cores=8) == [(1, 8), (1, 2), (2, 4), (4, 2)]
    assert settings((2,)) == [(2, 1)] and settings((1,)) == [(1, 2)]  # no single worker asked for, or no other N
    assert [scale_out._setting_name(n, t, 2) for n, t in settings((1, 2))] == ["ray x1", "ray x1, 1 thread",
                                                                               "ray x2"]
    rows = [{"setting": "bare", "workers": 0, "threads": 2, "plans_per_s": 2.4},
            {"setting": "ray x1", "workers": 1, "threads": 2, "plans_per_s": 2.0},
            {"setting": "ray x1, 1 thread", "workers": 1, "threads": 1, "plans_per_s": 1.25},
            {"setting": "ray x2", "workers": 2, "threads": 1, "plans_per_s": 2.5}]
    assert scale_out._speedups(rows[3], rows, cores=2) == pytest.approx((1.25, 2.0))
    assert scale_out._speedups(rows[2], rows, cores=2) == pytest.approx((0.625, 1.0))
