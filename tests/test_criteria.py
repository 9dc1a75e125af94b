"""pruning_env.criteria: every criterion's shape, values, determinism and conventions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_env import criteria
from pruning_env.core import data, models
from pruning_env.criteria import (
    CRITERIA,
    DIRECTIONS,
    apply_direction,
    compute_components,
    fuse,
    list_criteria,
    prune_first,
    score,
)


@pytest.fixture(scope="module")
def batch():
    ds = data.make_synthetic(num_classes=10, n_train=16, n_test=8, seed=1)
    splits_mean, splits_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    x, y = next(data.batches(ds.train, 16, mean=splits_mean, std=splits_std))
    return x, y


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    return models.build("vgg11", num_classes=10, width=0.125)


def _conv_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


OPTIONS = {"random": {"seed": 3}, "dsfp": {"direction": "low"}, "kl": {"kl": "exact"}}


@pytest.mark.parametrize("criterion", CRITERIA)
def test_keys_lengths_finite(vgg, batch, criterion):
    x, y = batch
    s = score(vgg, x, y, criterion, **OPTIONS.get(criterion, {}))
    assert list(s) == _conv_names(vgg)
    for name, v in s.items():
        conv = vgg.get_submodule(name)
        assert v.shape == (conv.out_channels,) and v.dtype == torch.float32 and v.device.type == "cpu"
        assert torch.isfinite(v).all(), (criterion, name)
    if criterion not in ("dsfp", "random"):
        assert all((v >= 0).all() for v in s.values())


@pytest.mark.parametrize("criterion", CRITERIA)
def test_deterministic(vgg, batch, criterion):
    x, y = batch
    opts = {**OPTIONS.get(criterion, {})}
    if criterion in ("kl", "dsfp"):
        opts["kl"] = "linear"  # exact is covered in test_criteria_kl; this keeps the test fast
    a = score(vgg, x, y, criterion, **opts)
    b = score(vgg, x, y, criterion, **opts)
    for name in a:
        assert torch.equal(a[name], b[name]), (criterion, name)


def test_list_criteria_and_unknown():
    assert list_criteria() == list(CRITERIA)
    assert {"grad", "taylor", "kl", "dsfp", "l1", "l2", "taylor_fo", "fpgm", "random"} <= set(CRITERIA)
    with pytest.raises(ValueError, match="valid criteria: grad, taylor, kl"):
        score(nn.Conv2d(3, 4, 3), None, None, "l3")


def _tiny_model() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 3, 2, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1), nn.Flatten(), nn.LazyLinear(2)
    )
    model(torch.zeros(1, 1, 3, 3))  # materialise the lazy layer
    with torch.no_grad():
        filters = [[[1.0, -2.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, -4.0]], [[1.0, 1.0], [1.0, 1.0]]]
        model[0].weight.copy_(torch.tensor(filters).unsqueeze(1))
        model[3].weight.copy_(torch.tensor([[[[1.0]], [[2.0]], [[2.0]]], [[[0.0]], [[0.0]], [[-1.0]]]]))
    return model


def test_weight_criteria_by_hand():
    model = _tiny_model()
    l1 = score(model, None, None, "l1")
    l2 = score(model, None, None, "l2")
    fp = score(model, None, None, "fpgm")
    assert torch.allclose(l1["0"], torch.tensor([5.0, 7.0, 4.0]))
    assert torch.allclose(l2["0"], torch.tensor([3.0, 5.0, 2.0]))
    assert torch.allclose(l1["3"], torch.tensor([5.0, 1.0])) and torch.allclose(l2["3"], torch.tensor([3.0, 1.0]))
    # FPGM: sum of Euclidean distances to the other filters of the layer.
    w = [torch.tensor(v) for v in ([1.0, -2.0, 0.0, 2.0], [3.0, 0.0, 0.0, -4.0], [1.0, 1.0, 1.0, 1.0])]
    d = [[float((a - b).norm()) for b in w] for a in w]
    assert torch.allclose(fp["0"], torch.tensor([sum(r) for r in d]))
    assert torch.allclose(fp["3"], torch.full((2,), math.sqrt(1 + 4 + 9)))  # |(1, 2, 2) - (0, 0, -1)|


def test_grad_taylor_match_manual_backward(vgg, batch):
    x, y = batch
    comps = compute_components(vgg, x, y, kl=None)
    assert comps.kl is None and comps.kl_mode is None
    ref = models.build("vgg11", num_classes=10, width=0.125)
    ref.load_state_dict(vgg.state_dict())
    ref.eval()
    for m in ref.modules():  # BN batch statistics, dropout off
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    F.cross_entropy(ref(x), y).backward()
    for name in _conv_names(vgg):
        w = ref.get_submodule(name).weight
        assert torch.allclose(comps.grad[name], w.grad.abs().flatten(1).mean(1), rtol=1e-5, atol=0)
        assert torch.allclose(comps.taylor[name], (w * w.grad).abs().flatten(1).mean(1), rtol=1e-5, atol=0)
    assert torch.equal(score(vgg, x, y, "grad")[name], comps.grad[name])


def test_taylor_fo_gate_after_batchnorm(batch):
    x, y = batch
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 10),
    )  # fmt: skip
    s = score(model, x, y, "taylor_fo")["0"]
    feats = model[1](model[0](x))  # train-mode BN: batch statistics, as in the criterion
    feats.retain_grad()
    F.cross_entropy(model[5](model[4](model[3](model[2](feats)))), y).backward()
    per_example = x.shape[0] * (feats * feats.grad).sum((2, 3))  # gradient of each example's own loss
    assert torch.allclose(s, per_example.pow(2).mean(0).float(), rtol=1e-4)


def test_fuse_by_hand():
    grad = {"a": torch.tensor([0.0, 1.0, 2.0])}
    taylor = {"a": torch.tensor([2.0, 1.0, 0.0])}
    kl = {"a": torch.tensor([5.0, 5.0, 5.0])}  # constant layer -> zeros, no NaN
    out = fuse(grad, taylor, kl)["a"]
    # g = [0, .5, 1], t = [1, .5, 0], k = 0: |g-t| + |t-k| + .5|g-k| = [2, .75, 1.5]
    assert torch.allclose(out, torch.exp(torch.tensor([2.0, 0.75, 1.5])))
    with pytest.raises(ValueError, match="same layers"):
        fuse(grad, taylor, {"b": torch.zeros(3)})
    with pytest.raises(ValueError, match="lengths"):
        fuse(grad, taylor, {"a": torch.zeros(2)})


def test_dsfp_direction_semantics(vgg, batch):
    x, y = batch
    low = score(vgg, x, y, "dsfp", direction="low", kl="linear")
    high = score(vgg, x, y, "dsfp", direction="high", kl="linear")
    comps = compute_components(vgg, x, y, kl="linear")
    fused = fuse(comps.grad, comps.taylor, comps.kl)
    for name in low:
        assert torch.equal(low[name], fused[name])
        assert torch.equal(high[name], -fused[name])
        # "low" prunes the lowest fused scores first, "high" the highest.
        assert prune_first(low)[name][0] == torch.argmin(fused[name])
        assert fused[name][prune_first(high)[name][0]] == fused[name].max()
    with pytest.raises(ValueError, match="explicit direction"):
        score(vgg, x, y, "dsfp")
    with pytest.raises(ValueError, match="explicit direction"):
        score(vgg, x, y, "dsfp", direction="up")


def test_apply_direction_is_the_dsfp_criterions_sign(vgg, batch):
    x, y = batch
    comps = compute_components(vgg, x, y, kl="linear")
    fused = fuse(comps.grad, comps.taylor, comps.kl)
    for direction in DIRECTIONS:
        ref = score(vgg, x, y, "dsfp", direction=direction, kl="linear")
        got = apply_direction(fused, direction)
        assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in ref)
    assert apply_direction(fused, "low") is not fused  # a new dict: the caller's stays as it was
    with pytest.raises(ValueError, match="explicit direction"):
        apply_direction(fused, "up")


def test_prune_first_stable_ties():
    order = prune_first({"a": torch.tensor([0.5, 0.1, 0.5, 0.1, 0.0])})["a"]
    assert order.tolist() == [4, 1, 3, 0, 2] and order.dtype == torch.int64
    with pytest.raises(ValueError, match="NaN"):
        prune_first({"a": torch.tensor([0.0, float("nan")])})


def test_random_is_seeded(vgg):
    a = score(vgg, None, None, "random", seed=1)
    b = score(vgg, None, None, "random", seed=1)
    c = score(vgg, None, None, "random", seed=2)
    d = score(vgg, None, None, "random")  # default seed 0
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(not torch.equal(a[n], c[n]) for n in a)
    assert all(torch.equal(d[n], score(vgg, None, None, "random", seed=0)[n]) for n in a)
    last = _conv_names(vgg)[-1]
    assert torch.equal(score(vgg, None, None, "random", seed=1, layers=[last])[last], a[last])
    assert all(((v >= 0) & (v < 1)).all() for v in a.values())


def test_layers_restricts(vgg, batch):
    x, y = batch
    names = _conv_names(vgg)
    s = score(vgg, x, y, "taylor", layers=[names[2], names[0]])
    assert list(s) == [names[0], names[2]]
    assert torch.equal(s[names[0]], score(vgg, x, y, "taylor")[names[0]])


def test_input_validation(vgg, batch):
    x, y = batch
    with pytest.raises(ValueError, match="empty batch"):
        score(vgg, x[:0], y[:0], "grad")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        score(vgg, x[0], y, "grad")
    with pytest.raises(ValueError, match="labels must have shape"):
        score(vgg, x, y[:3], "grad")
    with pytest.raises(ValueError, match="num_classes = 10"):
        score(vgg, x, torch.full_like(y, 10), "grad")
    with pytest.raises(ValueError, match=">= 0"):
        score(vgg, x, torch.full_like(y, -1), "taylor")
    with pytest.raises(ValueError, match="integer class indices"):
        score(vgg, x, y.float(), "grad")
    with pytest.raises(ValueError, match="needs labels"):
        score(vgg, x, None, "taylor_fo")
    with pytest.raises(ValueError, match="float"):
        score(vgg, (x * 100).to(torch.uint8), y, "grad")
    with pytest.raises(ValueError, match="NaN"):
        score(vgg, x.clone().fill_(float("nan")), y, "grad")
    with pytest.raises(ValueError, match="model failed on images of shape"):
        score(vgg, x[:, :1], y, "grad")
    with pytest.raises(ValueError, match=r"not conv layers.*'nope'.*Conv layers: features.0"):
        score(vgg, x, y, "grad", layers=["nope"])
    with pytest.raises(ValueError, match=r"not nn.Conv2d"):
        score(vgg, x, y, "grad", layers=["features.1"])
    with pytest.raises(ValueError, match="layers is empty"):
        score(vgg, x, y, "grad", layers=[])
    # seed is accepted by every criterion now (tests/test_criteria_registry.py); kl is l1's unknown option
    with pytest.raises(TypeError, match=r"unexpected option.*kl"):
        score(vgg, x, y, "l1", kl="exact")
    with pytest.raises(ValueError, match="unknown KL mode 'fast'; valid modes: exact, exact_loop, fisher"):
        score(vgg, x, y, "kl", kl="fast")
    with pytest.raises(ValueError, match="kl_batch_size"):
        score(vgg, x, y, "kl", kl_batch_size=0)
    with pytest.raises(ValueError, match=r"no nn.Conv2d"):
        score(nn.Linear(2, 2), x, y, "grad")


def test_works_in_float64(batch):
    x, y = batch
    torch.manual_seed(0)
    model = models.build("resnet20", num_classes=10, width=0.25).double()
    for criterion in ("grad", "taylor_fo", "kl"):
        s = score(model, x, y, criterion, **({"kl": "exact", "kl_batch_size": 4} if criterion == "kl" else {}))
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in s.values())
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_components_match_score(vgg, batch):
    x, y = batch
    comps = compute_components(vgg, x, y, kl="fisher", kl_batch_size=8)
    kl = score(vgg, x, y, "kl", kl="fisher", kl_batch_size=8)
    assert comps.kl_mode == "fisher"
    assert all(torch.equal(comps.kl[n], kl[n]) for n in kl)
    assert set(comps.grad) == set(comps.taylor) == set(kl) == set(criteria.score(vgg, None, None, "l1"))
