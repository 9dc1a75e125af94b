"""pruning-env: CNN filter pruning as a multi-agent reinforcement-learning problem.

Importing the package registers its environments with PettingZoo's registry
(``pruning_env/Tiny-v1``, ``pruning_env/VGG16-CIFAR10-v1``, ...) and their
single-agent views with Gymnasium (``...-Joint-v1``, ``...-Sequential-v1``,
``...-SequentialDiscrete-v1``; without importing the package first, name it in the id:
``gymnasium.make("pruning_env:pruning_env/Tiny-Joint-v1")``). The ``-v0`` ids were removed
(making one says why and names its ``-v1`` id): see the README's "Version history".

The public API is what ``__all__`` lists:

* the env: :func:`make` / :func:`list_envs` / :func:`register_all` (the registry), :func:`make_vec` (many
  surrogate episodes at once), :class:`FilterPruningEnv`
  (the PettingZoo ``ParallelEnv``), its settings :class:`EnvConfig`, THE record of a measurement
  :class:`Measurement` (what ``env.measure(plan)`` returns) and the single-agent Gymnasium views
  :class:`JointPruningEnv`, :class:`SequentialPruningEnv`, :class:`SequentialDiscretePruningEnv`;
* pruning without the env: :class:`PruningPlan` and :func:`apply` (the engine), :func:`score` and
  :func:`list_criteria` (filter importance), :func:`count_macs`;
* models and data: :func:`build`, :func:`list_models`, :func:`load_splits` and :class:`Splits`.

The layers (``core``, ``criteria``, ``engine``, ``training``, ``envs``, ``search``, ``cli``) are importable
subpackages with their own ``__all__`` (see the README's "Architecture" section); helpers around an env
are in :mod:`pruning_env.envs.plans`.
"""

from __future__ import annotations

from pruning_env.core.data import Splits, load_splits
from pruning_env.core.models import build, list_models
from pruning_env.criteria import list_criteria, score
from pruning_env.engine import PruningPlan, apply
from pruning_env.engine.flops import count as count_macs
from pruning_env.envs.config import EnvConfig
from pruning_env.envs.env import FilterPruningEnv
from pruning_env.envs.measure import Measurement
from pruning_env.envs.registry import list_envs, make, make_vec, register_all
from pruning_env.envs.views import JointPruningEnv, SequentialDiscretePruningEnv, SequentialPruningEnv

register_all()

__version__ = "0.1.0"

__all__ = [
    "EnvConfig",
    "FilterPruningEnv",
    "JointPruningEnv",
    "Measurement",
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
    "make_vec",
    "register_all",
    "score",
]
