"""Results are tied to the baseline they were measured on (its weights digest): a resume on another baseline, such
as the cached one retrained on another machine, is refused instead of mixing the two."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from benchmarks import marl as bench
from pruning_env.cli import marl
from pruning_env.core import checkpoint as ckpt
from pruning_env.core.models import build

FAST = ["--env", "pruning_env/Tiny-v1", "--preset", "smoke", "--algo", "dsfp-uniform", "--plans", "6", "--no-selection",
        "--latency-repeats", "0", "--no-progress", "--device", "cpu"]


def _vgg(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build("vgg11", num_classes=10, width=0.125)


def test_the_digest_names_the_weights_not_the_file(tmp_path):
    model = _vgg(0)
    d = ckpt.weights_digest(model)
    assert d == ckpt.weights_digest(_vgg(0)) and d != ckpt.weights_digest(_vgg(1))
    ckpt.save(tmp_path / "a.pt", model, input_shape=(3, 32, 32), metrics={"test_acc": 1.0})
    ckpt.save(tmp_path / "b.pt", model, input_shape=(3, 32, 32), metrics={"test_acc": 2.0}, dataset="cifar10")
    assert ckpt.weights_digest(ckpt.load(tmp_path / "a.pt").model) == ckpt.weights_digest(
        ckpt.load(tmp_path / "b.pt").model) == d
    with torch.no_grad():  # one weight one ulp off
        w = next(model.parameters())
        w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(float("inf")))
    assert ckpt.weights_digest(model) != d


def test_train_marl_refuses_to_resume_a_search_of_another_baseline(tmp_path, capsys):
    logdir = tmp_path / "run"
    assert marl.main([*FAST, "--logdir", str(logdir)]) == 0
    state_file = logdir / marl.STATE_FILE
    state = torch.load(state_file, weights_only=True)
    assert len(state["baseline_digest"]) == 16
    assert marl.main([*FAST, "--logdir", str(logdir), "--resume"]) == 0  # the same baseline
    state["baseline_digest"] = "0" * 16
    torch.save(state, state_file)
    report = (logdir / "report.json").read_text()
    with pytest.raises(SystemExit) as exc:
        marl.main([*FAST, "--logdir", str(logdir), "--resume"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert "another baseline" in err and "0" * 16 in err and "--overwrite" in err
    assert (logdir / "report.json").read_text() == report


def test_benchmark_marl_refuses_to_resume_results_of_another_baseline(tmp_path, capsys):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for path, seed in ((a, 0), (b, 1)):
        ckpt.save(path, _vgg(seed), input_shape=(3, 32, 32), dataset="cifar10", metrics={"test_acc": 50.0})
    out = tmp_path / "out"
    args = ["--net", "vgg11", "--width", "0.125", "--out-dir", str(out), "--resume", "--no-progress"]
    cfg = bench._check(bench.config_from_args(bench.BenchConfig, _parse([*args, "--checkpoint", str(a)])))
    state, _, _ = bench._load_state(out / bench.STATE_FILE, cfg)
    assert state["baseline_digest"] == ckpt.weights_digest(_vgg(0))
    out.mkdir()
    (out / bench.STATE_FILE).write_text(json.dumps(state))
    assert bench._load_state(out / bench.STATE_FILE, cfg)[0]["baseline_digest"] == state["baseline_digest"]
    shutil.copy(b, a)  # the "same" checkpoint path now holds another network
    with pytest.raises(SystemExit) as exc:
        bench.main([*args, "--checkpoint", str(a)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "another baseline" in err and state["baseline_digest"] in err


def _parse(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_config_args(parser, bench.BenchConfig)
    return parser.parse_args(argv)
