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


# Issue 25, section 1, case 4: a model whose output does not fit the data set's classes is refused, in the env, in
# prune and in finalize (one rule: pruning_env.core.models.check_classes).

def test_a_ten_class_model_on_a_four_class_data_set_makes_no_env(splits):
    assert splits.num_classes == 4
    with pytest.raises(ValueError, match="has 10 outputs but the data set has 4 classes"):
        FilterPruningEnv(build("tiny", num_classes=10).eval(), splits, kl="fisher", calib_size=16, eval_size=32)


def test_finalize_refuses_a_model_of_other_classes(splits):
    with pytest.raises(ValueError, match="the unpruned network has 10 outputs but the data set has 4 classes"):
        finalize(build("tiny", num_classes=10), splits, model=build("tiny", num_classes=10))
    with pytest.raises(ValueError, match="the pruned network has 3 outputs but the data set has 4 classes"):
        finalize(build("tiny", num_classes=4), splits, model=build("tiny", num_classes=3))


def test_prune_refuses_a_checkpoint_of_other_classes(tmp_path, capsys):
    from pruning_env.cli.prune import main as prune_main
    from pruning_env.core import checkpoint as ckpt

    path = tmp_path / "ten.pt"
    ckpt.save(path, build("tiny", num_classes=10), input_shape=(3, 32, 32), dataset="synthetic")  # no class names
    with pytest.raises(SystemExit) as exc:
        prune_main(["--checkpoint", str(path), "--out", str(tmp_path / "p.pt"), "--criterion", "l1",
                    "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "has 10 outputs but the data set has 4 classes" in err, err
    assert not (tmp_path / "p.pt").exists()


def test_the_classes_check_leaves_the_model_as_it_was(splits):
    from pruning_env.core.models import check_classes

    model = build("tiny", num_classes=4).train()
    next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).eval()  # a mixed state survives too
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_classes(model, splits.input_shape, 4)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"cannot run on the data set's images of shape \[3, 4, 4\]"):
        check_classes(model, (3, 4, 4), 4)
