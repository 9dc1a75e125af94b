"""Removed with the ``-v0`` env ids: importing it raises an ``ImportError`` naming ``filter_pruning_v1``."""

from pruning_env.envs.registry import REMOVED_VERSIONS

raise ImportError("pruning_env.filter_pruning_v0 was removed: use pruning_env.filter_pruning_v1; "
                  f"{REMOVED_VERSIONS[0]}")
