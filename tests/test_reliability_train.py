"""Issue 14 for the train CLI: --out checked before any work, an earlier result kept, only a baseline training
resumed, and a Ctrl-C says truthfully what is saved."""

import pytest

from pruning_env.cli import train as train_cli
from pruning_env.cli.prune import main as prune_main
from pruning_env.training import train as train_module

BASE = ["--net", "tiny", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--no-progress",
        "--device", "cpu", "--aug-copies", "1", "--ema-decay", "0"]


def _fails(capsys, *args, code=2):
    with pytest.raises(SystemExit) as exc:
        train_cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exc.value.code == code and "Traceback" not in err, err
    return err


def _no_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("work started")
    monkeypatch.setattr(train_module, "load_splits", boom)


def test_out_that_is_a_directory_fails_before_any_work(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    assert "is a directory" in _fails(capsys, *BASE, "--out", tmp_path)


def test_existing_out_is_refused_without_overwrite_or_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "b.pt"
    out.write_bytes(b"earlier work")
    _no_training(monkeypatch)
    err = _fails(capsys, *BASE, "--out", out)
    assert "--overwrite" in err and "--resume" in err
    assert out.read_bytes() == b"earlier work"


def test_pruned_checkpoint_is_not_resumed_as_a_training(tmp_path, capsys):
    base = tmp_path / "b.pt"
    assert train_cli.main([*BASE, "--out", str(base)]) == 0
    pruned = tmp_path / "p.pt"
    assert prune_main(["--checkpoint", str(base), "--out", str(pruned), "--criterion", "l1", "--rate", "0.5",
                       "--finetune-epochs", "1", "--latency-repeats", "0", "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    err = _fails(capsys, *BASE, "--out", pruned, "--resume")
    assert "pruned or fine-tuned" in err


def test_ctrl_c_in_the_first_epoch_says_nothing_is_saved(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_fit_epochs", interrupted)
    err = _fails(capsys, *BASE, "--out", tmp_path / "b.pt", code=130)
    assert "nothing was saved" in err and "last finished epoch" not in err
