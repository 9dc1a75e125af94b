import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import pruning_env.training.train as train_mod
from pruning_env.core import checkpoint as ckpt
from pruning_env.core.models import ModelSpec, build_from_spec
from pruning_env.training.train import TrainConfig, train


def _cfg(tmp_path, **kw):
    base = dict(net="vgg11", dataset="synthetic", width=0.125, epochs=3, batch_size=64, lr=0.05,
                out=str(tmp_path / "m.pt"), progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_training_learns_and_writes_a_self_describing_checkpoint(tmp_path):
    summary = train(_cfg(tmp_path))
    assert set(summary) >= {"test_acc", "val_acc", "epochs", "seconds", "checkpoint"}
    assert summary["val_acc"] > 50.0  # 4 classes: chance is 25 %
    loaded = ckpt.load(summary["checkpoint"])
    assert loaded.arch == "vgg11" and loaded.dataset == "synthetic" and loaded.input_shape == (3, 32, 32)
    assert loaded.metrics["test_acc"] == summary["test_acc"]
    assert loaded.train_config["epochs"] == 3
    assert [h["epoch"] for h in loaded.extra["train_state"]["history"]] == [1, 2, 3]


@pytest.mark.parametrize("extra", [{}, {"aug_copies": 1, "ema_decay": 0.0, "cutout": 0}, {"sam_rho": 0.05},
                                   {"crop_padding": 2, "aug_copies": 1}],
                         ids=["default", "plain", "sam", "pad2+single-copy"])
def test_interrupted_training_resumes_to_the_same_result(tmp_path, monkeypatch, extra):
    reference = train(_cfg(tmp_path / "a", **extra))
    ref_state = ckpt.load(reference["checkpoint"]).model.state_dict()

    real_batches = _interrupt_in_second_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "b", **extra))
    partial = ckpt.load(tmp_path / "b" / "m.pt")
    assert partial.extra["train_state"]["epoch"] == 1  # the finished epoch was saved
    monkeypatch.setattr(train_mod, "batches", real_batches)
    resumed = train(_cfg(tmp_path / "b", resume=True, **extra))
    assert resumed["test_acc"] == reference["test_acc"]
    state = ckpt.load(resumed["checkpoint"]).model.state_dict()
    for k, v in ref_state.items():
        assert torch.equal(v, state[k]), k


def _interrupt_in_second_epoch(monkeypatch):
    """Make the next ``train`` raise KeyboardInterrupt mid-way through its second epoch."""
    real_batches = train_mod.batches
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        if kwargs.get("shuffle"):
            calls["n"] += 1  # one training epoch starts
        for i, item in enumerate(real_batches(*args, **kwargs)):
            if kwargs.get("shuffle") and calls["n"] == 2 and i == 3:  # mid-way through the second epoch
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(train_mod, "batches", interrupting)
    return real_batches


def test_resume_with_a_different_recipe_is_refused_with_the_flags_to_use(tmp_path, monkeypatch):
    real_batches = _interrupt_in_second_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, aug_copies=1, cutout=4, cycle_momentum=True))
    monkeypatch.setattr(train_mod, "batches", real_batches)
    with pytest.raises(ValueError, match=r"aug_copies=1 there, 2 here.*\(--cycle-momentum --aug-copies 1 --cutout 4\)"):
        train(_cfg(tmp_path, resume=True, aug_copies=2, cutout=0, cycle_momentum=False))
    assert ckpt.load(tmp_path / "m.pt").extra["train_state"]["epoch"] == 1  # the refused resume changed nothing
    # where and how it runs may change: progress bars, memory format
    done = train(_cfg(tmp_path, resume=True, aug_copies=1, cutout=4, cycle_momentum=True, channels_last=False))
    assert done["epochs"] == 3


def test_recipe_fields_a_checkpoint_predates_count_as_their_old_values(tmp_path):
    cfg = _cfg(tmp_path, aug_copies=2, ema_decay=0.0)
    saved = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("aug_copies", "ema_decay")}
    assert train_mod.recipe_mismatch(cfg, saved) == {"aug_copies": (1, 2)}  # no aug_copies then: 1 copy
    saved["out"] = "/elsewhere.pt"
    assert train_mod.recipe_mismatch(dataclasses.replace(cfg, aug_copies=1), saved) == {}


def test_cached_baseline_resumes_with_the_recipe_it_was_started_with(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from pruning_env.envs.registry import baseline_model

    path = train_mod.default_checkpoint_path("vgg11", "synthetic", 0.125, 3)
    real_batches = _interrupt_in_second_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):  # started with a recipe other than today's default
        train(_cfg(tmp_path, out=str(path), aug_copies=1, ema_decay=0.0, cutout=0, batch_size=128, lr=0.1))
    monkeypatch.setattr(train_mod, "batches", real_batches)
    baseline_model("vgg11", "synthetic", width=0.125, epochs=3, device="cpu", progress=False)
    done = ckpt.load(path)
    assert "test_acc" in done.metrics and done.extra["train_state"]["epoch"] == 3
    assert (done.train_config["aug_copies"], done.train_config["ema_decay"], done.train_config["cutout"]) == (1, 0.0, 0)


