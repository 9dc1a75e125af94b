"""pruning-env: CNN filter pruning as a multi-agent reinforcement-learning problem.

Importing the package registers its environments with PettingZoo's registry
(``pruning_env/Tiny-v0``, ``pruning_env/VGG16-CIFAR10-v0``, ...) and their
single-agent views with Gymnasium (``...-Joint-v0``, ``...-Sequential-v0``).
"""

from __future__ import annotations

from . import checkpoint, criteria, data, flops, models, pruning
from .criteria import score
from .data import load_splits
from .env import EnvConfig, FilterPruningEnv
from .flops import count as count_macs
from .models import build, list_models
from .pruning import PruningPlan, apply
from .registry import list_envs, make, register_all
from .wrappers import JointPruningEnv, SequentialPruningEnv

register_all()

__version__ = "0.1.0"

__all__ = [
    "EnvConfig",
    "FilterPruningEnv",
    "JointPruningEnv",
    "SequentialPruningEnv",
    "PruningPlan",
    "apply",
    "build",
    "count_macs",
    "list_envs",
    "list_models",
    "load_splits",
    "make",
    "score",
    "checkpoint",
    "criteria",
    "data",
    "flops",
    "models",
    "pruning",
    "__version__",
]
