"""``train_marl.py --preset paper`` end to end at full width (VGG-16, width 1) on the CPU (issue 17).

The preset that a user with a GPU gets by default runs every width-1 code path here: the baseline trained
at width 1 (the env's cache miss), the env's DSFP scoring, surgery, BN re-estimation and evaluation of
width-1 networks, the QMIX search, the KD fine-tune of the best plan and the report. Only budgets change
(a tiny image folder, 1 baseline epoch, 4 plans, 1 fine-tuning epoch, 1 latency repeat) and the KL mode:
the exact KL of the unpruned network costs 4,224 masked forwards at width 1 (about a minute on one core),
so the env scores it with the Fisher approximation here.
"""

from __future__ import annotations

import json

import pytest
from conftest import write_image_folder

from pruning_env.cli import marl as train_marl
from pruning_env.core import checkpoint as ckpt

VGG16_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


@pytest.mark.long  # an end-to-end run at full width (.ci/run runs it)
def test_the_paper_preset_runs_end_to_end_at_full_width(tmp_path):
    root = write_image_folder(tmp_path / "data" / "tinyimg", classes=3, per_class=8).parent
    logdir = tmp_path / "run"
    argv = ["--net", "vgg16", "--preset", "paper", "--dataset", "tinyimg", "--data-dir", str(root), "--device", "cpu",
            "--baseline-epochs", "1", "--plans", "4", "--eval-every", "2", "--finetune-epochs", "1",
            "--latency-repeats", "1", "--kl", "fisher", "--logdir", str(logdir), "--no-progress"]
    assert train_marl.main(argv) == 0
    report = json.loads((logdir / "report.json").read_text())
    config = report["config"]
    assert config["preset"] == "paper" and config["width"] == 1.0
    assert config["eval_size"] == train_marl.PRESETS["paper"]["eval_size"]  # the preset's values, not the cpu one's
    assert list(report["plan"]["widths"].values()) == VGG16_WIDTHS  # the full-width network was pruned
    assert report["search"]["plans_evaluated"] >= 4
    assert 0.0 < report["macs_reduction"] < 1.0
    assert report["finetune"]["epochs"] == 1 and report["latency_ms_b1"] > 0
    pruned = ckpt.load(logdir / "pruned_model.pt")
    assert pruned.plan == report["plan"]
