"""Issue 14 for train_marl.py: earlier runs kept (case 2), resumes of other settings refused (case 3), a checkpoint
of another net refused (case 8), results independent of the baseline cache (case 9), clear errors for bad
--logdir / --algo / train_state.pt and for Ctrl-C during the final fine-tuning."""

import json
import os
import shutil

import pytest

from pruning_env.cli import marl
from pruning_env.core import checkpoint as ckpt
from pruning_env.core.models import build

FAST = ["--env", "pruning_env/Tiny-v1", "--preset", "smoke", "--algo", "dsfp-uniform", "--plans", "6",
        "--latency-repeats", "0", "--no-progress", "--device", "cpu"]


def _fails(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        marl.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    return err.splitlines()[-1]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished run's --logdir."""
    logdir = tmp_path_factory.mktemp("done") / "run"
    assert marl.main([*FAST, "--logdir", str(logdir)]) == 0
    return logdir


def test_an_earlier_run_is_not_replaced_without_overwrite(done, tmp_path, capsys):
    logdir = tmp_path / "run"
    shutil.copytree(done, logdir)
    report = (logdir / "report.json").read_text()
    err = _fails(capsys, *FAST, "--logdir", logdir)
    assert "holds an earlier run" in err and "--overwrite" in err and "--resume" in err
    assert (logdir / "report.json").read_text() == report
    events = {p.name for p in (logdir / "tb").iterdir()}
    assert marl.main([*FAST, "--logdir", str(logdir), "--overwrite"]) == 0
    assert not events & {p.name for p in (logdir / "tb").iterdir()}  # old TensorBoard files not mixed in


@pytest.mark.parametrize("flags,named", [(["--reward", "linear"], "--reward"), (["--seed", "3"], "--seed"),
                                          (["--plans", "9"], "--plans")])
def test_resume_with_other_settings_is_refused(done, capsys, flags, named):
    err = _fails(capsys, *FAST, "--logdir", done, "--resume", *flags)
    assert f"{named}:" in err and "there" in err and "--overwrite" in err


def test_resume_with_the_same_settings_is_accepted(done, capsys):
    assert marl.main([*FAST, "--logdir", str(done), "--resume", "--progress"]) == 0  # progress is run-only


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", "foreign"])
def test_unreadable_or_foreign_train_state_is_a_clear_error(done, tmp_path, capsys, content):
    logdir = tmp_path / "run"
    shutil.copytree(done, logdir)
    state = logdir / marl.STATE_FILE
    if content == "foreign":
        ckpt.atomic_save({"weights": [1, 2, 3]}, state)
    else:
        state.write_bytes(content)
    err = _fails(capsys, *FAST, "--logdir", logdir, "--resume")
    assert str(state) in err and "--overwrite" in err


def test_logdir_that_is_a_file_and_a_missing_algo_module(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in _fails(capsys, *FAST, "--logdir", f)
    err = _fails(capsys, *FAST, "--logdir", tmp_path / "r", "--algo", "nosuchmodule:name")
    assert "--algo nosuchmodule:name" in err and "nosuchmodule" in err


def test_checkpoint_of_another_net_is_refused(tmp_path, capsys):
    path = tmp_path / "vgg11.pt"
    ckpt.save(path, build("vgg11", num_classes=10, width=0.125), input_shape=(3, 32, 32), dataset="cifar10")
    err = _fails(capsys, "--net", "vgg16", "--checkpoint", path, "--preset", "smoke", "--logdir", tmp_path / "r")
    assert "--checkpoint" in err and "vgg11" in err and "vgg16" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("stage,flags", [("select_and_finalize", []), ("finalize", ["--no-selection"])])
def test_ctrl_c_during_final_finetuning_says_how_to_resume(tmp_path, monkeypatch, capsys, stage, flags):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(marl, stage, interrupted)
    assert marl.main([*FAST, *flags, "--logdir", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err
    assert "interrupted during the final fine-tuning" in err and "--resume" in err


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]])
def test_a_locked_logdir_is_refused(done, tmp_path, capsys, flags):
    logdir = tmp_path / "r"
    shutil.copytree(done, logdir)  # what the first run has written so far
    with ckpt.run_lock(logdir):
        err = _fails(capsys, *FAST, "--logdir", logdir, *flags)
    assert f"--logdir {logdir} is in use by another running process" in err and f"pid {os.getpid()}" in err


def test_result_does_not_depend_on_the_baseline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh-cache"))  # Tiny-v1's baseline is trained here
    args = ["--env", "pruning_env/Tiny-v1", "--preset", "smoke", "--latency-repeats", "0", "--no-progress",
            "--device", "cpu", "--plans", "8"]
    assert marl.main([*args, "--logdir", str(tmp_path / "trained")]) == 0
    assert marl.main([*args, "--logdir", str(tmp_path / "cached")]) == 0
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("trained", "cached"))
    for key in ("test_acc", "val_acc", "plan", "search", "finetune"):
        a_val, b_val = a[key], b[key]
        if key == "finetune":
            a_val, b_val = ({k: v for k, v in d.items() if k != "seconds"} for d in (a_val, b_val))
        if key == "search":
            a_val, b_val = ({k: v for k, v in d.items() if "second" not in k} for d in (a_val, b_val))
        assert a_val == b_val, key


# Issue 25, section 1, case 5: train_state.pt is loaded with weights_only=True; a file that would run code is refused.

class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file when unpickled


def test_a_train_state_that_would_run_code_is_refused_unrun(done, tmp_path, capsys):
    logdir = tmp_path / "run"
    shutil.copytree(done, logdir)
    state_file = logdir / marl.STATE_FILE
    import torch

    state = torch.load(state_file, weights_only=True)
    marker = tmp_path / "code-ran"
    state["best"] = _RunsCode(marker)
    torch.save(state, state_file)
    err = _fails(capsys, *FAST, "--logdir", logdir, "--resume")
    assert str(state_file) in err and "could run code" in err and "--overwrite" in err
    assert not marker.exists()


@pytest.mark.parametrize("algo", sorted(__import__("agents").list_algorithms()))
def test_every_algorithms_search_state_loads_weights_only_and_resumes(algo):
    import io

    import torch

    import agents
    import pruning_env
    from pruning_env.search import Search, SearchConfig, algorithm_env, algorithm_overrides

    def search():
        env = pruning_env.make("pruning_env/Tiny-v1")
        cls = agents.get_algorithm(algo)
        cfg = SearchConfig(plans=8, eval_every=2,
                           algo_config='{"amc": {"warmup_episodes": 1, "batch_size": 4}}' if algo == "amc" else None)
        over = algorithm_overrides(cls, algo, cfg, env.config.episode_length)
        return Search(agents.make_algorithm(algo, algorithm_env(cls, env), seed=0, **over), env, cfg, progress=False)

    first = search()
    first.run()
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    again = search()
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.points == first.points and again.best == first.best
