"""The CUDA fast path (issue 17): nothing changes on CPU, and its device-independent logic, run on CPU tensors,
gives exactly what the host path gives (resident batches, epoch-drawn augmentation, the sync-free loss sum)."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

from pruning_env.core import batching
from pruning_env.core.batching import batches, resident_copy
from pruning_env.core.config import seed_everything
from pruning_env.core.data import make_synthetic
from pruning_env.core.device_path import DevicePath, LossMeter, device_path
from pruning_env.core.evaluation import NonFiniteError
from pruning_env.core.models import build
from pruning_env.training import finetune as finetune_module
from pruning_env.training import train as train_module
from pruning_env.training.finetune import FinetuneConfig, finetune
from pruning_env.training.train import TrainConfig, fit

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Recorded with the code before the fast path existed (commit e034fa7, torch 2.13.0+cpu, 1 thread, an Intel
# Xeon). Floating-point kernels differ between CPU vendors and instruction sets (an AMD EPYC gives 1.3531225522
# for the first loss), so these are compared with a tolerance that survives a change of CPU, never bit for bit:
# bit-for-bit comparisons are made only between two runs on one machine, in one test (see tests/conftest.py).
RECORDED_TRAIN = ([1.353122591972351, 1.1807716290156047], [25.0, 40.625])
RECORDED_FINETUNE = ([0.5871396064758301, 0.9861641327540079], [57.8125, 57.8125])
CROSS_MACHINE_REL = 1e-5
ONE_IMAGE = 100 / 64 + 1e-9  # accuracy points of one of the 64 validation images: at most one may flip
recorded_platform = pytest.mark.skipif(torch.__version__.split("+")[0] != "2.13.0",
                                       reason="the values were recorded with torch 2.13.0 on CPU")


class _Weights:
    """A model's weights and buffers, copied; equal to another only where every tensor is equal bit for bit.
    Compared only between two runs made in the same test, on this machine."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, _Weights) and self.state.keys() == other.state.keys()
                and all(torch.equal(v, other.state[k]) for k, v in self.state.items()))

    def __repr__(self) -> str:
        return f"<weights: {len(self.state)} tensors>"


def _splits():
    return make_synthetic(n_train=256, n_test=64, size=16, seed=3).splits(0.25, seed=0)


def _train(splits) -> tuple[torch.nn.Module, dict]:
    seed_everything(0)
    model = build("tiny", num_classes=splits.num_classes, width=1.0)
    result = fit(model, splits, TrainConfig(net="tiny", epochs=2, batch_size=32, lr=0.05, progress=False,
                                            device="cpu"))
    return model, result


def _finetune(model, splits, **cfg) -> tuple[torch.nn.Module, dict]:
    student = copy.deepcopy(model)
    summary = finetune(student, splits, FinetuneConfig(epochs=2, batch_size=32, lr=0.01, progress=False,
                                                       device="cpu", seed=1, **cfg), teacher=model)
    return student, summary


def _curve(result: dict) -> tuple[list[float], list[float]]:
    return [h["train_loss"] for h in result["history"]], [h["val_acc"] for h in result["history"]]


@pytest.fixture(scope="module")
def host_run():
    """The plain CPU loops (every fast-path switch off), run once on this machine: the same-machine reference."""
    splits = _splits()
    model, result = _train(splits)
    student, summary = _finetune(model, splits)
    return dict(train=(*_curve(result), _Weights(model)), finetune=(*_curve(summary), _Weights(student)))


@recorded_platform
def test_cpu_training_and_finetuning_give_the_numbers_of_before(host_run):
    """The CPU path still gives the curves recorded before the fast path: losses to rel 1e-5 (a change of
    CPU moves the 8th digit), and accuracies within one validation image (a borderline image may flip)."""
    for (losses, accs, _), (rec_losses, rec_accs) in ((host_run["train"], RECORDED_TRAIN),
                                                      (host_run["finetune"], RECORDED_FINETUNE)):
        assert losses == pytest.approx(rec_losses, rel=CROSS_MACHINE_REL)
        assert accs == pytest.approx(rec_accs, abs=ONE_IMAGE)


def test_cpu_training_and_finetuning_repeat_bit_for_bit(host_run):
    """Same seed, same results on one machine: a second run gives the same curves and weights, bit for bit."""
    splits = _splits()
    model, result = _train(splits)
    assert (*_curve(result), _Weights(model)) == host_run["train"]
    student, summary = _finetune(model, splits)
    assert (*_curve(summary), _Weights(student)) == host_run["finetune"]


def test_the_fast_path_is_all_off_on_cpu_and_all_on_for_cuda():
    assert device_path(torch.device("cpu"), amp=True, device_data=True) == DevicePath()
    assert not DevicePath().amp and DevicePath().amp_device == "cuda"
    on = device_path(torch.device("cuda"), amp=True, device_data=True)
    assert on == DevicePath(resident=True, sync_free=True, amp=True, benchmark=True)
    assert device_path(torch.device("cuda"), amp=False, device_data=False) == DevicePath(sync_free=True,
                                                                                         benchmark=True)


def _forced(monkeypatch, path: DevicePath) -> None:
    monkeypatch.setattr(train_module, "device_path", lambda *a, **k: path)
    monkeypatch.setattr(finetune_module, "device_path", lambda *a, **k: path)


