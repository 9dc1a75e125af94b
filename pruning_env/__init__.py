"""pruning-env: CNN filter pruning as a multi-agent reinforcement-learning problem.

Public API (see the README): models, data, FLOPs counting, checkpoints, training.
"""

from __future__ import annotations

from . import checkpoint, data, flops, models
from .flops import count as count_macs
from .models import build, list_models

__version__ = "0.1.0"

__all__ = ["build", "list_models", "count_macs", "checkpoint", "data", "flops", "models", "__version__"]
