"""``benchmarks.env_step`` and ``benchmarks.latency`` with ``--device`` (issue 17): a clear error before any work
without CUDA, a CPU run that records its device, and (with a GPU) GPU figures in their own report files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import exit_status, requires_cifar

from benchmarks import env_step as env_step_bench
from benchmarks import latency as latency_bench

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
@pytest.mark.parametrize("module", ["env_step", "latency"])
def test_device_cuda_without_cuda_is_refused_before_any_work(tmp_path, module, capsys):
    out = tmp_path / "x.md"
    bench = {"env_step": env_step_bench, "latency": latency_bench}[module]
    code = exit_status(bench.main, ["--device", "cuda", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "CUDA is not available here; use --device cpu" in err, err
    assert not out.exists()


def test_latency_on_cpu_records_its_device(tmp_path, capsys):
    out = tmp_path / "latency.md"
    assert latency_bench.main(["--nets", "vgg11:0.125", "--rates", "0", "0.5", "--repeats", "2", "--warmup", "1",
                               "--threads", "1", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    md = out.read_text()
    assert md.startswith("# CPU latency") and ", device cpu  " in md
    assert json.loads(out.with_suffix(".json").read_text())["meta"]["device"] == "cpu"


@cuda
def test_latency_on_cuda_reports_batch_1_and_64(tmp_path):
    out = tmp_path / "latency_cuda.md"
    assert latency_bench.main(["--nets", "vgg16:1", "--rates", "0", "0.7", "--repeats", "3", "--device", "cuda",
                               "--no-progress", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert out.read_text().startswith("# GPU latency") and all(r["ms_b1"] > 0 and r["ms_b64"] > 0 for r in rows)


@cuda
@requires_cifar
def test_env_step_on_cuda_times_full_width_steps(tmp_path, capsys):
    out = tmp_path / "env_step_cuda.md"
    assert env_step_bench.main(["--nets", "vgg16-1", "--steps", "2", "--no-naive", "--device", "cuda",
                                "--out", str(out)]) == 0
    (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert row["step_ms"] > 0 and "device cuda" in out.read_text()
