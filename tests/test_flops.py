import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pruning_env.core.models import build, list_models
from pruning_env.engine.flops import count


def _independent_conv_linear_macs(model: nn.Module, shape) -> int:
    """MACs of conv + linear layers as counted by torch's own aten-level FLOP counter."""
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.zeros(1, *shape))
    return fc.get_total_flops() // 2


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("width", [0.25, 1.0])
def test_counter_matches_torch_flop_counter(name, width):
    model = build(name, num_classes=10, width=width)
    report = count(model, (3, 32, 32))
    bn_macs = sum(v for k, v in report.per_layer_macs.items() if isinstance(model.get_submodule(k), nn.BatchNorm2d))
    assert report.macs - bn_macs == _independent_conv_linear_macs(model, (3, 32, 32))
    assert report.params == sum(p.numel() for p in model.parameters())
    assert report.flops == 2 * report.macs


def test_counter_on_irregular_widths_and_sizes():
    from pruning_env.core.models import ModelSpec, build_from_spec

    spec = ModelSpec("alexnet", 10, 1, (5, 7, 9, 3, 11), (13, 6))
    model = build_from_spec(spec)
    report = count(model, (1, 40, 40))
    bn = sum(v for k, v in report.per_layer_macs.items() if isinstance(model.get_submodule(k), nn.BatchNorm2d))
    assert report.macs - bn == _independent_conv_linear_macs(model, (1, 40, 40))


def test_counter_leaves_mode_and_rejects_bad_shapes():
    model = build("vgg11", num_classes=10, width=0.125).train()
    count(model, (3, 32, 32))
    assert model.training
    with pytest.raises(ValueError, match="input_shape"):
        count(model, (32, 32))
    with pytest.raises(ValueError, match="does not accept"):
        count(model, (1, 32, 32))
