"""Registered environments: PettingZoo 1.27 registry ids and Gymnasium single-agent views.

Ids (namespace ``pruning_env``, version :data:`VERSION`)::

    pruning_env/Tiny-v1                          4-layer CNN on seeded synthetic data (tests, tutorials)
    pruning_env/{VGG11,VGG13,VGG16,VGG19,AlexNet,ResNet56}-{CIFAR10,CIFAR100}-v1

PettingZoo (``ParallelEnv``): ``pettingzoo.make("parallel", id, **kwargs)`` or
``pruning_env.make(id, **kwargs)``. Gymnasium single-agent views of the same
problem: ``gymnasium.make(id.replace("-v1", "-Joint-v1"))`` (one joint action for
all layers), ``...-Sequential-v1`` (AMC-style, one layer per step, a keep ratio) and
``...-SequentialDiscrete-v1`` (the same with a ``Discrete(K)`` rate-grid action, for DQN).
Gymnasium finds a namespace only once its package is imported; without an import, name the
module: ``gymnasium.make("pruning_env:pruning_env/Tiny-Joint-v1")``.

Versions (``FilterPruningEnv``'s "Version History", README "Version history"): ``-v0`` ids are
removed, as Gymnasium and PettingZoo do with an outdated version: their behaviour changed under
the same id and was released as ``-v1``. ``pruning_env.make`` of a ``-v0`` id raises a
``ValueError`` naming its ``-v1`` id and what changed (:func:`check_env_id`);
``pettingzoo.make`` / ``gymnasium.make`` raise their own "version not found" / "deprecated"
errors, which name ``v1``.

A CIFAR env needs a trained baseline: pass ``model=`` (an ``nn.Module``) or
``checkpoint=`` (a path); otherwise it is looked up in the cache
(:func:`pruning_env.train.default_checkpoint_path`) and, if missing, trained there
with progress bars (this takes a while on a CPU: it says so).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any

import gymnasium
import pettingzoo
import torch
from torch import nn

from pruning_env.core.config import resolve_device
from pruning_env.core.data import CIFAR_SOURCES, Splits, load_splits, make_synthetic
from pruning_env.envs.config import EnvConfig
from pruning_env.envs.env import FilterPruningEnv

__all__ = [
    "TINY_ID",
    "VERSION",
    "EnvIdParts",
    "baseline_model",
    "check_env_id",
    "list_envs",
    "make",
    "make_benchmark_env",
    "make_surrogate_env",
    "make_tiny_env",
    "make_vec",
    "parse_env_id",
    "real_env_id",
    "register_all",
]

NAMESPACE = "pruning_env"
#: The version of every registered id (``-v1``); bumped whenever the env's behaviour changes.
VERSION = 1
#: Removed versions and what changed since (said in the error an id of that version raises).
REMOVED_VERSIONS = {
    0: "the env changed under the -v0 ids (the default reward became budget with an exact MACs budget, "
       "observations grew to 28 + K features, infos became fixed-shape floats: INFO_KEYS) and that behaviour is "
       "released as -v1; the -v0 behaviour is not available (see the README's 'Version history')",
}
NETWORK_NAMES = {"vgg11": "VGG11", "vgg13": "VGG13", "vgg16": "VGG16", "vgg19": "VGG19", "alexnet": "AlexNet",
         "resnet56": "ResNet56"}
_DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
TINY_ENV_DEFAULTS = dict(calib_size=64, eval_size=256, eval_batch_size=256, bn_recal_batches=1,
                         bn_recal_batch_size=128)
TINY_NUM_CLASSES = 4  # the classes of Tiny-v1's synthetic data
_registered = False


def real_env_id(net: str, dataset: str) -> str:
    """The registered id of a network's real env (``vgg16``, ``cifar10`` -> ``pruning_env/VGG16-CIFAR10-v1``)."""
    return f"{NAMESPACE}/{NETWORK_NAMES[net]}-{_DATASETS[dataset]}-v{VERSION}"


#: The id of the tiny problem (tests, tutorials, smoke runs).
TINY_ID = f"{NAMESPACE}/Tiny-v{VERSION}"


@dataclasses.dataclass(frozen=True)
class EnvIdParts:
    """What an env id names: the network (a :func:`pruning_env.core.models.list_models` name), the data set
    (``cifar10``, ``cifar100``; ``synthetic`` for Tiny) and that data set's class count (the model's outputs)."""

    net: str
    dataset: str
    num_classes: int


_ID_PATTERN = re.compile(rf"{NAMESPACE}/(?:(?P<tiny>Tiny)|(?P<net>[A-Za-z0-9]+)-(?P<data>[A-Za-z0-9]+))-v{VERSION}")


