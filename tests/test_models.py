import pytest
import torch

from pruning_env.core.models import build, build_from_spec, channel_spec, list_models
from pruning_env.engine.flops import count


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("width", [0.125, 0.5])
def test_every_net_builds_and_runs(name, in_channels, width):
    model = build(name, num_classes=7, in_channels=in_channels, width=width).eval()
    out = model(torch.randn(2, in_channels, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["vgg16", "alexnet", "resnet20"])
def test_larger_inputs_are_accepted(name):
    model = build(name, num_classes=10, width=0.125).eval()
    assert model(torch.randn(1, 3, 64, 48)).shape == (1, 10)


def test_vgg16_matches_paper_counts():
    report = count(build("vgg16", num_classes=10), (3, 32, 32))
    assert report.macs == pytest.approx(313.46e6, rel=0.005)
    assert report.params == pytest.approx(14.99e6, rel=0.005)


def test_resnet56_has_expected_params():
    # He et al. (2016): ResNet-56 for CIFAR-10 has 0.85 M parameters.
    assert count(build("resnet56", num_classes=10), (3, 32, 32)).params == pytest.approx(0.85e6, rel=0.01)


@pytest.mark.parametrize("name", list_models())
def test_spec_round_trip(name):
    model = build(name, num_classes=10, width=0.25)
    spec = channel_spec(model)
    rebuilt = build_from_spec(spec)
    assert channel_spec(rebuilt) == spec
    rebuilt.load_state_dict(model.state_dict())


def test_bad_names_and_arguments_are_clear():
    with pytest.raises(ValueError, match="unknown network 'vgg17'.*vgg16"):
        build("vgg17", num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        build("vgg16", num_classes=1)
    with pytest.raises(ValueError, match="width"):
        build("vgg16", num_classes=10, width=0)
    with pytest.raises(ValueError, match="pruning_env.core.models"):
        channel_spec(torch.nn.Linear(2, 2))
