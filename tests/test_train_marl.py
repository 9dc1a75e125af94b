"""train_marl.py end to end on Tiny-v1 (smoke preset): every algorithm, outputs, resume, bad flags."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import interrupt_training

from pruning_env.cli import marl as train_marl
from pruning_env.core import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, *extra):
    argv = ["--env", "pruning_env/Tiny-v1", "--preset", "smoke", "--logdir", str(tmp_path), "--no-progress", *extra]
    return train_marl.main(argv)


# QMIX (discrete, mixer), AMC (continuous) and DSFP-uniform (no learning) by default; the value-decomposition
# variants and random search take the same discrete path and run with --long (.ci/run)
LONG = pytest.mark.long


@pytest.mark.parametrize("algo", ["qmix", pytest.param("vdn", marks=LONG), pytest.param("iql", marks=LONG), "amc",
                                  pytest.param("random", marks=LONG), "dsfp-uniform"])
def test_every_algorithm_writes_every_output(tmp_path, algo, tiny_env_factory):
    assert _run(tmp_path, "--algo", algo) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("algorithm", "test_acc", "baseline_test_acc", "retention", "macs_reduction", "params_reduction",
                "plan", "latency_ms_b1", "latency_ms_b64"):
        assert key in report, key
    assert report["algorithm"] == algo
    assert 0.0 <= report["macs_reduction"] < 1.0 and 0.0 <= report["test_acc"] <= 100.0
    assert report["retention"] == pytest.approx(report["test_acc"] / report["baseline_test_acc"])
    for name in ("report.md", "pareto.png", "learning_curve.png", "plan.json", "pruned_model.pt"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert any((tmp_path / "tb").iterdir())
    pruned = ckpt.load(tmp_path / "pruned_model.pt")
    assert pruned.plan == report["plan"]


def test_interrupted_search_resumes_to_the_same_plan(tmp_path, monkeypatch, tiny_env_factory):
    assert _run(tmp_path / "full", "--algo", "qmix") == 0
    reference = json.loads((tmp_path / "full" / "report.json").read_text())

    with pytest.MonkeyPatch.context() as patch:  # Ctrl-C during the 6th episode (a checkpoint was saved after the 4th)
        interrupt_training(patch, train_marl, 6)
        assert _run(tmp_path / "cut", "--algo", "qmix") == 130
    assert (tmp_path / "cut" / "train_state.pt").is_file()
    assert not (tmp_path / "cut" / "report.json").exists()
    assert _run(tmp_path / "cut", "--algo", "qmix", "--resume") == 0
    resumed = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert resumed["plan"] == reference["plan"]
    assert resumed["search"] == reference["search"]


@pytest.mark.parametrize("flags,message", [
    (["--net", "vgg17"], "invalid choice: 'vgg17'"),
    (["--algo", "nope"], "unknown algorithm 'nope'"),
    (["--dataset", "imagenet-nope"], "unknown data set 'imagenet-nope'"),
    (["--reward", "budget", "--macs-target", "0.001"], "cannot be met"),
    (["--env", "pruning_env/Nope-v1"], "unknown env id"),
    (["--env", "pruning_env/Tiny-v0"], "was removed: use 'pruning_env/Tiny-v1'"),  # the removed version
])
def test_bad_flags_fail_before_any_work(tmp_path, flags, message):
    out = subprocess.run([sys.executable, str(ROOT / "train_marl.py"), "--preset", "smoke", "--logdir",
                          str(tmp_path / "x"), *flags], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "x" / "report.json").exists()


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, str(ROOT / "train_marl.py"), "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    for flag in ("--net", "--dataset", "--data-dir", "--width", "--env", "--algo", "--episodes", "--reward", "--lam",
                 "--macs-target", "--rates", "--episode-length", "--seed", "--device", "--logdir", "--checkpoint",
                 "--finetune-epochs", "--kd", "--resume", "--preset"):
        assert flag in out.stdout, flag


def _refused(cfg) -> bool:
    try:
        train_marl.resolve(cfg)
    except ValueError as exc:
        assert "--macs-target" in str(exc) and "cannot be met" in str(exc)
        return True
    return False


def test_unreachable_target_is_judged_with_the_runs_class_count():
    """VGG-11 at width 0.125 keeps 0.0246 of its MACs on 10 classes at rate 0.9, 0.0268 on 100 classes (its
    classifier is larger): a target in between is refused on CIFAR-100 before any baseline is trained."""
    from pruning_env.envs.config import EnvConfig

    problem = EnvConfig(macs_target=0.0255)
    for dataset, refused in (("cifar10", False), ("cifar100", True)):
        cfg = train_marl.RunConfig(net="vgg11", dataset=dataset, width=0.125, problem=problem, device="cpu")
        assert _refused(cfg) is refused, dataset
        env_id = f"pruning_env/VGG11-{dataset.upper()}-v1"
        assert _refused(train_marl.RunConfig(env=env_id, width=0.125, problem=problem, device="cpu")) is refused
    # the soft budget (--no-exact-budget) allows any target, as the env does
    soft = EnvConfig(macs_target=0.001, exact_budget=False)
    assert not _refused(train_marl.RunConfig(net="vgg11", dataset="cifar100", width=0.125, problem=soft))


def test_unreachable_target_is_judged_on_an_image_folders_classes_and_images(tmp_path):
    from conftest import write_image_folder

    from pruning_env.envs.config import EnvConfig

    write_image_folder(tmp_path / "gray", classes=2, per_class=2, size=64, mode="L")
    cfg = train_marl.RunConfig(net="vgg11", dataset="gray", data_dir=str(tmp_path), width=0.125, device="cpu",
                               problem=EnvConfig(macs_target=0.021))
    assert not _refused(cfg)  # 64x64 gray images keep 0.0182 (more conv MACs to remove), CIFAR-10 0.0246
    assert _refused(dataclasses.replace(cfg, problem=EnvConfig(macs_target=0.017)))
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "test").mkdir()
    with pytest.raises(ValueError, match="--dataset empty: no image files"):
        train_marl.resolve(dataclasses.replace(cfg, dataset="empty"))


def test_the_cli_and_the_env_refuse_the_same_targets(tiny_env_factory):
    from pruning_env.engine.budget import reachable_macs
    from pruning_env.envs.config import EnvConfig

    env = tiny_env_factory()
    floor = reachable_macs(env.macs_model, env.config.rule, max(env.config.rates)) / env.base_macs
    for target in (floor * 0.999, floor * 1.001):
        try:
            tiny_env_factory(macs_target=target)
            env_refused = False
        except ValueError:
            env_refused = True
        cli = train_marl.RunConfig(env="pruning_env/Tiny-v1", problem=EnvConfig(macs_target=target), device="cpu")
        assert _refused(cli) is env_refused is (target < floor)