def test_the_fast_loops_forced_on_cpu_train_the_same_weights_as_the_host_loops(monkeypatch, host_run):
    """Resident data, epoch-drawn augmentation and the device-side loss sum (amp and cuDNN off: CPU) give the
    plain host loops' weights bit for bit, both computed here, on this machine."""
    _forced(monkeypatch, DevicePath(resident=True, sync_free=True))
    splits = _splits()
    model, result = _train(splits)
    host_losses, host_accs, host_weights = host_run["train"]
    losses, accs = _curve(result)
    assert (accs, _Weights(model)) == (host_accs, host_weights)
    assert losses == pytest.approx(host_losses, rel=1e-6)  # summed in float32 on the device, not in float64
    student, summary = _finetune(model, splits, channels_last=False)  # the CPU's NCHW kernels, as the host run
    host_losses, host_accs, host_weights = host_run["finetune"]
    losses, accs = _curve(summary)
    assert (accs, _Weights(student)) == (host_accs, host_weights)
    assert losses == pytest.approx(host_losses, rel=1e-6)


def test_the_bf16_loops_run_on_cpu_autocast_and_keep_float32_state(monkeypatch, host_run):
    """The fast loops with autocast on (CPU bf16 here, CUDA bf16 on a GPU) and channels-last fine-tuning."""
    _forced(monkeypatch, DevicePath(resident=True, sync_free=True, amp=True, amp_device="cpu"))
    splits = _splits()
    model, result = _train(splits)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    host_losses, _, host_weights = host_run["train"]
    assert _Weights(model) != host_weights  # bf16 forward passes do change the weights (autocast was on)
    assert _curve(result)[0] == pytest.approx(host_losses, rel=0.05)
    student, summary = _finetune(model, splits)  # channels-last student and teacher
    assert summary["val_acc"] >= summary["initial_val_acc"]
    for net in (model, student):  # the student's and the teacher's memory format are restored
        assert all(p.is_contiguous() for p in net.parameters())


@pytest.mark.parametrize("kwargs", [
    dict(shuffle=True, augment_data=True, copies=2, cutout=4, padding=2),
    dict(shuffle=True, augment_data=True, drop_last=True, padding=0),
    dict(shuffle=True),
    dict(),
])
def test_resident_batches_equal_host_batches_and_consume_the_generator_alike(kwargs):
    split = make_synthetic(n_train=70, n_test=8, size=12, seed=1).train
    stats = dict(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)]
    host = list(batches(split, 16, **stats, generator=gens[0], resident=False, **kwargs))
    resident = list(batches(split, 16, **stats, generator=gens[1], resident=True, **kwargs))
    assert len(host) == len(resident) > 0
    for (xh, yh), (xr, yr) in zip(host, resident):
        assert torch.equal(xh, xr) and torch.equal(yh, yr)
    assert torch.equal(gens[0].get_state(), gens[1].get_state())


def test_resident_copy_is_made_once_serves_prefixes_as_views_and_is_freed_with_its_source():
    meta = torch.device("meta")  # another device than the source's, available without a GPU
    source = torch.arange(60, dtype=torch.uint8).view(10, 6).clone()  # a tensor of its own, as a split's images
    first = resident_copy(source, meta)
    assert first.device == meta and first.shape == source.shape
    assert resident_copy(source, meta) is first
    entries = len(batching._RESIDENT)
    prefix = resident_copy(source[:4], meta)  # a prefix (Split.subset): served from the same copy, no new one
    assert prefix.shape == (4, 6) and len(batching._RESIDENT) == entries
    assert resident_copy(source.view(-1)[:12].view(2, 6), meta).shape == (2, 6)  # a view of a view alike
    assert len(batching._RESIDENT) == entries
    assert resident_copy(source, torch.device("cpu")) is source
    keys = [k for k in batching._RESIDENT if k[1] == "meta"]
    assert keys
    del source, first, prefix
    gc.collect()
    assert not [k for k in batching._RESIDENT if k in keys]


def test_the_sync_free_loss_sum_reports_the_mean_and_refuses_a_non_finite_epoch():
    meter = LossMeter(sync_each_step=False)
    meter.add(torch.tensor(1.0), 2, where="w", hint="h")
    meter.add(torch.tensor(4.0), 1, where="w", hint="h")
    assert meter.mean() is None
    assert meter.finish(where="w", hint="h") == pytest.approx(2.0)
    meter.add(torch.tensor(float("nan")), 1, where="w", hint="h")
    with pytest.raises(NonFiniteError, match="epoch 3"):
        meter.finish(where="epoch 3", hint="lower the lr")


@cuda
def test_on_cuda_resident_batches_equal_host_batches():
    split = make_synthetic(n_train=70, n_test=8, size=12, seed=1).train
    stats = dict(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), device="cuda", shuffle=True, augment_data=True,
                 cutout=4)
    host = list(batches(split, 16, **stats, generator=torch.Generator().manual_seed(5), resident=False))
    resident = list(batches(split, 16, **stats, generator=torch.Generator().manual_seed(5), resident=True))
    for (xh, yh), (xr, yr) in zip(host, resident):
        assert xr.device.type == "cuda" and torch.equal(xh, xr) and torch.equal(yh, yr)


@cuda
def test_on_cuda_training_and_finetuning_run_in_bf16_and_learn():
    splits = _splits()
    seed_everything(0)
    model = build("tiny", num_classes=splits.num_classes, width=1.0)
    result = fit(model, splits, TrainConfig(net="tiny", epochs=3, batch_size=32, lr=0.05, progress=False,
                                            device="cuda"))
    assert next(model.parameters()).dtype == torch.float32
    assert result["val_acc"] > 100.0 / splits.num_classes
    student = copy.deepcopy(model)
    summary = finetune(student, splits, FinetuneConfig(epochs=1, batch_size=32, progress=False, device="cuda"),
                       teacher=model)
    assert summary["val_acc"] >= summary["initial_val_acc"]
    assert model.features[0].weight.is_contiguous()  # the teacher's memory format is restored
