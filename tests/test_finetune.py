"""Fine-tuning with distillation, BN recalibration and resumption (tiny model, synthetic data)."""

import math

import pytest
import torch
from torch import nn

import pruning_env.training.finetune as finetune_mod
from pruning_env.core import checkpoint as ckpt
from pruning_env.core.data import load_splits
from pruning_env.core.evaluation import evaluate
from pruning_env.core.models import build
from pruning_env.engine.bn import recalibrate_bn
from pruning_env.engine.graph import prunable_layers
from pruning_env.engine.plan import plan_uniform
from pruning_env.engine.surgery import apply
from pruning_env.training.finetune import FinetuneConfig, alpha_at, finetune, kd_loss
from pruning_env.training.train import TrainConfig, fit


@pytest.fixture(scope="module")
def splits():
    return load_splits("synthetic")


@pytest.fixture(scope="module")
def trained(splits):
    """A small VGG-11 trained for 3 epochs on the synthetic data (about 90 % val accuracy)."""
    torch.manual_seed(0)
    model = build("vgg11", num_classes=splits.num_classes, width=0.125)
    fit(model, splits, TrainConfig(net="vgg11", dataset="synthetic", width=0.125, epochs=3, batch_size=64, lr=0.05,
                                   progress=False, channels_last=False, device="cpu"))
    return model.eval()


def _pruned(model, rate=0.7, seed=0):
    layers = prunable_layers(model)
    gen = torch.Generator().manual_seed(seed)
    plan = plan_uniform({lay.name: torch.rand(lay.out_channels, generator=gen) for lay in layers}, rate)
    return apply(model, plan, layers=layers), plan


def _cfg(**kw):
    base = dict(epochs=2, batch_size=64, lr=0.02, device="cpu", progress=False)
    base.update(kw)
    return FinetuneConfig(**base)


def test_kd_loss_matches_a_hand_computed_example():
    student = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.5, -1.0]])
    teacher = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1])
    alpha, temp = 0.3, 2.0

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    kl = ce = 0.0
    for s, t, y in zip(student.tolist(), teacher.tolist(), labels.tolist()):
        p_t, p_s = softmax([v / temp for v in t]), softmax([v / temp for v in s])
        kl += sum(a * math.log(a / b) for a, b in zip(p_t, p_s))
        ce += -math.log(softmax(s)[y])
    expected = alpha * temp**2 * kl / 2 + (1 - alpha) * ce / 2
    got = kd_loss(student, teacher, labels, alpha=alpha, temperature=temp)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(student, student, labels, alpha=1.0, temperature=temp).item() == pytest.approx(0.0, abs=1e-7)


def test_alpha_decays_linearly_over_epochs():
    cfg = FinetuneConfig(epochs=5)
    assert [alpha_at(e, cfg) for e in range(5)] == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1], abs=1e-9)
    assert alpha_at(0, FinetuneConfig(epochs=1)) == 0.5


def test_finetuning_with_kd_improves_a_pruned_network(splits, trained):
    student, plan = _pruned(trained, rate=0.7)
    before = evaluate(student, splits.val, mean=splits.mean, std=splits.std)
    teacher_state = {k: v.clone() for k, v in trained.state_dict().items()}
    result = finetune(student, splits, _cfg(epochs=3, kd=True), teacher=trained, plan=plan.to_dict())
    after = evaluate(student, splits.val, mean=splits.mean, std=splits.std)
    assert result["initial_val_acc"] == pytest.approx(before)
    assert after == pytest.approx(result["val_acc"])  # the student holds its best-val weights
    assert after > before + 5.0, (before, after)
    assert [h["alpha"] for h in result["history"]] == pytest.approx([0.5, 0.3, 0.1])
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in teacher_state.items())  # teacher untouched
    with pytest.raises(ValueError, match="teacher"):
        finetune(student, splits, _cfg(kd=True))


def test_bn_recalibration_changes_statistics_deterministically(splits, trained):
    a, _ = _pruned(trained, rate=0.5)
    b, _ = _pruned(trained, rate=0.5)
    bn_before = {k: v.clone() for k, v in a.state_dict().items() if "running" in k}
    a.train()
    recalibrate_bn(a, splits, n_batches=3, batch_size=32, seed=1)
    recalibrate_bn(b, splits, n_batches=3, batch_size=32, seed=1)
    after_a, after_b = a.state_dict(), b.state_dict()
    assert any(not torch.allclose(bn_before[k], after_a[k]) for k in bn_before)
    assert all(torch.equal(after_a[k], after_b[k]) for k in after_a)  # deterministic in the seed
    norms = [m for m in a.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.momentum == 0.1 for m in norms) and a.training and all(m.training for m in norms)
    assert all(int(m.num_batches_tracked) == 3 for m in norms)
    c, _ = _pruned(trained, rate=0.5)
    recalibrate_bn(c, splits, n_batches=3, batch_size=32, seed=2)
    assert any(not torch.equal(after_a[k], c.state_dict()[k]) for k in bn_before)


