"""The criteria registry (one class = one criterion), the universal ``seed`` keyword, and the
one channel-wise op table shared by the prunable-layer policy and the KL interpreter."""

from __future__ import annotations

import warnings
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_env.core import fx as opfx
from pruning_env.core import models
from pruning_env.criteria import (
    CRITERIA,
    Criterion,
    get_criterion,
    list_criteria,
    register_criterion,
    score,
    unregister_criterion,
)
from pruning_env.criteria.interpreter import Graph
from pruning_env.engine.graph import prunable_layers


@pytest.fixture(scope="module")
def vgg() -> nn.Module:
    torch.manual_seed(0)
    return models.build("vgg11", num_classes=10, width=0.125)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return x, torch.arange(6) % 10


@pytest.fixture
def weight_power():
    """A user criterion, defined in one class; unregistered afterwards so the registry of
    the other tests stays the built-in one."""

    @register_criterion("test_weight_power")
    class WeightPower(Criterion):
        """sum |W|^p over each filter's weights, plus the batch mean if asked to use data."""

        needs_data = False
        needs_labels = False
        options: ClassVar[dict[str, float]] = {"p": 1.0}

        def compute(self, model, images, labels, convs, *, seed):
            p = self.config["p"]
            return {name: conv.weight.detach().abs().pow(p).flatten(1).sum(1) for name, conv in convs.items()}

    yield WeightPower
    unregister_criterion("test_weight_power")


def test_user_criterion_usable_by_name(vgg, weight_power):
    assert "test_weight_power" in list_criteria() and list_criteria()[: len(CRITERIA)] == list(CRITERIA)
    assert get_criterion("test_weight_power") is weight_power and weight_power.name == "test_weight_power"
    l1 = score(vgg, None, None, "l1")
    s = score(vgg, None, None, "test_weight_power")  # default p = 1: the l1 criterion
    assert list(s) == list(l1) and all(torch.allclose(s[n], l1[n]) for n in s)
    s2 = score(vgg, None, None, "test_weight_power", p=2.0, seed=5, layers=["features.0"])
    w = vgg.get_submodule("features.0").weight.detach()
    assert list(s2) == ["features.0"] and torch.allclose(s2["features.0"], w.pow(2).flatten(1).sum(1))
    assert s2["features.0"].dtype == torch.float32 and s2["features.0"].device.type == "cpu"
    with pytest.raises(TypeError, match=r"'test_weight_power' got unexpected option\(s\) q; valid options: p"):
        score(vgg, None, None, "test_weight_power", q=1)


def test_registry_errors(vgg):
    with pytest.raises(ValueError, match=r"unknown criterion 'l3'; valid criteria: grad, taylor, kl, dsfp, l1"):
        score(vgg, None, None, "l3")
    with pytest.raises(ValueError, match=r"unknown criterion 'nope'; valid criteria: grad"):
        get_criterion("nope")
    with pytest.raises(TypeError, match=r"criterion 'l1' got unexpected option\(s\) direction; valid options: none"):
        score(vgg, None, None, "l1", direction="low")
    with pytest.raises(TypeError, match=r"'kl' got unexpected option\(s\) bogus; valid options: kl, kl_batch_size"):
        score(vgg, None, None, "kl", bogus=1)
    with pytest.raises(ValueError, match=r"seed must be an integer"):
        score(vgg, None, None, "random", seed=1.5)
    with pytest.raises(ValueError, match=r"'l1' is already registered"):
        register_criterion("l1")(type("Other", (Criterion,), {}))
    with pytest.raises(TypeError, match=r"decorates Criterion subclasses"):
        register_criterion("test_not_a_criterion")(int)
    with pytest.raises(ValueError, match=r"not registered"):
        unregister_criterion("test_never_registered")


def test_criterion_returning_wrong_layers_is_caught(vgg):
    @register_criterion("test_broken")
    class Broken(Criterion):
        needs_data = False

        def compute(self, model, images, labels, convs, *, seed):
            return {name: torch.zeros(conv.out_channels + (name == "features.0")) for name, conv in convs.items()}

    try:
        with pytest.raises(RuntimeError, match=r"returned 9 scores for layer 'features.0', which has 8 filters"):
            score(vgg, None, None, "test_broken")
    finally:
        unregister_criterion("test_broken")
    assert list_criteria() == list(CRITERIA)


_REQUIRED = {"dsfp": {"direction": "low", "kl": "linear"}, "kl": {"kl": "linear"}}


