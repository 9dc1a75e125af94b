"""The benchmark scripts run end to end with the tiniest settings (synthetic data, no CIFAR needed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_threads():
    """The scripts set torch's thread count (--threads); give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_criteria_benchmark_smoke(tmp_path, capsys):
    bench = _load("criteria")
    out = tmp_path / "criteria.md"
    args = ["--dataset", "synthetic", "--nets", "vgg11", "--width", "0.125", "--rates", "0.5",
            "--criteria", "dsfp-low-fisher", "l1", "random", "--seeds", "0", "1", "--baseline-epochs", "1",
            "--finetune-epochs", "1", "--finetune-limit", "64", "--eval-limit", "64", "--bn-recal-batches", "1",
            "--threads", "1", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert bench.main(args) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["rows"]
    assert sorted((r["variant"], r["seed"]) for r in rows) == [("dsfp-low-fisher", 0), ("l1", 0), ("random", 0),
                                                               ("random", 1)]
    for r in rows:
        assert r["rate"] == 0.5 and 0.5 < r["macs_reduction"] < 1 and 0.5 < r["params_reduction"] < 1
        for stage in ("pruned", "bn", "ft"):
            assert 0 <= r[f"test_{stage}"] <= 100 and r[f"retention_{stage}"] is not None
    assert data["baselines"]["vgg11"]["trained_by_benchmark"] is True
    md = out.read_text()
    for text in ("## Baselines", "## vgg11", "| dsfp-low-fisher | 50% |", "| random | 50% |", "± ",
                 "## Conclusion", "DSFP vs baselines", "Commit:", "Machine:", "Wall time:"):
        assert text in md, text
    assert out.with_suffix(".scores.pt").is_file()

    # Resume: nothing is recomputed, and an added criterion only adds its own rows.
    capsys.readouterr()
    assert bench.main(args) == 0
    assert "0 rows to run (4 already" in capsys.readouterr().err
    args2 = [a if a != "l1" else "dsfp-high-fisher" for a in args]
    assert bench.main(args2) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["rows"]) == 5
    assert "DSFP direction: " in out.read_text()

    # Another setup in the same file is refused instead of mixed in.
    assert bench.main([*args, "--bn-recal-batches", "2"]) == 2


def test_score_bank_matches_criteria_score():
    """The cached-component DSFP fusion is exactly what pruning_env.criteria.score computes."""
    from pruning_env import criteria
    from pruning_env.core.models import build

    bench = _load("criteria")
    torch.manual_seed(0)
    model = build("tiny", num_classes=4, width=1.0).eval()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    bank = bench.ScoreBank(model, names, x, y, {}, "k", lambda: None)
    for variant in ("dsfp-low-exact", "dsfp-low-fisher", "dsfp-high-fisher", "taylor", "kl", "kl-fisher", "l1", "random"):
        v = bench.parse_variant(variant)
        opts = {"direction": v.direction} if v.direction else {}
        if v.kl:
            opts["kl"] = v.kl
        if v.criterion == "random":
            opts["seed"] = 3
        ref = criteria.score(model, x, y, v.criterion, layers=names, **opts)
        got, _ = bank.scores(v, seed=3)
        assert set(got) == set(ref)
        for n in names:
            torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0)
    with pytest.raises(ValueError):
        bench.parse_variant("dsfp-sideways-exact")


def test_latency_benchmark_smoke(tmp_path):
    bench = _load("latency")
    out = tmp_path / "latency.md"
    assert bench.main(["--nets", "vgg11:0.125", "--rates", "0", "0.5", "--repeats", "2", "--warmup", "1",
                       "--batch-sizes", "1", "2", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    md = out.read_text()
    for col in ("net", "width", "rate", "MACs ratio", "params ratio", "latency b1 ms", "speed-up b1",
                "latency b2 ms", "speed-up b2"):
        assert f"| {col} |" in md or f"| {col}" in md, col
    assert "| vgg11 | 0.125 | 0% | 1.000 | 1.000 |" in md
    assert "| vgg11 | 0.125 | 50% |" in md
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["rate"] for r in rows] == [0.0, 0.5]
    assert rows[1]["macs_ratio"] < 0.5 and rows[1]["ms_b1"] > 0
    assert out.with_suffix(".png").is_file()


def test_baseline_recipe_description_names_every_augmentation():
    import dataclasses

    from pruning_env.training.train import TrainConfig

    bench = _load("criteria")
    now = bench.describe_training(dataclasses.asdict(TrainConfig(aug_copies=2, ema_decay=0.999, cutout=8)))
    assert "crop (padding 4) + flip + Cutout 8, 2 augmented copies per image, weight EMA 0.999, seed 0" in now
    legacy = {"epochs": 30, "lr": 0.1, "schedule": "onecycle", "batch_size": 128, "weight_decay": 5e-4,
              "label_smoothing": 0.1, "seed": 0, "val_fraction": 0.1}  # a checkpoint from before these options
    assert bench.describe_training(legacy).endswith(
        "label smoothing 0.1, crop (padding 4) + flip, seed 0, val split 0.1")
    assert bench.describe_training(None) == "unknown recipe"
