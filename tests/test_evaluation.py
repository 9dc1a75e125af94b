"""Accuracy measurement: plain top-1, subsets, and the flip test-time augmentation."""

import pytest
import torch
from torch import nn

from pruning_env.core.data import Split
from pruning_env.core.evaluation import evaluate, measure_latency


class _LeftHalf(nn.Module):
    """Predicts class 1 when the left half of the image is brighter than the right, else class 0.

    Its logits are +-(left - right) mean intensity, so mirroring an image swaps its prediction
    and the mean softmax of an image and its mirror is exactly uniform (argmax: class 0).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1] // 2
        d = x[..., :w].mean((1, 2, 3)) - x[..., w:].mean((1, 2, 3))
        return torch.stack([-d, d], 1)


def _split() -> Split:
    imgs = torch.zeros(6, 1, 8, 8, dtype=torch.uint8)
    imgs[:3, :, :, :4] = 200  # left bright: class 1
    imgs[3:, :, :, 4:] = 200  # right bright: class 0
    return Split(imgs, torch.tensor([1, 1, 1, 0, 0, 0]))


def test_plain_accuracy_subset_and_flip_tta():
    model, split = _LeftHalf(), _split()
    assert evaluate(model, split, mean=(0.0,), std=(1.0,)) == 100.0
    assert evaluate(model, split, mean=(0.0,), std=(1.0,), limit=3) == 100.0
    # mirrored evidence cancels: the TTA prediction is the tie -> class 0, right for half the images
    assert evaluate(model, split, mean=(0.0,), std=(1.0,), flip_tta=True) == 50.0


class _Symmetrised(nn.Module):
    """``inner(x) + inner(mirror(x))``: a mirror-invariant network."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.inner(x.flip(3))


def test_flip_tta_equals_plain_accuracy_for_a_mirror_invariant_model():
    torch.manual_seed(0)
    model = _Symmetrised()
    split = Split(torch.randint(0, 255, (60, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 3, (60,)))
    plain = evaluate(model, split, mean=(0.5,), std=(0.25,), batch_size=7)
    assert evaluate(model, split, mean=(0.5,), std=(0.25,), flip_tta=True) == plain
    assert evaluate(model.inner, split, mean=(0.5,), std=(0.25,), flip_tta=True) != evaluate(
        model.inner, split, mean=(0.5,), std=(0.25,))  # the asymmetric part alone does change


def test_empty_split_and_latency():
    with pytest.raises(ValueError, match="empty split"):
        evaluate(_LeftHalf(), _split().subset(0), mean=(0.0,), std=(1.0,))
    ms = measure_latency(nn.Conv2d(3, 4, 3), (3, 16, 16), repeats=3, warmup=1)
    assert ms > 0.0
