"""Physical surgery (pruning.apply) against zero-masking, flops.count and Torch-Pruning."""

import copy

import pytest
import torch
from test_graph import UserNet
from torch import nn

from pruning_env.core import checkpoint as ckpt
from pruning_env.core.models import build, channel_spec
from pruning_env.engine import flops
from pruning_env.engine.graph import prunable_layers
from pruning_env.engine.macs import MacsModel
from pruning_env.engine.plan import PlanError, PruningPlan, plan_uniform
from pruning_env.engine.surgery import apply

SHAPE = (3, 32, 32)


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give BatchNorm non-trivial statistics so that a wrong channel mapping shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


def _random_plan(layers, seed: int) -> PruningPlan:
    gen = torch.Generator().manual_seed(seed)
    keep, widths = {}, {}
    for i, layer in enumerate(layers):
        w = layer.out_channels
        k = [w, 1, int(torch.randint(1, w + 1, (1,), generator=gen))][(i + seed) % 3]  # full, single, random
        keep[layer.name] = torch.randperm(w, generator=gen)[:k]
        widths[layer.name] = w
    return PruningPlan(keep, widths)


def _masked_reference(model: nn.Module, layers, plan: PruningPlan) -> nn.Module:
    """The original with pruned filters zeroed AFTER BatchNorm (BN weight and bias = 0)."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for layer in layers:
            pruned = list(plan.pruned(layer.name)) if layer.name in plan.keep else []
            if not pruned:
                continue
            target = modules[layer.bn] if layer.bn else modules[layer.name]
            target.weight[pruned] = 0
            if target.bias is not None:
                target.bias[pruned] = 0
    return ref


def _check_equivalent(model, layers, plan, x):
    pruned = apply(model, plan, SHAPE, layers=layers)
    ref = _masked_reference(model, layers, plan)
    with torch.no_grad():
        out, expected = pruned(x), ref(x)
    scale = expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
    return pruned


@pytest.mark.parametrize("arch, width", [("vgg16", 0.25), ("alexnet", 0.25), ("resnet56", 0.5)])
def test_pruned_outputs_equal_masked_original_and_macs_are_predicted(arch, width):
    torch.manual_seed(0)
    model = _randomise_bn(build(arch, num_classes=10, width=width), seed=1)
    layers = prunable_layers(model, SHAPE)
    macs_model = MacsModel.from_model(model, SHAPE, layers=layers)
    assert (macs_model.base_macs, macs_model.base_params) == (flops.count(model, SHAPE).macs,
                                                              flops.count(model, SHAPE).params)
    x = torch.randn(4, *SHAPE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for seed in range(3):
        plan = _random_plan(layers, seed)
        pruned = _check_equivalent(model, layers, plan, x)
        report = flops.count(pruned, SHAPE)
        assert macs_model.predict(plan.keep_counts()) == (report.macs, report.params)
        assert macs_model.predict_plan(plan) == (report.macs, report.params)
        spec = channel_spec(pruned)
        assert pruned.arch == arch and spec.arch == arch
        assert not pruned.training  # mode kept
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the original is untouched


def test_full_width_vgg16_shapes_and_macs_reduction_at_rate_0_7():
    model = build("vgg16", num_classes=10)
    layers = prunable_layers(model, SHAPE)
    scores = {lay.name: torch.rand(lay.out_channels) for lay in layers}
    plan = plan_uniform(scores, 0.7)
    pruned = apply(model, plan, layers=layers)
    counts = plan.keep_counts()
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in pruned.modules() if isinstance(m, nn.BatchNorm2d)]
    for i, (layer, conv, bn) in enumerate(zip(layers, convs, bns)):
        k = counts[layer.name]
        c_in = 3 if i == 0 else counts[layers[i - 1].name]
        assert conv.weight.shape == (k, c_in, 3, 3) and (conv.out_channels, conv.in_channels) == (k, c_in)
        assert bn.weight.shape == bn.running_mean.shape == bn.running_var.shape == (k,) and bn.num_features == k
    fc = pruned.classifier[1]
    assert fc.weight.shape == (512, counts[layers[-1].name]) and fc.in_features == counts[layers[-1].name]
    assert pruned(torch.randn(2, *SHAPE)).shape == (2, 10)
    base, after = flops.count(model, SHAPE).macs, flops.count(pruned, SHAPE).macs
    assert 1 - after / base >= 0.90
    assert MacsModel.from_model(model, SHAPE, layers=layers).predict(counts)[0] == after


def test_pruned_model_shares_nothing_with_the_original():
    model = build("resnet20", num_classes=10, width=0.5)
    layers = prunable_layers(model)
    plan = _random_plan(layers, 0)
    pruned = apply(model, plan, layers=layers)
    original_ptrs = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    assert not any(t.data_ptr() in original_ptrs for t in list(pruned.parameters()) + list(pruned.buffers()))
    assert not any(a is b for a in model.modules() for b in pruned.modules())
    # training the pruned model does not touch the original
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned.train()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.1)
    pruned(torch.randn(4, *SHAPE)).sum().backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_pruned_models_round_trip_through_checkpoints(tmp_path):
    for arch in ("vgg11", "alexnet", "resnet20"):
        model = _randomise_bn(build(arch, num_classes=10, width=0.25), seed=2)
        layers = prunable_layers(model)
        plan = _random_plan(layers, 1)
        pruned = apply(model, plan, layers=layers)
        path = tmp_path / f"{arch}.pt"
        ckpt.save(path, pruned, input_shape=SHAPE, plan=plan.to_dict())
        loaded = ckpt.load(path)
        assert channel_spec(loaded.model) == channel_spec(pruned)
        assert PruningPlan.from_dict(loaded.plan) == plan
        x = torch.randn(2, *SHAPE)
        with torch.no_grad():
            torch.testing.assert_close(loaded.model.eval()(x), pruned.eval()(x))


def test_user_model_surgery():
    torch.manual_seed(0)
    model = UserNet().eval()
    layers = prunable_layers(model)
    # stem (no BN, bias) and c are followed by ReLU, so zeroing them is exactly pruning them
    masked = [lay for lay in layers if lay.name in ("stem", "c")]
    plan = PruningPlan({"stem": [0, 3, 5], "c": [1, 2, 9]}, {"stem": 8, "c": 10})
    _check_equivalent(model, masked, plan, torch.randn(3, *SHAPE))
    # d feeds a sigmoid (sigmoid(0) != 0): check shapes and MACs only
    plan = PruningPlan({"d": [4]}, {"d": 5})
    pruned = apply(model, plan)
    assert pruned.fc.weight.shape == (7, 16) and pruned(torch.randn(2, *SHAPE)).shape == (2, 7)
    assert MacsModel.from_model(model).predict({"d": 1}) == (flops.count(pruned, SHAPE).macs,
                                                            flops.count(pruned, SHAPE).params)


def test_plans_that_do_not_fit_are_rejected():
    model = build("vgg11", num_classes=10, width=0.25)
    with pytest.raises(PlanError, match="not a prunable layer"):
        apply(model, PruningPlan({"features.1": [0]}, {"features.1": 16}))  # a BatchNorm, not a conv
    with pytest.raises(PlanError, match="made for"):
        apply(model, PruningPlan({"features.0": [0]}, {"features.0": 64}))


def test_torch_pruning_gives_the_same_pruned_networks():
    """Independent check: Torch-Pruning's DepGraph removes the same channels identically."""
    tp = pytest.importorskip("torch_pruning")
    for arch, width in (("vgg11", 0.25), ("alexnet", 0.25), ("resnet20", 0.5)):
        model = _randomise_bn(build(arch, num_classes=10, width=width), seed=3)
        layers = prunable_layers(model)
        plan = _random_plan(layers, 2)
        ours = apply(model, plan, layers=layers)
        theirs = copy.deepcopy(model)
        graph = tp.DependencyGraph().build_dependency(theirs, example_inputs=torch.randn(1, *SHAPE), verbose=False)
        modules = dict(theirs.named_modules())
        for layer in layers:
            pruned = list(plan.pruned(layer.name))
            if pruned:
                graph.get_pruning_group(modules[layer.name], tp.prune_conv_out_channels, idxs=pruned).prune()
        assert {k: v.shape for k, v in ours.state_dict().items()} == \
            {k: v.shape for k, v in theirs.state_dict().items()}
        x = torch.randn(3, *SHAPE)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs.eval()(x), rtol=1e-5, atol=1e-5)
