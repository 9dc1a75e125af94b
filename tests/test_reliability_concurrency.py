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
