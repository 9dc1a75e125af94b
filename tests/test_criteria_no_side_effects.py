"""score() and compute_components() leave the model exactly as they found it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pruning_env.core import models
from pruning_env.criteria import CRITERIA, KL_MODES, compute_components, score

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)



def _prepared(arch: str, training: bool) -> nn.Module:
    """A model with every kind of state a caller might have: some .grad set and some
    None, a frozen parameter, a user hook, non-default BN statistics."""
    torch.manual_seed(0)
    model = models.build(arch, num_classes=10, width=0.125 if arch.startswith("vgg") else 0.25)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
    params = list(model.parameters())
    for i, p in enumerate(params):
        if i % 3 == 0:
            p.grad = torch.randn_like(p)
    params[1].requires_grad_(False)  # a frozen BN weight
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    convs[1].weight.requires_grad_(False)  # a frozen conv: its gradient is still needed
    convs[0].register_forward_hook(lambda mod, inp, out: None)
    model.train(training)
    # a mixed state: one submodule in the opposite mode
    next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).train(not training)
    return model


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: {d: list(getattr(m, d, {}).keys()) for d in _HOOK_DICTS} for n, m in model.named_modules()},
        "inplace": {n: m.inplace for n, m in model.named_modules() if hasattr(m, "inplace")},
        "place": {n: (p.device, p.dtype) for n, p in model.named_parameters()},
        "ids": {n: id(p) for n, p in model.named_parameters()},
        "modules": [id(m) for m in model.modules()],
    }


def _assert_unchanged(before: dict, model: nn.Module) -> None:
    after = _snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k
    for n, g in before["grads"].items():
        g2 = after["grads"][n]
        assert (g is None) == (g2 is None), n
        assert g is None or torch.equal(g, g2), n
    for key in ("requires_grad", "modes", "hooks", "inplace", "place", "ids", "modules"):
        assert before[key] == after[key], key


CASES = [(c, {}) for c in CRITERIA if c not in ("kl", "dsfp", "random")]
CASES += [("random", {"seed": 1})]
CASES += [("kl", {"kl": mode}) for mode in KL_MODES]
CASES += [("dsfp", {"direction": "low", "kl": "exact"}), ("dsfp", {"direction": "high", "kl": "linear"})]


@pytest.mark.parametrize("training", [True, False], ids=["train_mode", "eval_mode"])
@pytest.mark.parametrize("criterion, options", CASES, ids=[f"{c}-{'-'.join(map(str, o.values()))}" for c, o in CASES])
def test_score_leaves_model_unchanged(criterion, options, training):
    model = _prepared("resnet20", training)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % 10
    before = _snapshot(model)
    score(model, x, y, criterion, **options)
    _assert_unchanged(before, model)


@pytest.mark.parametrize("training", [True, False], ids=["train_mode", "eval_mode"])
def test_components_leave_vgg_with_dropout_unchanged(training):
    model = _prepared("vgg11", training)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % 10
    before = _snapshot(model)
    comps = compute_components(model, x, y, kl="exact")
    _assert_unchanged(before, model)
    again = compute_components(model, x, y, kl=None)
    _assert_unchanged(before, model)
    # dropout off and BN statistics untouched: the result does not depend on the call
    assert all(torch.equal(comps.grad[n], again.grad[n]) for n in comps.grad)


def test_failed_call_leaves_model_unchanged():
    model = _prepared("resnet20", True)
    before = _snapshot(model)
    with pytest.raises(ValueError):
        score(model, torch.randn(4, 3, 32, 32), torch.full((4,), 99), "grad")  # labels out of range
    with pytest.raises(ValueError):
        score(model, torch.randn(4, 1, 32, 32), torch.zeros(4, dtype=torch.long), "kl")  # wrong channels
    _assert_unchanged(before, model)


def test_no_grad_context_and_inference():
    model = _prepared("resnet20", False)
    x = torch.randn(4, 3, 32, 32)
    y = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        a = score(model, x, y, "taylor")
    assert all(torch.equal(a[n], v) for n, v in score(model, x, y, "taylor").items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_stays_on_cuda():
    model = _prepared("resnet20", True).cuda()
    x = torch.randn(4, 3, 32, 32)
    y = torch.zeros(4, dtype=torch.long)
    before = _snapshot(model)
    for criterion, options in CASES:
        s = score(model, x, y, criterion, **options)
        assert all(v.device.type == "cpu" for v in s.values())
    _assert_unchanged(before, model)
