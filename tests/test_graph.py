"""Prunable-layer discovery (pruning_env.engine.graph) on built-in and user-defined models."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_env.core.fx import probe_forward
from pruning_env.core.models import build
from pruning_env.engine.graph import GraphError, consumer_map, prunable_layers


@pytest.mark.parametrize("arch, expected", [("vgg16", 13), ("vgg11", 8), ("alexnet", 5), ("resnet56", 27),
                                            ("resnet20", 9)])
def test_number_of_prunable_layers_of_built_in_nets(arch, expected):
    model = build(arch, num_classes=10, width=0.25)
    layers = prunable_layers(model)
    assert len(layers) == expected
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    names = [layer.name for layer in layers]
    assert names == [n for n in convs if n in names]  # forward order = definition order here
    if arch.startswith("resnet"):
        assert all(n.endswith(".conv1") and n.startswith("layer") for n in names)  # block-internal only
        assert all(layer.consumers == [(layer.name[:-1] + "2", 1)] for layer in layers)
        assert all(layer.bn == layer.name[:-5] + "bn1" for layer in layers)


def test_static_facts_of_vgg16_and_alexnet():
    vgg = prunable_layers(build("vgg16", num_classes=10))
    first, last = vgg[0], vgg[-1]
    assert (first.name, first.bn, first.consumers) == ("features.0", "features.1", [("features.3", 1)])
    assert (first.in_channels, first.out_channels, first.kernel_size, first.stride, first.out_hw) == \
        (3, 64, (3, 3), (1, 1), (32, 32))
    assert last.consumers == [("classifier.1", 1)] and last.out_hw == (2, 2)
    alex = prunable_layers(build("alexnet", num_classes=10, width=0.25))
    assert alex[-1].consumers == [("classifier.1", 16)]  # 4x4 adaptive pool: 16 features per channel
    assert alex[2].out_hw == (8, 8)
    assert consumer_map(alex)["classifier.1"] == (alex[-1].name, 16)


def test_model_is_not_modified_and_mode_restored():
    model = build("vgg11", num_classes=10, width=0.25).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prunable_layers(model)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class UserNet(nn.Module):
    """A user's model exercising the rules: functional flatten via view, branches, concat, sharing."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)  # no BN, bias: prunable into two branch convs
        self.a = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(8, 6, 1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)  # depthwise: consumer not allowed
        self.c = nn.Conv2d(12, 10, 3, stride=2, padding=1)
        self.d = nn.Conv2d(10, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 7)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.bn_a(self.a(x))), self.b(x)], dim=1)  # cat: a and b not prunable
        y = self.dw(y)  # dw not prunable (grouped)
        y = F.max_pool2d(F.relu(self.c(y)) * 0.5, 2)  # c -> d: prunable through scalar mul + pool
        y = F.adaptive_avg_pool2d(torch.sigmoid(self.d(y)), 4)
        return self.fc(y.view(y.size(0), -1))  # d -> fc, block 16


def test_user_defined_model():
    layers = {layer.name: layer for layer in prunable_layers(UserNet())}
    assert list(layers) == ["stem", "c", "d"]
    assert layers["stem"].bn is None and sorted(layers["stem"].consumers) == [("a", 1), ("b", 1)]
    assert layers["c"].consumers == [("d", 1)] and layers["c"].out_hw == (16, 16) and layers["c"].stride == (2, 2)
    assert layers["d"].consumers == [("fc", 16)]


class ReachesOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        features = self.conv(x)
        return self.head(features), features  # the conv's channels are an output: not prunable


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.shared(self.shared(self.first(x)))  # called twice: neither it nor its producer is prunable
        return self.fc(torch.flatten(self.pool(x), 1))


def test_outputs_and_shared_modules_are_not_prunable():
    assert prunable_layers(ReachesOutput()) == []
    assert prunable_layers(SharedConv()) == []


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return x


def test_untraceable_model_gives_a_clear_error():
    with pytest.raises(GraphError, match=r"torch.fx"):
        prunable_layers(Untraceable())


def test_wrong_input_shape_gives_a_clear_error():
    with pytest.raises(GraphError, match="does not accept"):
        prunable_layers(build("vgg11", num_classes=10, width=0.25), (1, 32, 32))


def test_probe_forward_runs_in_eval_mode_and_restores_every_mode_even_on_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout()).double().train()
    model[1].eval()  # a mixed state survives too
    modes = [m.training for m in model.modules()]
    seen = []

    def run(x):
        seen.append((x.shape, x.dtype, torch.is_grad_enabled(), any(m.training for m in model.modules())))
        return model(x)

    out = probe_forward(model, (2, 3, 8, 8), run=run)
    assert seen == [((2, 3, 8, 8), torch.float64, False, False)] and out.shape == (2, 4, 6, 6)
    assert torch.equal(probe_forward(model, torch.ones(1, 3, 8, 8)), model.eval()(torch.ones(1, 3, 8, 8).double()))
    model.train()
    model[1].eval()
    with pytest.raises(RuntimeError):
        probe_forward(model, (1, 1, 8, 8))  # wrong channels
    assert [m.training for m in model.modules()] == modes
    prunable_layers(nn.Sequential(model[0], model[1], nn.ReLU(), nn.Conv2d(4, 2, 1).double()), (3, 8, 8))
    assert [m.training for m in model.modules()] == modes
