"""Issue 14, case 1: writes are atomic and safe when two processes write the same path."""

import multiprocessing as mp

import pytest
import torch

from pruning_env.core import checkpoint as ckpt


def _writer(path: str, tag: int, n: int) -> None:
    for i in range(n):
        ckpt.atomic_save({"tag": tag, "i": i, "payload": torch.full((20_000,), float(tag))}, path)


def test_two_processes_saving_one_path_never_crash_or_mix(tmp_path):
    path = tmp_path / "same.pt"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), tag, 30)) for tag in (1, 2)]
    for p in procs:
        p.start()
    seen = 0
    while any(p.is_alive() for p in procs):
        if path.exists():
            blob = torch.load(path, weights_only=True)  # never a half-written zip
            assert torch.all(blob["payload"] == blob["tag"])
            seen += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0  # the old fixed temp name: FileNotFoundError in one of them
    assert torch.load(path, weights_only=True)["i"] == 29
    assert not [f for f in tmp_path.iterdir() if f.name != "same.pt"]  # no temp file left behind


def test_temporary_file_is_removed_when_a_save_fails(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        ckpt.atomic_save({"x": Unpicklable()}, tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []


def test_save_to_a_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="is a directory"):
        ckpt.atomic_save({}, tmp_path)
    with pytest.raises(ValueError, match="--out .* is a directory"):
        ckpt.check_writable(tmp_path, "--out")


def test_run_lock_refuses_a_second_writer(tmp_path):
    with ckpt.run_lock(tmp_path), pytest.raises(ckpt.RunLockedError, match="--logdir .* in use"), \
            ckpt.run_lock(tmp_path):
        pass
    with ckpt.run_lock(tmp_path):  # released afterwards
        pass


# Issue 25, section 1, case 1: every command holds a lock on what it writes for the whole run; a second run on
# the same output is refused at once, naming the output and the other run, whatever its flags.

import os  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from pruning_env.cli import train as train_cli  # noqa: E402
from pruning_env.cli.prune import main as prune_main  # noqa: E402
from pruning_env.training import train as train_module  # noqa: E402

TRAIN = ["--net", "tiny", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--no-progress",
         "--device", "cpu", "--aug-copies", "1", "--ema-decay", "0"]


def _exit_code(main, args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return exc.value.code, err


def test_the_lock_file_names_its_holder_and_goes_at_release(tmp_path):
    out = tmp_path / "model.pt"
    with ckpt.run_lock(out, "--out", file=True):
        assert (tmp_path / ".model.pt.lock").is_file()
        with pytest.raises(ckpt.RunLockedError) as exc, ckpt.run_lock(out, "--out", file=True):
            pass
    msg = str(exc.value)
    assert f"--out {out} is in use by another running process" in msg and f"pid {os.getpid()}" in msg
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_wait_waits_for_the_holder_instead_of_refusing(tmp_path, capsys):
    held, release = threading.Event(), threading.Event()

    def holder():
        with ckpt.run_lock(tmp_path / "cache.pt", "cache", file=True):
            held.set()
            release.wait(10)
            (tmp_path / "cache.pt").write_text("made by the holder")

    t = threading.Thread(target=holder)
    t.start()
    held.wait(10)
    threading.Timer(0.3, release.set).start()
    t0 = time.perf_counter()
    with ckpt.run_lock(tmp_path / "cache.pt", "cache", file=True, wait=True):
        assert (tmp_path / "cache.pt").read_text() == "made by the holder"
    assert time.perf_counter() - t0 >= 0.25
    t.join()
    assert "waiting for another run to finish" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]])
def test_a_second_train_on_a_locked_out_is_refused(tmp_path, capsys, monkeypatch, flags):
    out = tmp_path / "b.pt"
    out.write_bytes(b"the other run's")
    monkeypatch.setattr(train_module, "load_splits", lambda *a, **k: pytest.fail("work started"))
    with ckpt.run_lock(out, "--out", file=True):  # the first run
        code, err = _exit_code(train_cli.main, [*TRAIN, "--out", out, *flags], capsys)
    assert code == 2 and f"--out {out} is in use by another running process" in err and "pid " in err
    assert out.read_bytes() == b"the other run's"


