"""The KL sensitivity: the batched "exact" mode equals the one-forward-per-filter loop."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from pruning_env.core import models
from pruning_env.criteria import KL_MODES, score


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers trained-looking statistics, so that removing a filter matters
    and some channels are switched off by the ReLU (exercises the zero-change shortcut)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.5 * torch.randn(c, generator=gen))
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        last.weight.mul_(10.0)  # confident logits, so KLs are far from rounding level
    return model


def _images(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_same(loop: dict, batched: dict) -> None:
    assert list(loop) == list(batched)
    for name in loop:
        a, b = loop[name].double(), batched[name].double()
        assert torch.allclose(b, a, rtol=1e-3, atol=1e-9), (name, (a - b).abs().max())
        if a.numel() > 2 and a.std() > 0:
            assert spearmanr(a, b)[0] >= 0.999, name


@pytest.mark.parametrize(
    "arch, width, layers",
    [
        ("vgg16", 0.125, ["features.0", "features.10", "features.24", "features.40"]),
        ("alexnet", 0.125, None),
        ("resnet20", 0.25, None),  # residual additions and option-A (zero-pad) shortcuts
    ],
)
def test_batched_exact_equals_loop(arch, width, layers):
    torch.manual_seed(0)
    model = _randomise_bn(models.build(arch, num_classes=10, width=width)).eval()
    x = _images()
    loop = score(model, x, None, "kl", kl="exact_loop", layers=layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the loop may happen here
        batched = score(model, x, None, "kl", kl="exact", layers=layers)
        chunked = score(model, x, None, "kl", kl="exact", layers=layers, kl_chunk_size=3, kl_verify=False)
    assert max(float(v.max()) for v in loop.values()) > 1e-4  # the check is not vacuous
    _assert_same(loop, batched)
    _assert_same(loop, chunked)


class _Custom(nn.Module):
    """Functional and in-place ops, a conv feeding a conv directly, a skip connection,
    ``view(x.size(0), -1)`` and a conv with a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.c = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        y = self.bn(self.b(h))
        y += h  # in-place residual
        y = F.max_pool2d(F.relu(y, inplace=True), 2).mul_(2.0)
        y = torch.sigmoid(self.c(y)) * 2.0
        return self.fc(y.view(y.size(0), -1))


class _DenseCat(nn.Module):
    """DenseNet-style concatenation and a global mean: convs feeding ``torch.cat``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        g = torch.relu(self.b(h))
        return self.fc(self.c(torch.cat([h, g], 1)).mean((2, 3)))


class _Untraceable(_Custom):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return super().forward(x)


class _BatchCoupled(_Custom):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = h - h.mean(0, keepdim=True)  # mixes examples: the batched suffix is invalid
        y = F.max_pool2d(F.relu(self.bn(self.b(h))), 2)
        return self.fc(torch.sigmoid(self.c(y)).flatten(1))


@pytest.mark.parametrize("cls", [_Custom, _DenseCat])
def test_custom_model_functional_ops(cls):
    torch.manual_seed(1)
    model = _randomise_bn(cls()).eval()
    x = _images(6, 16)
    loop = score(model, x, None, "kl", kl="exact_loop")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batched = score(model, x, None, "kl", kl="exact", kl_chunk_size=4)
    _assert_same(loop, batched)


def test_untraceable_model_falls_back_to_loop():
    torch.manual_seed(1)
    model = _randomise_bn(_Untraceable()).eval()
    x = _images(6, 16)
    with pytest.warns(UserWarning, match="cannot trace"):
        batched = score(model, x, None, "kl", kl="exact")
    _assert_same(score(model, x, None, "kl", kl="exact_loop"), batched)
    with pytest.warns(UserWarning, match="cannot trace"):
        linear = score(model, x, None, "kl", kl="linear")
    assert all(torch.isfinite(v).all() for v in linear.values())


def test_failed_verification_falls_back_to_loop():
    torch.manual_seed(2)
    model = _randomise_bn(_BatchCoupled()).eval()
    x = _images(6, 16)
    with pytest.warns(UserWarning, match="check against the loop failed"):
        batched = score(model, x, None, "kl", kl="exact", layers=["a"])
    _assert_same(score(model, x, None, "kl", kl="exact_loop", layers=["a"]), batched)


def test_kl_batch_size_uses_first_images():
    torch.manual_seed(0)
    model = _randomise_bn(models.build("resnet20", num_classes=10, width=0.25)).eval()
    x = _images(10)
    a = score(model, x, None, "kl", kl="exact", kl_batch_size=4)
    b = score(model, x[:4], None, "kl", kl="exact")
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("mode", [m for m in KL_MODES if m not in ("exact", "exact_loop")])
@pytest.mark.parametrize("arch", ["vgg11", "resnet20"])
def test_cheap_modes_finite_and_correlated(mode, arch):
    torch.manual_seed(0)
    model = _randomise_bn(models.build(arch, num_classes=10, width=0.25)).eval()
    x = _images(8)
    y = torch.arange(8) % 10
    exact = score(model, x, y, "kl", kl="exact")
    cheap = score(model, x, y, "kl", kl=mode)
    assert list(cheap) == list(exact)
    rhos = []
    for name, v in cheap.items():
        assert v.shape == exact[name].shape and torch.isfinite(v).all() and (v >= 0).all()
        rhos.append(spearmanr(v, exact[name])[0])
    # A loose sanity bound: these estimate the same quantity (the benchmark measures them properly).
    assert torch.tensor(rhos).median() > 0.5, rhos