def parse_env_id(env_id: str) -> EnvIdParts:
    """The network, data set and class count of a pruning env id (``pruning_env/VGG16-CIFAR100-v1`` ->
    ``vgg16``, ``cifar100``, 100), the one reading of ids for every script; the inverse of the registration.

    Raises:
        ValueError: for a string that is not a pruning env id, naming the registered ones.
    """
    check_env_id(env_id)  # an unknown id, or a removed version (named with the current one)
    if "-Surrogate-" in env_id:
        raise ValueError(f"{env_id} is a surrogate env: it predicts measurements and has no network to prune, "
                         f"fine-tune or score; use the real env {env_id.replace('-Surrogate', '')} here")
    match = _ID_PATTERN.fullmatch(env_id)
    nets = {label: net for net, label in NETWORK_NAMES.items()}
    datasets = {label: name for name, label in _DATASETS.items()}
    if match and match["tiny"]:
        return EnvIdParts("tiny", "synthetic", TINY_NUM_CLASSES)
    if not match or match["net"] not in nets or match["data"] not in datasets:
        register_all()
        raise ValueError(f"unknown env id {env_id!r}; registered: {', '.join(list_envs())}")
    dataset = datasets[match["data"]]
    return EnvIdParts(nets[match["net"]], dataset, CIFAR_SOURCES[dataset]["num_classes"])


