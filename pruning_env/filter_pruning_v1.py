"""PettingZoo's versioned-module style: ``from pruning_env import filter_pruning_v1``.

``parallel_env(**kwargs)`` builds a :class:`~pruning_env.envs.env.FilterPruningEnv`: with
``model=`` and ``splits=`` your own network and data, otherwise the ``Tiny-v1`` problem.
``env(**kwargs)`` / ``raw_env(**kwargs)`` give its AEC version (``pettingzoo.utils.parallel_to_aec``).
All accept ``max_cycles`` (= episode length). The module's version is the env ids' (``-v1``, see
the env's "Version History"); ``filter_pruning_v0`` was removed with the ``-v0`` ids.
"""

from __future__ import annotations

from typing import Any

from pettingzoo.utils import parallel_to_aec
from pettingzoo.utils.env import AECEnv

from pruning_env.envs.config import EnvConfig
from pruning_env.envs.env import FilterPruningEnv
from pruning_env.envs.registry import make_tiny_env

__all__ = ["env", "parallel_env", "raw_env"]


def parallel_env(model: Any = None, splits: Any = None, **kwargs: Any) -> FilterPruningEnv:
    """The parallel env: your ``model`` + ``splits``, or ``Tiny-v1`` when both are omitted."""
    if model is None and splits is None:
        return make_tiny_env(**kwargs)
    if model is None or splits is None:
        raise ValueError("pass both model= and splits= (or neither, for the Tiny-v1 problem)")
    return FilterPruningEnv(model, splits, kwargs.pop("config", None) or EnvConfig(), **kwargs)


def raw_env(**kwargs: Any) -> AECEnv:
    """The AEC version of :func:`parallel_env`."""
    return parallel_to_aec(parallel_env(**kwargs))


env = raw_env