@pytest.mark.parametrize("criterion", CRITERIA)
def test_seed_is_accepted_by_every_criterion_and_used_only_by_random(vgg, batch, criterion):
    x, y = batch
    opts = _REQUIRED.get(criterion, {})
    a = score(vgg, x, y, criterion, seed=0, **opts)
    b = score(vgg, x, y, criterion, seed=1, **opts)
    default = score(vgg, x, y, criterion, **opts)
    uses_seed = get_criterion(criterion).uses_seed
    assert uses_seed == (criterion == "random")
    assert all(torch.equal(a[n], default[n]) for n in a)  # the default seed is 0
    if uses_seed:
        assert all(not torch.equal(a[n], b[n]) for n in a)
    else:
        assert all(torch.equal(a[n], b[n]) for n in a)


# ----------------------------------------------------------------------------- the shared op table


class _Resampling(nn.Module):
    """Convs joined by the entries the two consumers' tables used to disagree on:
    ``nn.Upsample``, ``clamp`` (function and method), ``F.interpolate``, ``nn.ZeroPad2d``,
    ``nn.LPPool2d`` and ``F.pad`` of the spatial dims."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(6)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.b = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.pad = nn.ZeroPad2d(1)
        self.c = nn.Conv2d(5, 4, 3)
        self.pool = nn.LPPool2d(2, 2)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.clamp(self.up(F.relu(self.bn_a(self.a(x)))), -1.0, 3.0)  # a -> b
        h = self.b(h).clamp(min=-0.5)  # b -> c
        h = self.pad(F.interpolate(torch.sigmoid(h), scale_factor=0.5, mode="bilinear", align_corners=False))
        h = self.pool(F.pad(F.elu(self.c(h)), (1, 1, 1, 1)))  # c -> fc
        return self.fc(torch.flatten(h, 1))


def _randomised(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
        model.fc.weight.mul_(10.0)  # confident logits: KLs far from rounding level
    return model.eval()


def _between_convs(model: nn.Module) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(node, its input) for every non-conv, non-BN op on a conv's way to the next layer."""
    gm = torch.fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        mod = modules.get(node.target) if node.op == "call_module" else None
        if node.op in ("placeholder", "output", "get_attr") or isinstance(mod, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            continue
        if node.target is torch.flatten:
            break
        pairs.append((node, node.args[0]))
    return pairs


def test_graph_policy_and_kl_interpreter_read_one_table():
    torch.manual_seed(0)
    model = _randomised(_Resampling())
    layers = prunable_layers(model, (3, 16, 16))
    assert [(layer.name, layer.bn, layer.consumers) for layer in layers] == [
        ("a", "bn_a", [("b", 1)]), ("b", None, [("c", 1)]), ("c", None, [("fc", 25)])]
    graph = Graph.trace(model)
    pairs = _between_convs(model)
    assert len(pairs) == 10  # relu, up, clamp, .clamp, sigmoid, interpolate, pad, elu, F.pad, pool
    for node, src in pairs:
        assert opfx.channelwise_kind(node, src, graph.modules) is not None, node.format_node()
        assert graph.channelwise(node, src), node.format_node()

    # float64, so that 1e-5 relative measures the method, not float32 rounding of small KLs
    model = model.double()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loop = score(model, x, None, "kl", kl="exact_loop")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batched, no fallback to the loop
        batched = score(model, x, None, "kl", kl="exact", kl_chunk_size=4)
    assert max(float(v.max()) for v in loop.values()) > 1e-3  # not vacuous
    for name in loop:
        assert torch.allclose(batched[name].double(), loop[name].double(), rtol=1e-5, atol=1e-9), name


def test_removing_a_table_entry_changes_both_consumers(monkeypatch):
    model = _randomised(_Resampling())
    up_node = next(n for n in torch.fx.symbolic_trace(model).graph.nodes if n.target == "up")
    graph = Graph.trace(model)
    assert graph.channelwise(up_node, up_node.args[0])
    monkeypatch.delitem(opfx.CHANNELWISE_MODULES, nn.Upsample)  # type: ignore[attr-defined]
    assert [layer.name for layer in prunable_layers(model, (3, 16, 16))] == ["b", "c"]  # a's channels escape
    assert not graph.channelwise(up_node, up_node.args[0])


def test_spatial_entries_need_nchw_and_their_requirements():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.c = nn.Conv2d(6, 2, 3, padding=1)
            self.fc = nn.Linear(2 * 8 * 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.b(F.relu(self.a(x)))
            h = F.pad(h, (0, 0, 0, 0, 1, 1))  # pads the channels: not channel-wise
            h = torch.flatten(self.c(h), 1)
            return self.fc(F.max_pool1d(h.unsqueeze(1), 1).squeeze(1))  # unknown ops after the flatten

    names = [layer.name for layer in prunable_layers(Net(), (3, 8, 8))]
    assert names == ["a"]  # b reaches a channel pad, c reaches unknown ops
