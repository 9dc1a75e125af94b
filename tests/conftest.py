"""Shared fixtures: small data sets made by the tests, and the real CIFAR-10 when present.

The suite's rule for numbers: results are compared bit for bit only within one machine, between two runs
made in the same test (or the same session). Floating-point kernels differ between CPU vendors and
instruction sets, so a value recorded on another machine is compared only with a tolerance that survives a
change of CPU (e.g. ``rel=1e-5`` on losses, equal accuracies on tiny data), and a digest of weights is never
compared with one recorded elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# One intra-op thread for the whole suite: the models here are small, and on a shared 2-core
# machine two OpenMP threads can be far slower than one (the suite also ran 2x faster in CI).
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep the package's cache (decoded data, baselines) out of the user's home: session-wide, so the
    module-scoped fixtures (set up before any function-scoped one) use the same cache as the tests."""
    cache = tmp_path_factory.getbasetemp() / "xdg-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        yield


def write_image_folder(root: Path, *, classes: int = 3, per_class: int = 6, size: int = 32, mode: str = "RGB",
                       fmt: str = "png", seed: int = 0) -> Path:
    """Write a tiny image-folder data set ``root/{train,test}/<class>/*.<fmt>``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    for split, n in (("train", per_class), ("test", max(2, per_class // 2))):
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
                Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode).save(d / f"{i:04d}.{fmt}")
    return root


def exit_status(main, argv: list[str]) -> int:
    """The exit status of a command's ``main(argv)``: its return value, or the code of the ``SystemExit`` that
    argparse raises for a flag it refuses itself."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def interrupt_training(monkeypatch, module, episode: int) -> None:
    """Make ``module.agents.make_algorithm`` build algorithms whose ``episode``-th ``train_episode`` raises
    ``KeyboardInterrupt`` (a Ctrl-C mid-search); pass a ``pytest.MonkeyPatch.context()`` to restore it after."""
    real_make = module.agents.make_algorithm

    def make_interrupted(*args, **kwargs):
        algo = real_make(*args, **kwargs)
        real_episode, calls = algo.train_episode, {"n": 0}

        def train_episode():
            calls["n"] += 1
            if calls["n"] == episode:
                raise KeyboardInterrupt
            return real_episode()

        algo.train_episode = train_episode
        return algo

    monkeypatch.setattr(module.agents, "make_algorithm", make_interrupted)


def cifar_root() -> Path | None:
    """``$PRUNING_ENV_DATA`` if it holds the real CIFAR-10 image folder, else None."""
    env = os.environ.get("PRUNING_ENV_DATA")
    if env and (Path(env) / "cifar10" / "train").is_dir():
        return Path(env)
    return None


requires_cifar = pytest.mark.skipif(cifar_root() is None, reason="real CIFAR-10 not found under $PRUNING_ENV_DATA")


@pytest.fixture(scope="session")
def tiny_env_factory(tmp_path_factory):
    """Build Tiny-v1 envs (the baseline is trained once per session into a temp cache)."""
    import pruning_env  # noqa: F401  (registers the envs)
    from pruning_env.envs.registry import make_tiny_env

    def factory(**kwargs):
        return make_tiny_env(**kwargs)

    return factory


@pytest.fixture(scope="session")
def cifar_vgg16():
    """A briefly trained VGG-16 (width 0.25) on the real CIFAR-10 and its splits.

    One epoch on 10,000 training images (about 40 % accuracy): enough for the
    environment's tests, which check mechanics and bookkeeping, not accuracy.
    """
    root = cifar_root()
    if root is None:
        pytest.skip("real CIFAR-10 not found under $PRUNING_ENV_DATA")
    from pruning_env.core.config import seed_everything
    from pruning_env.core.data import Split, load_splits
    from pruning_env.core.models import build
    from pruning_env.training.train import TrainConfig, fit

    splits = load_splits("cifar10", root)
    small = type(splits)(**{**splits.__dict__, "train": splits.train.subset(10_000)})
    seed_everything(0)
    model = build("vgg16", num_classes=10, width=0.25)
    # the plain recipe (no batch augmentation, EMA or Cutout): the thresholds downstream were set
    # on it, and it costs half the default's compute
    fit(model, small, TrainConfig(epochs=1, batch_size=128, lr=0.05, progress=False, aug_copies=1, ema_decay=0.0,
                                  cutout=0))
    assert isinstance(small.train, Split)
    return model.eval(), splits


LONG_HINT = "run `python -m pytest --long` to include them (.ci/run does)"


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="also run the tests marked `long` (real-data and end-to-end runs; .ci/run passes it)")


def pytest_collection_modifyitems(config, items):
    """Every test that needs the real CIFAR-10 carries the ``cifar`` marker (``-m "not cifar"`` skips them all),
    and every ``cifar`` test is ``long``. Without ``--long`` the ``long`` tests are skipped, saying how to run them:
    the README's test command stays short, and ``.ci/run`` runs them all."""
    run_long = config.getoption("--long")
    skip_long = pytest.mark.skip(reason=f"long test: {LONG_HINT}")
    for item in items:
        if "cifar_vgg16" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cifar)
        if "cifar" in item.keywords and "long" not in item.keywords:
            item.add_marker(pytest.mark.long)
        if "long" in item.keywords and not run_long:
            item.add_marker(skip_long)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "long test:" in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} long tests skipped: {LONG_HINT}")
