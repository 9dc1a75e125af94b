"""Issue 14, case 4 (numbers): no NaN/inf leaves a function as a result, none is saved, none is loaded."""

import math

import pytest
import torch

from pruning_env.cli.prune import main as prune_main
from pruning_env.core import checkpoint as ckpt
from pruning_env.core.data import load_splits
from pruning_env.core.evaluation import NonFiniteError, evaluate
from pruning_env.core.models import build
from pruning_env.training.finetune import FinetuneConfig, finetune
from pruning_env.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def splits():
    return load_splits("synthetic")


def _nan_model(splits):
    model = build("tiny", num_classes=splits.num_classes)
    with torch.no_grad():
        next(model.parameters()).fill_(math.nan)
    return model


def test_evaluate_refuses_nan_logits_instead_of_counting_class_0(splits):
    with pytest.raises(NonFiniteError, match="non-finite outputs"):
        evaluate(_nan_model(splits), splits.test, mean=splits.mean, std=splits.std)


def test_nan_weights_are_neither_saved_nor_loaded(splits, tmp_path):
    model = _nan_model(splits)
    with pytest.raises(ckpt.CheckpointError, match="NaN/inf"):
        ckpt.save(tmp_path / "m.pt", model, input_shape=splits.input_shape)
    assert not (tmp_path / "m.pt").exists()
    good = build("tiny", num_classes=splits.num_classes)
    ckpt.save(tmp_path / "m.pt", good, input_shape=splits.input_shape, dataset="synthetic")
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    first = next(iter(blob["state_dict"]))
    blob["state_dict"][first] = torch.full_like(blob["state_dict"][first], math.nan)
    torch.save(blob, tmp_path / "nan.pt")
    with pytest.raises(ckpt.CheckpointError, match=f"NaN/inf values in {first}"):
        ckpt.load(tmp_path / "nan.pt")


def test_prune_refuses_a_checkpoint_with_nan_weights(splits, tmp_path, capsys):
    good = build("tiny", num_classes=splits.num_classes)
    ckpt.save(tmp_path / "m.pt", good, input_shape=splits.input_shape, dataset="synthetic")
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    for k, v in blob["state_dict"].items():
        if v.dtype.is_floating_point:
            blob["state_dict"][k] = torch.full_like(v, math.nan)
    torch.save(blob, tmp_path / "nan.pt")
    with pytest.raises(SystemExit) as exc:
        prune_main(["--checkpoint", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "p.pt"), "--criterion", "l1",
                    "--no-progress", "--device", "cpu", "--latency-repeats", "0"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "NaN/inf" in err and "Traceback" not in err
    assert not (tmp_path / "p.pt").exists()


def test_a_diverging_training_stops_with_a_clear_error_and_saves_nothing(tmp_path):
    out = tmp_path / "b.pt"
    with pytest.raises(NonFiniteError, match=r"loss became (nan|inf).*lower --lr"):
        train(TrainConfig(net="tiny", dataset="synthetic", epochs=1, batch_size=64, lr=1e30, out=str(out),
                          progress=False, device="cpu", aug_copies=1, ema_decay=0.0))
    assert not out.exists()


def test_a_diverging_finetuning_stops_with_a_clear_error(splits, tmp_path):
    model = build("tiny", num_classes=splits.num_classes)
    with pytest.raises(NonFiniteError, match="lower --finetune-lr"):
        finetune(model, splits, FinetuneConfig(epochs=1, lr=1e30, kd=False, progress=False, device="cpu",
                                               optimizer="sgd", batch_size=64), out=tmp_path / "f.pt")
    assert not (tmp_path / "f.pt").exists()


def test_finalize_refuses_a_baseline_with_zero_test_accuracy():
    """Retention = final / baseline test accuracy: undefined for a 0 % baseline, so refused, never NaN."""
    import torch
    from torch import nn

    from pruning_env.core.data import load_splits
    from pruning_env.training.finalize import finalize

    class Wrong(nn.Module):  # always predicts class 1, which no test image has (below)
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x).mean((2, 3))
            return self.fc(h) * 0 + torch.tensor([0.0, 1.0, 0.0, 0.0])

    import dataclasses

    from pruning_env.core.data import Split

    splits = load_splits("synthetic")  # 4 classes; every test image relabelled class 0
    test = splits.test
    splits = dataclasses.replace(splits, test=Split(test.images, torch.zeros_like(test.labels)))
    with pytest.raises(ValueError, match="0 % test accuracy"):
        finalize(Wrong().eval(), splits, model=Wrong().eval())
