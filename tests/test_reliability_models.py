"""Unsupported model dtypes get a message about the dtype, and the progress bar shows the rate a step used."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pruning_env.training.train as train_module
from pruning_env import FilterPruningEnv, load_splits
from pruning_env.core.models import build
from pruning_env.training.finalize import finalize
from pruning_env.training.train import TrainConfig, fit


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8, affine=False)  # no affine parameters: still supported
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(torch.relu(self.b1(self.c1(x)))).mean((2, 3)))


@pytest.fixture(scope="module")
def splits():
    return load_splits("synthetic")


def test_a_float64_model_is_refused_naming_the_dtype(splits):
    message = r"float64 weights; pruning_env works on float32 models only: pass model\.float"
    with pytest.raises(TypeError, match=message):
        FilterPruningEnv(Small().double().eval(), splits, kl="fisher", calib_size=16, eval_size=32)
    with pytest.raises(TypeError, match="float32 models only"):
        finalize(Small().double().eval(), splits, model=Small().eval())


def test_batchnorm_without_affine_parameters_is_supported(splits):
    env = FilterPruningEnv(Small().eval(), splits, kl="fisher", calib_size=16, eval_size=32,
                           exact_budget=False)  # the raw action's rate, no projection onto a MACs budget
    assert env.layer_names == ["c1", "c2"][: len(env.layer_names)] and "c1" in env.layer_names
    env.reset(seed=0)
    env.step({a: 5 for a in env.agents})
    assert env.plan.keep_counts()["c1"] == 4


def test_the_progress_bar_shows_the_learning_rate_each_step_used(splits, monkeypatch):
    shown: list[float] = []

    class Bar:
        def __init__(self, iterable, **kwargs):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix(self, **kw):
            if "lr" in kw:
                shown.append(float(kw["lr"]))

        def close(self):
            pass

        @staticmethod
        def write(*args, **kwargs):
            pass

    monkeypatch.setattr(train_module, "tqdm", Bar)
    cfg = TrainConfig(net="tiny", dataset="synthetic", epochs=2, batch_size=256, lr=0.05, device="cpu",
                      progress=True, channels_last=False, aug_copies=1, ema_decay=0.0, cutout=0)
    torch.manual_seed(0)
    fit(build("tiny", num_classes=4), splits, cfg)
    assert shown and all(0 < lr <= 0.05 * 1.001 for lr in shown)  # never the next step's (negative) rate