def test_ema_saves_the_average_of_the_weights(tmp_path, monkeypatch):
    seen = []
    real_step = torch.optim.SGD.step

    def recording_step(self, *a, **k):  # the first conv's weights before the first and after every step
        w = self.param_groups[0]["params"][0]
        if not seen:
            seen.append(w.detach().clone())
        out = real_step(self, *a, **k)
        seen.append(w.detach().clone())
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    summary = train(_cfg(tmp_path, epochs=1, ema_decay=0.9))
    saved = ckpt.load(summary["checkpoint"])
    avg = seen[0].clone()
    for t, w in enumerate(seen[1:], start=1):
        avg.lerp_(w, 1 - min(0.9, (1 + t) / (10 + t)))
    first_conv = saved.model.features[0].weight
    assert torch.allclose(first_conv, avg, atol=1e-6)
    assert not torch.allclose(first_conv, seen[-1], atol=1e-4)  # not the last raw weights
    raw = saved.extra["train_state"]["ema_raw"]  # the raw weights travel for --resume
    assert any(torch.equal(t, seen[-1]) for t in raw)
    assert 0.0 <= summary["test_acc_flip_tta"] <= 100.0
    # resuming a finished run changes nothing: the model stays the average
    again = train(_cfg(tmp_path, epochs=1, ema_decay=0.9, resume=True))
    assert torch.equal(ckpt.load(again["checkpoint"]).model.features[0].weight, first_conv)
    assert again["test_acc"] == summary["test_acc"]


def test_bad_recipe_values_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="ema_decay must be in"):
        train(_cfg(tmp_path, ema_decay=1.0))
    with pytest.raises(ValueError, match="cutout must be >= 0"):
        train(_cfg(tmp_path, cutout=-2))
    with pytest.raises(ValueError, match="sam_rho must be >= 0"):
        train(_cfg(tmp_path, sam_rho=-0.1))
    with pytest.raises(ValueError, match="aug_copies must be >= 1"):
        train(_cfg(tmp_path, aug_copies=0))
    with pytest.raises(ValueError, match="padding must be >= 0"):
        train(_cfg(tmp_path, crop_padding=-1))


def test_sam_gradient_is_the_gradient_at_the_perturbed_weights(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3))
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    cfg = _cfg(tmp_path, sam_rho=0.1, label_smoothing=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.nn.functional.cross_entropy(model(x), y).backward()
    g = [p.grad.clone() for p in model.parameters()]
    stats_after_first = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    train_mod._sam_second_pass(model, x, y, cfg)
    # reference: the plain gradient at w + rho * g / ||g|| (BN in train mode uses batch statistics)
    ref = copy.deepcopy(model)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    with torch.no_grad():
        for p, gi in zip(ref.parameters(), g):
            p.add_(gi * 0.1 / norm)
    ref.zero_grad()
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)
    for k, v in model.state_dict().items():  # weights restored; BN stats untouched by the second pass
        if "running" in k:
            assert torch.equal(v, stats_after_first[k]), k
        elif "num_batches" not in k:
            assert torch.equal(v, before[k]), k


def test_pruned_widths_reload_without_knowing_how_they_were_made(tmp_path):
    spec = ModelSpec("resnet20", 10, 3, (16, 3, 16, 5, 16, 7, 16, 9, 32, 11, 32, 13, 32, 15, 64, 17, 64, 19, 64), ())
    model = build_from_spec(spec)
    ckpt.save(tmp_path / "p.pt", model, input_shape=(3, 32, 32))
    assert ckpt.load(tmp_path / "p.pt").model.layer2[0].conv1.out_channels == 9


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ckpt.CheckpointError, match="not a pruning_env checkpoint"):
        ckpt.load(tmp_path / "other.pt")
    ckpt.save(tmp_path / "v.pt", build_from_spec(ModelSpec("vgg11", 10, 3, (4,) * 8, (4,))), input_shape=(3, 32, 32))
    with pytest.raises(ckpt.CheckpointError, match="holds a vgg11, not a resnet56"):
        ckpt.load(tmp_path / "v.pt", expect_arch="resnet56")


@pytest.mark.parametrize("module", ["pruning_env.train", "pruning_env.prune"])
def test_cli_modules_start_without_runpy_warnings(module):
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", module, "--help"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "RuntimeWarning" not in out.stderr, out.stderr
    assert "--help" in out.stdout


def test_cli_prints_one_json_line_and_rejects_bad_flags(tmp_path):
    cmd = [sys.executable, "-m", "pruning_env.train", "--net", "vgg11", "--dataset", "synthetic", "--width", "0.125",
           "--epochs", "1", "--out", str(tmp_path / "c.pt"), "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 1 and 0.0 <= summary["test_acc"] <= 100.0
    bad = subprocess.run(cmd[:3] + ["--net", "vgg17"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'vgg17'" in bad.stderr
    bad = subprocess.run(cmd[:-1] + ["--dataset", "nosuchdata", "--data-dir", str(tmp_path), "--overwrite"],
                         capture_output=True, text=True)  # --overwrite: c.pt exists (issue 14 refusal)
    assert bad.returncode == 2 and "not found" in bad.stderr and "Traceback" not in bad.stderr


def test_one_cycle_shape_options(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = train_mod._make_scheduler(opt, _cfg(tmp_path, lr=0.1, warmup_frac=0.3, anneal="cos",
                                                cycle_momentum=True), total_steps=100)
    lrs, moms = [], []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    peak = max(range(100), key=lrs.__getitem__)
    assert peak in (29, 30) and lrs[peak] == pytest.approx(0.1)
    assert moms[0] == pytest.approx(0.95) and moms[peak] == pytest.approx(0.85)
    # cosine decay: half-way through the decay the lr is about half the peak (linear would be too,
    # but a quarter of the way in the cosine is well above the linear value)
    quarter = peak + (99 - peak) // 4
    linear_value = 0.1 - (0.1 - 1e-4) * (quarter - peak) / (99 - peak)
    assert lrs[quarter] > linear_value + 0.01
