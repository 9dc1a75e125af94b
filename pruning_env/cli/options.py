"""Command-line helpers: argparse flags generated from config dataclasses.

Every leaf setting of a (composed) config dataclass becomes ``--flat-name``; its help
text is the field's ``metadata["help"]`` (write fields as ``x: int = option(5, "what x
is")`` with :func:`pruning_env.core.config.option`), so ``--help`` documents every flag.
Every command line of the project (the package's CLIs, ``train_marl.py`` and the
benchmarks) is built this way and ends with one JSON line printed by :func:`print_json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

from pruning_env.core.config import check_settings, flat_names, get_setting, with_overrides

__all__ = ["add_config_args", "config_from_args", "print_json"]

T = TypeVar("T")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_optional) of an annotation such as ``int | None`` or ``list[float]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def add_config_args(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                    defaults: Any | None = None) -> None:
    """Add one flag per leaf setting of the (composed) config dataclass ``cls`` to ``parser``.

    A nested sub-config (a field made with :func:`pruning_env.core.config.nested`)
    contributes its own settings, named ``--<prefix>-<field>``. A field's
    ``metadata["aliases"]`` adds further flag names (kept for older command lines).
    Flags default to ``argparse.SUPPRESS``, so the parsed namespace holds only what the
    user typed; :func:`config_from_args` applies that onto a starting config. ``--help``
    shows the defaults of ``defaults`` (an instance of ``cls``; default ``cls()``).
    """
    base = defaults if defaults is not None else cls()
    flat_names(cls)  # raises on a flat-name clash before any flag is added
    _add_fields(parser, type(base), base, "", skip)


def _add_fields(parser: argparse.ArgumentParser, cls: type, base: Any, prefix: str, skip: tuple[str, ...]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flat = f"{prefix}_{f.name}" if prefix else f.name
        if flat in skip or f.metadata.get("cli") is False:
            continue
        if "nested" in f.metadata:
            pre = f.metadata["prefix"]
            _add_fields(parser, f.metadata["nested"], getattr(base, f.name),
                        f"{prefix}_{pre}" if prefix and pre else (pre or prefix), skip)
            continue
        flags = ["--" + flat.replace("_", "-"), *("--" + a.replace("_", "-") for a in f.metadata.get("aliases", ()))]
        tp, optional = _base_type(hints[f.name])
        default = getattr(base, f.name)
        help_text = f.metadata.get("help", "")
        kw: dict[str, Any] = {"dest": flat, "default": argparse.SUPPRESS}
        if tp is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction,
                                help=f"{help_text} (default: {'on' if default else 'off'})", **kw)
        elif typing.get_origin(tp) in (list, tuple):
            (elem,) = typing.get_args(tp)[:1]
            shown = list(default) if default is not None else None
            parser.add_argument(*flags, type=elem, nargs="+", help=f"{help_text} (default: {shown})", **kw)
        else:
            conv = tp if tp in (int, float, str) else str
            if optional:  # the word "none" gives None
                conv = (lambda c: (lambda v: None if v.lower() == "none" else c(v)))(conv)
            if "choices" in f.metadata:  # a list, or a callable giving it (e.g. a registry's current names)
                choices = f.metadata["choices"]
                kw["choices"] = list(choices() if callable(choices) else choices)
            parser.add_argument(*flags, type=conv, help=f"{help_text} (default: {default})", **kw)


def config_from_args(cls: type[T], args: argparse.Namespace, *, base: T | None = None, **overrides: Any) -> T:
    """The config ``base`` (default ``cls()``) with the settings the user gave in ``args``, then ``overrides``.

    List flags of tuple-typed settings are converted to tuples.
    """
    names = flat_names(cls)
    given = {k: v for k, v in vars(args).items() if k in names}
    start = base if base is not None else cls()
    for k, v in given.items():
        if isinstance(v, list) and isinstance(get_setting(start, k), tuple):
            given[k] = tuple(v)
    cfg = with_overrides(start, **{**given, **overrides})
    check_settings(cfg)  # also configs without their own __post_init__ check (e.g. the benchmarks')
    return cfg


def print_json(obj: dict[str, Any]) -> None:
    """Print one JSON line (the last line of every CLI's output)."""
    print(json.dumps(obj, default=str), flush=True)
