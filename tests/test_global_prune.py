"""Torch-Pruning's iterative global magnitude pruning rebuilt by the engine (pruning_env.engine.global_prune):
the same filters as Torch-Pruning itself, the group importance by hand, and the budget."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pruning_env.core.models import build
from pruning_env.engine.flops import count
from pruning_env.engine.global_prune import group_magnitude, iterative_global_plan
from pruning_env.engine.graph import prunable_layers
from pruning_env.engine.macs import MacsModel
from pruning_env.engine.plan import PruningPlan
from pruning_env.engine.surgery import apply

SHAPE = (3, 32, 32)


def _net(name: str, width: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = build(name, num_classes=10, in_channels=3, width=width).eval()
    for m in net.modules():  # BN scales that differ, as in a trained network
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 1.5)
    return net


def _torch_pruning(net: nn.Module, names: list[str], target: float, max_rate: float, steps: int) -> nn.Module:
    tp = pytest.importorskip("torch_pruning")
    model = copy.deepcopy(net)
    ignored = [m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in names]
    pruner = tp.pruner.MagnitudePruner(model, example_inputs=torch.zeros(1, *SHAPE),
                                       importance=tp.importance.MagnitudeImportance(p=1), global_pruning=True,
                                       pruning_ratio=max_rate, max_pruning_ratio=max_rate, iterative_steps=steps,
                                       ignored_layers=ignored)
    base = count(net, SHAPE).macs
    for _ in range(steps):
        pruner.step()
        if count(model, SHAPE).macs / base <= target:
            break
    return model


@pytest.mark.parametrize(("target", "seed"), [(0.5, 0), (0.2, 1)])
def test_the_same_filters_as_torch_pruning(target, seed):
    net = _net("vgg16", 0.25, seed)
    layers = prunable_layers(net, SHAPE)
    names = [layer.name for layer in layers]
    macs = MacsModel.from_model(net, SHAPE, layers=layers)
    theirs = _torch_pruning(net, names, target, 0.9, 200)
    plan = iterative_global_plan(net, layers, macs, target * macs.base_macs, max_rate=0.9, give_back=False)
    ours = apply(net, plan, SHAPE, layers=layers)
    for name in names:  # the same kept filters: every pruned tensor is the same
        assert torch.equal(ours.get_submodule(name).weight, theirs.get_submodule(name).weight), name
    # given back: within the budget, never fewer filters, and closer to the budget
    back = iterative_global_plan(net, layers, macs, target * macs.base_macs, max_rate=0.9)
    m_back, m_tp = macs.predict_plan(back)[0], macs.predict_plan(plan)[0]
    assert m_tp <= m_back <= target * macs.base_macs
    assert all(back.keep_count(n) >= plan.keep_count(n) and set(plan.keep[n]) <= set(back.keep[n]) for n in names)


def test_group_magnitude_by_hand():
    net = _net("vgg16", 0.125)
    layers = prunable_layers(net, SHAPE)
    first, second = layers[0], layers[1]
    scores = group_magnitude(net, layers)
    conv, bn, nxt = (net.get_submodule(n) for n in (first.name, first.bn, second.name))
    expected = (conv.weight.abs().sum((1, 2, 3)) + bn.weight.abs() + nxt.weight.abs().sum((0, 2, 3))) / 3
    assert torch.allclose(scores[first.name], expected.detach())
    # on a plan: the kept rows and columns only
    keep = {lay.name: list(range(lay.out_channels)) for lay in layers}
    keep[first.name], keep[second.name] = [0, 2, 3], [1, 4]
    plan = PruningPlan(keep, {lay.name: lay.out_channels for lay in layers})
    on_plan = group_magnitude(net, layers, plan)
    w1, w2 = conv.weight.detach()[[0, 2, 3]], nxt.weight.detach()[[1, 4]][:, [0, 2, 3]]
    assert torch.allclose(on_plan[first.name], (w1.abs().sum((1, 2, 3)) + bn.weight.detach()[[0, 2, 3]].abs()
                                                + w2.abs().sum((0, 2, 3))) / 3)
    last = layers[-1]  # its consumer is the classifier's Linear
    assert on_plan[last.name].shape == (last.out_channels,)


@pytest.mark.parametrize("name", ["resnet56", "alexnet"])
def test_every_architecture_reaches_the_budget(name):
    net = _net(name, 0.25)
    layers = prunable_layers(net, SHAPE)
    macs = MacsModel.from_model(net, SHAPE, layers=layers)
    for target in (0.6, 0.3):
        plan = iterative_global_plan(net, layers, macs, target * macs.base_macs, max_rate=0.9, steps=50)
        assert macs.predict_plan(plan)[0] <= target * macs.base_macs
        assert all(plan.keep_count(lay.name) >= 1 for lay in layers)


def test_bad_settings_are_refused():
    net = _net("vgg16", 0.125)
    layers = prunable_layers(net, SHAPE)
    macs = MacsModel.from_model(net, SHAPE, layers=layers)
    with pytest.raises(ValueError, match="max_rate"):
        iterative_global_plan(net, layers, macs, 0.5 * macs.base_macs, max_rate=1.0)


def test_round_to_leaves_multiples_and_an_unreachable_budget_is_named():
    net = _net("vgg16", 0.25)
    layers = prunable_layers(net, SHAPE)
    macs = MacsModel.from_model(net, SHAPE, layers=layers)
    plan = iterative_global_plan(net, layers, macs, 0.4 * macs.base_macs, max_rate=0.9, round_to=4)
    assert macs.predict_plan(plan)[0] <= 0.4 * macs.base_macs
    assert all(plan.keep_count(lay.name) % 4 == 0 for lay in layers)
    with pytest.raises(ValueError, match="above the budget"):
        iterative_global_plan(net, layers, macs, 0.001 * macs.base_macs, max_rate=0.5, steps=20)