def baseline_model(
    net: str,
    dataset: str,
    *,
    width: float = 1.0,
    epochs: int = 30,
    data_dir: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> nn.Module:
    """The cached trained baseline ``net`` on ``dataset``; trains and caches it if missing."""
    from pruning_env.core.checkpoint import load, run_lock
    from pruning_env.training.train import TrainConfig, default_checkpoint_path, recipe_mismatch, train

    path = default_checkpoint_path(net, dataset, width, epochs)
    with run_lock(path, "the baseline cache", file=True, wait=True):
        pass  # another process is training this baseline: wait for it, then use (or resume) what it left
    partial = load(path) if path.is_file() else None
    if partial is not None and "test_acc" in partial.metrics:  # a finished run (a partial one is resumed below)
        return partial.model
    print(f"pruning_env: no trained {net} (width {width:g}, {epochs} epochs) on {dataset} in the cache; "
          f"training it now into {path} (resumable; pass model= or checkpoint= to use your own)", file=sys.stderr)
    cfg = TrainConfig(net=net, dataset=dataset, data_dir=None if data_dir is None else str(data_dir), width=width,
                      epochs=epochs, device=device, out=str(path), resume=partial is not None, progress=progress)
    if partial is not None and partial.train_config is not None:  # continue with the recipe it was started with
        cfg = dataclasses.replace(cfg, **{k: old for k, (old, _) in recipe_mismatch(cfg, partial.train_config).items()})
    train(cfg)  # holds the lock of the cache file itself: a run that started meanwhile makes it refuse, naming it
    return load(path).model


def make_benchmark_env(
    net: str,
    dataset: str,
    *,
    width: float = 1.0,
    model: nn.Module | None = None,
    checkpoint: str | None = None,
    splits: Splits | None = None,
    data_dir: str | None = None,
    baseline_epochs: int = 30,
    device: str = "auto",
    max_cycles: int | None = None,
    **env_kwargs: Any,
) -> FilterPruningEnv:
    """A :class:`FilterPruningEnv` for a registered network / data set pair.

    Args:
        net, dataset: e.g. ``"vgg16"``, ``"cifar10"``.
        width: channel multiplier of the baseline (when it is looked up or trained).
        model, checkpoint: your trained baseline (an ``nn.Module`` or a checkpoint path).
        splits: pre-loaded data (else loaded from ``data_dir`` / ``$PRUNING_ENV_DATA``).
        baseline_epochs: epochs of the cached baseline to look up or train.
        env_kwargs: fields of :class:`EnvConfig`.
    """
    dev = resolve_device(device)
    if splits is None:
        splits = load_splits(dataset, data_dir)
    source: nn.Module | str
    if model is not None:
        source = model
    elif checkpoint is not None:
        source = checkpoint
    else:
        source = baseline_model(net, dataset, width=width, epochs=baseline_epochs, data_dir=data_dir,
                                device=str(dev))
    return FilterPruningEnv(source, splits, EnvConfig(), max_cycles=max_cycles, device=dev, **env_kwargs)


def _tiny_splits() -> Splits:
    return make_synthetic(num_classes=TINY_NUM_CLASSES, n_train=1024, n_test=256, seed=0).splits(val_fraction=0.25,
                                                                                                 seed=0)


def _tiny_baseline() -> nn.Module:
    """The Tiny-v1 baseline: a 4-conv CNN trained for a few seconds on synthetic data, cached."""
    from pruning_env.core.checkpoint import load, run_lock
    from pruning_env.core.config import seed_everything
    from pruning_env.core.models import build
    from pruning_env.training.train import TrainConfig, default_checkpoint_path, fit

    path = default_checkpoint_path("tiny", "synthetic", 1.0, TINY_NUM_CLASSES)
    # locked while read or trained: a process training it meanwhile is waited for, and its result used
    with run_lock(path, "the Tiny-v1 baseline cache", file=True, wait=True):
        if path.is_file():
            try:
                return load(path).model
            except Exception:
                path.unlink()
        seed_everything(0)
        model = build("tiny", num_classes=TINY_NUM_CLASSES)
        cfg = TrainConfig(net="tiny", dataset="synthetic", epochs=4, batch_size=64, lr=0.05, device="cpu",
                          progress=False, channels_last=False, aug_copies=1, ema_decay=0.0, cutout=0)
        fit(model, _tiny_splits(), cfg, out=path)
        return model


def make_tiny_env(*, max_cycles: int | None = None, device: str = "cpu", **env_kwargs: Any) -> FilterPruningEnv:
    """``pruning_env/Tiny-v1``: a tiny CNN on seeded synthetic data; episodes take well under a second."""
    kwargs = {**TINY_ENV_DEFAULTS, **env_kwargs}
    return FilterPruningEnv(_tiny_baseline(), _tiny_splits(), EnvConfig(), max_cycles=max_cycles,
                            device=torch.device(device), **kwargs)


def make_surrogate_env(data: str, *, max_cycles: int | None = None, **env_kwargs: Any) -> FilterPruningEnv:
    """A surrogate env (:class:`pruning_env.envs.surrogate.SurrogatePruningEnv`) of a data set file."""
    from pruning_env.envs.surrogate import SurrogatePruningEnv

    return SurrogatePruningEnv(data, max_cycles=max_cycles, **env_kwargs)


def list_envs() -> list[str]:
    """Ids of the registered pruning environments."""
    return sorted(k for k in pettingzoo.parallel_registry if k.startswith(f"{NAMESPACE}/"))


def check_env_id(env_id: str) -> str:
    """``env_id`` if it is registered; else ``ValueError``: for a removed ``-v0`` id, naming its ``-v1`` id and
    what changed, for any other, listing the registered ids."""
    register_all()
    if env_id in pettingzoo.parallel_registry:
        return env_id
    stem, _, version = env_id.rpartition("-v")
    current = f"{stem}-v{VERSION}"
    if version.isdigit() and int(version) in REMOVED_VERSIONS and current in pettingzoo.parallel_registry:
        raise ValueError(f"env id {env_id!r} was removed: use {current!r}; {REMOVED_VERSIONS[int(version)]}")
    hint = ""
    if "-Surrogate-" in env_id:  # a surrogate of a network without shipped data
        hint = (". No surrogate data is shipped for it: measure it on the real env (from a checkout of the "
                "repository: python -m benchmarks.surrogate_data --net <net> --dataset <dataset> --width <width> "
                "--checkpoint <your.pt> --out <file>.npz) and pass the file to "
                "pruning_env.envs.surrogate.SurrogatePruningEnv")
    raise ValueError(f"unknown env id {env_id!r}; registered: {', '.join(list_envs())}{hint}")


def make(env_id: str, **kwargs: Any) -> FilterPruningEnv:
    """``pettingzoo.make("parallel", env_id, **kwargs)`` with a helpful error for unknown or removed ids."""
    return pettingzoo.make("parallel", check_env_id(env_id), **kwargs)


def make_vec(env_id: str, num_envs: int, **kwargs: Any) -> Any:
    """``num_envs`` episodes of a registered surrogate env (an id with ``Surrogate``) stepped at once: a
    :class:`~pruning_env.envs.surrogate_vector.SurrogateVectorEnv` (``kwargs``: the env's settings). A real env
    measures each plan on a network; to spread its plans over cores or machines, see ``--workers``."""
    from pruning_env.envs.surrogate_vector import SurrogateVectorEnv

    return SurrogateVectorEnv(env_id, num_envs, **kwargs)  # its make() checks the id


def _joint(env_id: str, **kwargs: Any) -> gymnasium.Env:
    from pruning_env.envs.views import JointPruningEnv

    return JointPruningEnv(make(env_id, **kwargs))


def _sequential(env_id: str, **kwargs: Any) -> gymnasium.Env:
    from pruning_env.envs.views import SequentialPruningEnv

    return SequentialPruningEnv(make(env_id, **kwargs))


def _sequential_discrete(env_id: str, **kwargs: Any) -> gymnasium.Env:
    from pruning_env.envs.views import SequentialDiscretePruningEnv

    return SequentialDiscretePruningEnv(make(env_id, **kwargs))


VIEWS = {"Joint": _joint, "Sequential": _sequential, "SequentialDiscrete": _sequential_discrete}


def register_all() -> None:
    """Register every env id with PettingZoo and the single-agent views with Gymnasium (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    ids = {TINY_ID: (make_tiny_env, {})}
    for net in NETWORK_NAMES:
        for dataset in _DATASETS:
            ids[real_env_id(net, dataset)] = (make_benchmark_env, {"net": net, "dataset": dataset})
    from pruning_env.envs.surrogate import shipped_data

    for env_id, path in shipped_data().items():  # one surrogate env per shipped data set
        ids[env_id] = (make_surrogate_env, {"data": str(path)})
    for env_id, (entry, kwargs) in ids.items():
        pettingzoo.register("parallel", env_id, entry, kwargs=kwargs)
        for view, creator in VIEWS.items():
            gym_id = env_id.replace(f"-v{VERSION}", f"-{view}-v{VERSION}")
            if gym_id not in gymnasium.registry:
                gymnasium.register(gym_id, entry_point=creator, kwargs={"env_id": env_id})
