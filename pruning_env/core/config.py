"""Config and run helpers every layer shares: documented dataclass fields, seeding, devices.

Write config fields as ``x: int = option(5, "what x is")``: the help text is the field's
``metadata["help"]``, from which :mod:`pruning_env.cli.options` generates ``--help``.
Configs are COMPOSED, never copied: a config that needs another config's settings holds
it whole, as a field written ``scoring: ScoringConfig = nested(ScoringConfig)``. Every
leaf setting has one flat name (the field name, or ``<prefix>_<field>``) that flags,
keyword overrides (:func:`with_overrides`) and reports (:func:`flat_dict`) use.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
import torch

__all__ = ["flat_dict", "flat_names", "get_setting", "nested", "option", "resolve_device", "seed_everything",
           "with_overrides"]


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help text (used for ``--help``)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise check the name is usable."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's legacy global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def nested(cls: type, help: str = "", *, prefix: str = "", default: Any = None) -> Any:
    """A dataclass field holding a whole sub-config (composition instead of copied fields).

    Its flags are the sub-config's own, named ``--<prefix>-<field>`` (``prefix=""``: the
    field names as they are, which must then be unique across the composed config).
    ``default`` is an instance to start from (else ``cls()``); use it only where a
    command's purpose needs another starting point, and say why in ``help``.
    """
    factory = (lambda: dataclasses.replace(default)) if default is not None else cls
    return dataclasses.field(default_factory=factory, metadata={"help": help, "nested": cls, "prefix": prefix})


def _nested_fields(cfg: Any) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cfg) if "nested" in f.metadata]


def flat_names(cls: type) -> dict[str, tuple[str, ...]]:
    """``{flat name: path}`` of every leaf setting of a composed config class.

    A leaf's flat name is its field name with the prefixes of the nested fields above it
    (``finetune`` + ``lr`` -> ``finetune_lr``); the path is the chain of attribute names
    that reaches it (``("finetune", "lr")``). Raises ``TypeError`` on a flat-name clash.
    """
    out: dict[str, tuple[str, ...]] = {}
    for f in dataclasses.fields(cls):
        if "nested" in f.metadata:
            pre = f.metadata["prefix"]
            for name, path in flat_names(f.metadata["nested"]).items():
                flat = f"{pre}_{name}" if pre else name
                if flat in out:
                    raise TypeError(f"{cls.__name__}: setting {flat!r} is defined twice ({out[flat]} and "
                                    f"{(f.name, *path)}); give a nested config a prefix")
                out[flat] = (f.name, *path)
        else:
            if f.name in out:
                raise TypeError(f"{cls.__name__}: setting {f.name!r} is defined twice")
            out[f.name] = (f.name,)
    return out


def get_setting(cfg: Any, name: str) -> Any:
    """The value of the leaf setting ``name`` (a flat name, see :func:`flat_names`) of ``cfg``."""
    path = flat_names(type(cfg)).get(name)
    if path is None:
        raise KeyError(name)
    value = cfg
    for part in path:
        value = getattr(value, part)
    return value


def with_overrides(cfg: Any, **overrides: Any) -> Any:
    """A copy of the composed config ``cfg`` with leaf settings replaced by flat name.

    ``with_overrides(env_cfg, criterion="l1", macs_target=0.3)`` reaches into nested
    sub-configs, so callers keep passing flat keyword arguments. Unknown names raise a
    ``TypeError`` that lists the valid ones.
    """
    if not overrides:
        return cfg
    names = flat_names(type(cfg))
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"{type(cfg).__name__} has no setting(s) {', '.join(unknown)}; "
                        f"valid settings: {', '.join(sorted(names))}")
    return _replace_paths(cfg, {names[k]: v for k, v in overrides.items()})


def _replace_paths(cfg: Any, values: dict[tuple[str, ...], Any]) -> Any:
    direct = {p[0]: v for p, v in values.items() if len(p) == 1}
    deeper: dict[str, dict[tuple[str, ...], Any]] = {}
    for p, v in values.items():
        if len(p) > 1:
            deeper.setdefault(p[0], {})[p[1:]] = v
    for name, sub in deeper.items():
        direct[name] = _replace_paths(getattr(cfg, name), sub)
    return dataclasses.replace(cfg, **direct)


def flat_dict(cfg: Any) -> dict[str, Any]:
    """``{flat name: value}`` of every leaf setting (JSON-friendly: tuples become lists)."""
    out = {}
    for name in flat_names(type(cfg)):
        value = get_setting(cfg, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out