def test_train_never_reads_back_its_out(tmp_path, monkeypatch):
    """The final save keeps this run's own resume state, whatever the file at --out holds by then."""
    out = tmp_path / "b.pt"
    real_fit = train_module.fit

    def fit_then_foreign_write(model, splits, cfg, **kw):
        result = real_fit(model, splits, cfg, **kw)
        ckpt.save(out, model, input_shape=splits.input_shape, extra={"train_state": {"epoch": 99}, "foreign": 1})
        return result

    monkeypatch.setattr(train_module, "fit", fit_then_foreign_write)
    assert train_cli.main([*TRAIN, "--out", str(out)]) == 0
    extra = ckpt.load(out).extra
    assert "foreign" not in extra and extra["train_state"]["epoch"] == 1
    assert {"optimizer", "scheduler", "generator", "torch_rng"} <= set(extra["train_state"])


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]])
def test_a_second_prune_on_a_locked_out_is_refused(tmp_path, capsys, flags):
    base = tmp_path / "base.pt"
    ckpt.save(base, __import__("pruning_env").core.models.build("tiny", num_classes=4), input_shape=(3, 32, 32),
              dataset="synthetic")
    out = tmp_path / "p.pt"
    out.write_bytes(b"the other run's")
    with ckpt.run_lock(out, "--out", file=True):
        code, err = _exit_code(prune_main, ["--checkpoint", base, "--out", out, "--criterion", "l1", "--no-progress",
                                            "--device", "cpu", *flags], capsys)
    assert code == 2 and f"--out {out} is in use by another running process" in err
    assert out.read_bytes() == b"the other run's"


def _benchmark_cases():
    return [  # (module, flags, the output a first run holds: (path relative to tmp_path, is a file))
        ("teacher_cache", ["--out", "t.md"], ("t.md", True)),
        ("criteria", ["--out", "c.md", "--scores-cache", "s.pt"], ("s.pt", True)),
        ("criteria", ["--out", "c.md"], ("c.md", True)),
        ("marl", ["--env", "pruning_env/Tiny-v1", "--out-dir", "o", "--work-dir", "w"], ("w/target-0.5", False)),
        ("marl", ["--env", "pruning_env/Tiny-v1", "--out-dir", "o", "--work-dir", "w"], ("o/marl.json", True)),
        ("reward_fidelity", ["--work-dir", "w", "--targets", "0.3", "--out-dir", "o"], ("w/target-0.3.json", True)),
        ("paper_scale", ["--smoke", "--out", "p.md", "--work-dir", "w"], ("p.md", True)),
        ("paper_scale", ["--smoke", "--out", "p.md", "--work-dir", "w"], ("w/target-0.3", False)),
        ("marl_report", ["--runs", "run", "--out-dir", "o"], ("run/marl.json", True)),  # a run still writing
        ("search_curves", ["--runs", "run", "--out", "s.md"], ("run/marl.json", True)),
    ]


@pytest.mark.parametrize("module,flags,held", _benchmark_cases())
def test_a_benchmark_on_a_locked_output_is_refused_at_once(tmp_path, capsys, module, flags, held):
    import importlib

    main = importlib.import_module(f"benchmarks.{module}").main
    args = [str(tmp_path / f) if i and flags[i - 1] in ("--out", "--scores-cache", "--out-dir", "--work-dir", "--runs")
            else f for i, f in enumerate(flags)]
    path, is_file = tmp_path / held[0], held[1]
    with ckpt.run_lock(path, "--x", file=is_file):
        code, err = _exit_code(main, args, capsys)
    assert code == 2 and f"{path} is in use by another running process" in err and f"pid {os.getpid()}" in err


def test_the_baseline_cache_waits_for_the_run_training_it_and_uses_its_result(tmp_path, monkeypatch):
    from pruning_env.core.models import build
    from pruning_env.envs import registry
    from pruning_env.training.train import default_checkpoint_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(train_module, "train", lambda cfg: pytest.fail("trained again"))
    path = default_checkpoint_path("vgg11", "cifar10", 0.125, 1)
    held = threading.Event()

    def other_run():  # trains the baseline into the cache
        with ckpt.run_lock(path, "--out", file=True):
            held.set()
            time.sleep(0.3)
            ckpt.save(path, build("vgg11", num_classes=10, width=0.125), input_shape=(3, 32, 32), dataset="cifar10",
                      metrics={"test_acc": 50.0})

    t = threading.Thread(target=other_run)
    t.start()
    held.wait(10)
    model = registry.baseline_model("vgg11", "cifar10", width=0.125, epochs=1, progress=False)
    t.join()
    assert getattr(model, "arch", None) == "vgg11"
