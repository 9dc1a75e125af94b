"""pruning-env: CNN filter pruning as a multi-agent reinforcement-learning problem.

Importing the package registers its environments with PettingZoo's registry
(``pruning_env/Tiny-v0``, ``pruning_env/VGG16-CIFAR10-v0``, ...) and their
single-agent views with Gymnasium (``...-Joint-v0``, ``...-Sequential-v0``,
``...-SequentialDiscrete-v0``; without importing the package first, name it in the id:
``gymnasium.make("pruning_env:pruning_env/Tiny-Joint-v0")``).

The public API is what ``__all__`` lists; the layers (``core``, ``criteria``,
``engine``, ``training``, ``envs``, ``search``, ``cli``) are importable subpackages
with their own ``__all__`` (see the README's "Architecture" section).
"""

from __future__ import annotations

from pruning_env.core.data import Splits, load_splits
from pruning_env.core.models import build, list_models
from pruning_env.criteria import list_criteria, score
from pruning_env.engine import PruningPlan, apply
from pruning_env.engine.flops import count as count_macs
from pruning_env.envs.config import EnvConfig
from pruning_env.envs.env import FilterPruningEnv
from pruning_env.envs.registry import list_envs, make, register_all
from pruning_env.envs.views import JointPruningEnv, SequentialDiscretePruningEnv, SequentialPruningEnv

register_all()

__version__ = "0.1.0"

__all__ = [
    "EnvConfig",
    "FilterPruningEnv",
    "JointPruningEnv",
    "PruningPlan",
    "SequentialDiscretePruningEnv",
    "SequentialPruningEnv",
    "Splits",
    "__version__",
    "apply",
    "build",
    "count_macs",
    "list_criteria",
    "list_envs",
    "list_models",
    "load_splits",
    "make",
    "register_all",
    "score",
]
