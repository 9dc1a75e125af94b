"""Issue 14 for the prune CLI: no input or earlier result overwritten unless asked (case 2), a resume with
other settings refused (case 3), --out checked before any work."""

import json
import os

import pytest

from pruning_env.cli.prune import main
from pruning_env.core import checkpoint as ckpt
from pruning_env.training.train import TrainConfig, train

FAST = ["--criterion", "l1", "--rate", "0.5", "--latency-repeats", "0", "--bn-recal-batches", "1", "--device", "cpu",
        "--no-progress"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "base.pt"
    train(TrainConfig(dataset="synthetic", net="tiny", epochs=1, batch_size=64, out=str(path), progress=False,
                      device="cpu"))
    return path


def _fails(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    return err


def test_out_equal_to_the_checkpoint_is_refused_and_the_baseline_kept(base, capsys):
    before = base.read_bytes()
    err = _fails(capsys, "--checkpoint", base, "--out", base, *FAST)
    assert "--checkpoint input" in err and "choose another --out" in err
    err = _fails(capsys, "--checkpoint", base, "--out", base, "--overwrite", *FAST)  # not even with --overwrite
    assert "input" in err
    assert base.read_bytes() == before


def test_existing_out_needs_overwrite(base, tmp_path, capsys):
    out = tmp_path / "p.pt"
    assert main(["--checkpoint", str(base), "--out", str(out), *FAST]) == 0
    stamp = out.stat().st_mtime_ns
    err = _fails(capsys, "--checkpoint", base, "--out", out, *FAST)
    assert "--overwrite" in err and "exists" in err
    assert out.stat().st_mtime_ns == stamp
    assert main(["--checkpoint", str(base), "--out", str(out), "--overwrite", *FAST]) == 0


def test_out_that_is_a_directory_or_unwritable_fails_before_any_work(base, tmp_path, capsys):
    err = _fails(capsys, "--checkpoint", base, "--out", tmp_path, *FAST)
    assert "is a directory" in err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        err = _fails(capsys, "--checkpoint", base, "--out", locked / "p.pt", *FAST)
        assert "not writable" in err
    finally:
        locked.chmod(0o700)


def test_resume_with_other_settings_is_refused_naming_the_flags(base, tmp_path, capsys):
    out = tmp_path / "p.pt"
    assert main(["--checkpoint", str(base), "--out", str(out), "--finetune-epochs", "1", *FAST]) == 0
    err = _fails(capsys, "--checkpoint", base, "--out", out, "--resume", "--finetune-epochs", "1",
                 *FAST[:1], "l2", *FAST[2:], "--finetune-lr", "0.05")
    assert "--criterion: 'l1' there, 'l2' here" in err and "--finetune-lr" in err
    assert "--criterion l1" in err and "--overwrite" in err
    # the same settings (a different device/progress is fine) resume: the finished run is returned as is
    code = main(["--checkpoint", str(base), "--out", str(out), "--resume", "--finetune-epochs", "1", *FAST])
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["criterion"] == "l1"


def test_resume_and_overwrite_together_are_refused(base, tmp_path, capsys):
    err = _fails(capsys, "--checkpoint", base, "--out", tmp_path / "p.pt", "--resume", "--overwrite", *FAST)
    assert "one of them" in err


def test_foreign_out_is_not_resumed(base, tmp_path, capsys):
    out = tmp_path / "p.pt"
    ckpt.atomic_save({"not": "ours"}, out)
    err = _fails(capsys, "--checkpoint", base, "--out", out, "--resume", *FAST)
    assert "--resume" in err and "--overwrite" in err


def test_ctrl_c_before_any_finetuning_epoch_says_nothing_is_saved(base, tmp_path, capsys, monkeypatch):
    import pruning_env.cli.prune as prune_module

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prune_module, "finalize", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(base), "--out", str(tmp_path / "p.pt"), *FAST])
    assert exc.value.code == 130 and "nothing was saved" in capsys.readouterr().err


def test_resume_with_another_plan_file_is_refused(base, tmp_path, capsys):
    from pruning_env.engine.plan import PruningPlan

    out = tmp_path / "p.pt"
    assert main(["--checkpoint", str(base), "--out", str(out), "--finetune-epochs", "1", *FAST]) == 0
    plan = PruningPlan.from_dict(ckpt.load(out).plan)
    same, other = tmp_path / "same.json", tmp_path / "other.json"
    same.write_text(plan.to_json())
    layer = plan.layers[0]
    other.write_text(PruningPlan({**plan.keep, layer: plan.keep[layer][:1]}, plan.widths).to_json())
    capsys.readouterr()
    err = _fails(capsys, "--checkpoint", base, "--out", out, "--resume", "--plan", other, "--finetune-epochs", "1",
                 *FAST)
    assert "another plan" in err
