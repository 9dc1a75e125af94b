"""Command-line helpers: argparse flags generated from config dataclasses.

Every field of a config dataclass becomes ``--field-name``; its help text is the
field's ``metadata["help"]`` (write fields as ``x: int = field(5, "what x is")``
with :func:`option`), so ``--help`` documents every flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import types
import typing
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = ["add_config_args", "config_from_args", "print_json"]

T = TypeVar("T")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_optional) of an annotation such as ``int | None`` or ``list[float]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def add_config_args(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of dataclass ``cls`` to ``parser``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, _ = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(tp) in (list, tuple):
            (elem,) = typing.get_args(tp)[:1]
            parser.add_argument(flag, type=elem, nargs="+", default=default, help=f"{help_text} (default: {default})")
        else:
            conv = tp if tp in (int, float, str) else str
            if _base_type(hints[f.name])[1]:  # Optional: the word "none" gives None
                conv = (lambda c: (lambda v: None if v.lower() == "none" else c(v)))(conv)
            kw: dict[str, Any] = {"type": conv, "default": default}
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            parser.add_argument(flag, help=f"{help_text} (default: {default})", **kw)


def config_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build a ``cls`` from parsed args (fields missing from ``args`` keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)  # type: ignore[call-arg]


def print_json(obj: dict[str, Any]) -> None:
    """Print one JSON line (the last line of every CLI's output)."""
    print(json.dumps(obj, default=str), flush=True)