def test_a_paused_finetuning_continues_to_the_uninterrupted_result(splits, trained, tmp_path):
    """stop_after (the selection's rungs): pauses inside an epoch and at its end, then the finish, give one
    uninterrupted run of 3 epochs (same losses, accuracies and weights)."""
    cfg = _cfg(epochs=3, kd=True)
    ref, plan = _pruned(trained, rate=0.6)
    reference = finetune(ref, splits, cfg, teacher=trained, plan=plan.to_dict())
    with pytest.raises(ValueError, match="needs out="):
        finetune(_pruned(trained, rate=0.6)[0], splits, cfg, teacher=trained, stop_after=1)
    for stop in (0.25, 0.5, 1, 1.75, 2):
        student, _ = _pruned(trained, rate=0.6)  # rebuilt from the plan each time, as the selection does
        paused = finetune(student, splits, cfg, teacher=trained, out=tmp_path / "p.pt", resume=True,
                          plan=plan.to_dict(), stop_after=stop)
        assert paused["paused"] and paused["epoch"] == pytest.approx(stop, abs=0.5 / 8)
        if stop == int(stop):
            assert paused["last_val_acc"] == reference["history"][int(stop) - 1]["val_acc"]
    student, _ = _pruned(trained, rate=0.6)
    done = finetune(student, splits, cfg, teacher=trained, out=tmp_path / "p.pt", resume=True, plan=plan.to_dict())
    assert "paused" not in done and [h["val_acc"] for h in done["history"]] == \
        [h["val_acc"] for h in reference["history"]]
    for k, v in ref.state_dict().items():
        assert torch.equal(v, student.state_dict()[k]), k


def test_interrupted_finetuning_resumes_to_the_same_result(splits, trained, tmp_path, monkeypatch):
    cfg = _cfg(epochs=3, kd=True)
    ref, plan = _pruned(trained, rate=0.6)
    reference = finetune(ref, splits, cfg, teacher=trained, out=tmp_path / "a.pt", plan=plan.to_dict())

    real_batches = finetune_mod.batches
    calls = {"epochs": 0}

    def interrupting(*args, **kwargs):
        if kwargs.get("augment_data"):
            calls["epochs"] += 1
        for i, item in enumerate(real_batches(*args, **kwargs)):
            if calls["epochs"] == 2 and kwargs.get("augment_data") and i == 3:
                raise KeyboardInterrupt  # mid-way through the second epoch
            yield item

    monkeypatch.setattr(finetune_mod, "batches", interrupting)
    student, _ = _pruned(trained, rate=0.6)
    with pytest.raises(KeyboardInterrupt):
        finetune(student, splits, cfg, teacher=trained, out=tmp_path / "b.pt", plan=plan.to_dict())
    partial = ckpt.load(tmp_path / "b.pt")
    assert partial.extra["train_state"]["epoch"] == 1 and not partial.extra["train_state"]["finished"]
    monkeypatch.setattr(finetune_mod, "batches", real_batches)
    fresh, _ = _pruned(trained, rate=0.6)  # a new process would rebuild the student from the plan
    resumed = finetune(fresh, splits, cfg, teacher=trained, out=tmp_path / "b.pt", resume=True, plan=plan.to_dict())
    assert [h["val_acc"] for h in resumed["history"]] == [h["val_acc"] for h in reference["history"]]
    assert resumed["val_acc"] == reference["val_acc"] and resumed["best_epoch"] == reference["best_epoch"]
    for k, v in ref.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    final = ckpt.load(tmp_path / "b.pt")
    assert final.extra["train_state"]["finished"] and final.plan == plan.to_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, final.model.state_dict()[k]), k
    # another plan with the same widths (other filters) never picks up this run's checkpoint
    other, other_plan = _pruned(trained, rate=0.6, seed=1)
    assert other_plan.keep_counts() == plan.keep_counts() and other_plan.key() != plan.key()
    with pytest.raises(ckpt.CheckpointError, match="another pruning plan"):
        finetune(other, splits, cfg, teacher=trained, out=tmp_path / "b.pt", resume=True, plan=other_plan.to_dict())
