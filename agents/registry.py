"""The registry that names the algorithms: ``@register("name")``, :func:`get_algorithm`, :func:`make_algorithm`.

The plug-in interface itself (:class:`agents.base.Algorithm`) is in :mod:`agents.base`; an algorithm in a
file of its own registers with ``@register`` and is then found by name, or by ``"module:name"``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from agents.base import ENV_APIS, Algorithm

__all__ = ["get_algorithm", "list_algorithms", "make_algorithm", "register"]

_REGISTRY: dict[str, type[Algorithm]] = {}
A = TypeVar("A", bound=type[Algorithm])


def register(name: str) -> Callable[[A], A]:
    """Class decorator: make an :class:`Algorithm` subclass available as ``name``."""

    def decorator(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
            raise TypeError(f"@register({name!r}) must decorate an Algorithm subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"algorithm name {name!r} is already registered by {_REGISTRY[name]!r}")
        if not dataclasses.is_dataclass(getattr(cls, "config_cls", None)):
            raise TypeError(f"{cls.__name__}.config_cls must be a dataclass")
        if cls.env_api not in ENV_APIS:
            raise TypeError(f"{cls.__name__}.env_api must be one of {ENV_APIS}, got {cls.env_api!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_algorithms() -> list[str]:
    """Registered algorithm names, sorted."""
    return sorted(_REGISTRY)


def get_algorithm(name: str) -> type[Algorithm]:
    """The class registered as ``name``.

    ``"package.module:name"`` first imports ``package.module`` (whose ``@register``
    decorators then run), so an algorithm in a new file can be used without editing
    this package.
    """
    if ":" in name:
        module, _, name = name.rpartition(":")
        importlib.import_module(module)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown algorithm {name!r}; known: {', '.join(list_algorithms())} "
            "(or 'module:name' to import a module that registers it)"
        ) from None


def make_algorithm(
    name: str,
    env: Any,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    config: Any | None = None,
    **overrides: Any,
) -> Algorithm:
    """Build the algorithm registered as ``name`` on ``env``.

    ``env`` must be of the API the class names in :attr:`Algorithm.env_api` (a
    PettingZoo ``ParallelEnv`` for ``"parallel"``, a one-layer-per-step Gymnasium env
    for ``"sequential"``); ``get_algorithm(name).env_api`` tells a caller which to build.
    ``overrides`` that name fields of the algorithm's config dataclass are applied to
    ``config`` (or to the algorithm's default config); any other keyword must be a
    keyword-only parameter of the algorithm's constructor (plug-ins may have some; the
    built-in algorithms have none). Unknown keywords raise ``TypeError`` listing the
    valid ones.
    """
    cls = get_algorithm(name)
    config_fields, init_params = cls.option_names()
    unknown = set(overrides) - config_fields - init_params
    if unknown:
        raise TypeError(
            f"{name}: unknown option(s) {sorted(unknown)}; config fields: {sorted(config_fields)}"
            + (f"; constructor options: {sorted(init_params)}" if init_params else "")
        )
    cfg_over = {k: v for k, v in overrides.items() if k in config_fields}
    init_kw = {k: v for k, v in overrides.items() if k not in config_fields}
    if config is None:
        config = cls.default_config(**cfg_over)
    elif cfg_over:
        config = dataclasses.replace(config, **cfg_over)
    return cls(env, config, seed=seed, device=device, **init_kw)
