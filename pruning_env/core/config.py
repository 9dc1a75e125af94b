"""Config and run helpers every layer shares: documented dataclass fields, seeding, devices.

Write config fields as ``x: int = option(5, "what x is")``: the help text is the field's
``metadata["help"]``, from which :mod:`pruning_env.cli.options` generates ``--help``.
Configs are COMPOSED, never copied: a config that needs another config's settings holds
it whole, as a field written ``scoring: ScoringConfig = nested(ScoringConfig)``. Every
leaf setting has one flat name (the field name, or ``<prefix>_<field>``) that flags,
keyword overrides (:func:`with_overrides`) and reports (:func:`flat_dict`) use.

Run-only settings: a field written ``option(..., run_only=True)`` says where or how a run executes, not what it
computes (device, paths, progress bars, workers): a resumed run may change it. Every resume check and every
settings key of stored results leaves out exactly :func:`run_only_names` of its config class, derived from
these marks (:func:`config_mismatch`, :func:`without_run_only`); no command keeps a list of its own.

Validation: every config calls :func:`check_settings` in its ``__post_init__`` (the CLIs call it
again on the composed config), so a bad value fails before any work, with a
:class:`SettingError` naming the flag. One rule covers every numeric setting: a float must be a
finite real number unless its field says ``finite=False``; ranges are declared on the field,
``option(0.01, "...", min=0.0, min_exclusive=True)`` (keys ``min``, ``max``, ``min_exclusive``,
``max_exclusive``); a field with ``choices`` must hold one of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
import random
import typing
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["SettingError", "check_settings", "config_mismatch", "flag_of", "flat_dict", "flat_from_dict", "flat_names",
           "get_setting", "mismatch_message", "nested", "option", "preserved_rng", "resolve_device", "run_only_names",
           "seed_everything", "with_overrides", "without_run_only"]


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help text (used for ``--help``).

    Keyword arguments go into the field's metadata: ``min``/``max`` (with ``min_exclusive``/
    ``max_exclusive``) declare the valid range of a number (of every element of a tuple of numbers),
    ``finite=False`` allows inf/nan, ``choices`` the valid values, ``aliases`` further flag names,
    ``cli=False`` no flag. :func:`check_settings` applies them.

    ``run_only=True`` marks a setting that says where or how a run executes, not what it computes (device,
    output paths, progress bars, parallel workers): a resume may change it, and it is no part of the key of
    stored results (:func:`run_only_names`). ``run_only="nested"``: the same, but only where the config is nested
    in a command's config that sets the field from one of its own settings (a fine-tune's ``seed`` is the
    command's ``--seed``, which the command's own check covers); in the config alone it defines the results.
    """
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


def flag_of(name: str) -> str:
    """The command-line flag of the flat setting ``name`` (``finetune_lr`` -> ``--finetune-lr``)."""
    return "--" + name.replace("_", "-")


class SettingError(ValueError):
    """A setting has an invalid value; ``name`` is its flat name, the message names its flag and field."""

    def __init__(self, name: str, reason: str) -> None:
        self.name, self.reason = name, reason
        super().__init__(f"{flag_of(name)}: {name} {reason}")

    def prefixed(self, prefix: str) -> SettingError:
        """The same error for the setting as seen from a config nesting this one under ``prefix``."""
        return SettingError(f"{prefix}_{self.name}" if prefix else self.name, self.reason)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _range_text(meta: dict[str, Any]) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        left, right = "(" if meta.get("min_exclusive") else "[", ")" if meta.get("max_exclusive") else "]"
        return f"in {left}{lo:g}, {hi:g}{right}"
    if lo is not None:
        return f"{'>' if meta.get('min_exclusive') else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if meta.get('max_exclusive') else '<='} {hi:g}"
    return ""


def _check_number(name: str, value: Any, elem: Any, meta: dict[str, Any], default: Any) -> None:
    finite = meta.get("finite", True)
    kind = "an integer" if elem is int else "a finite number" if finite else "a number"
    note = f" ({kind}; default: {default})" if default is not None else f" ({kind})"
    rng = _range_text(meta)
    fail = SettingError(name, f"must be {rng or kind}, got {value!r}{note}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            elem is int and not isinstance(value, numbers.Integral)):
        raise fail
    if finite and not math.isfinite(float(value)):
        raise fail
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value <= lo if meta.get("min_exclusive") else value < lo):
        raise fail
    if hi is not None and (value >= hi if meta.get("max_exclusive") else value > hi):
        raise fail


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def check_settings(cfg: Any, prefix: str = "") -> None:
    """Validate every leaf setting of the (composed) config ``cfg`` by the rules of its fields.

    Numbers (``int``/``float`` fields, also optional ones and tuples of them): the right type,
    finite unless the field says ``finite=False``, inside the field's declared range. ``bool``,
    ``str`` and ``dict`` fields: a value of that type. Fields with ``choices``: one of them. ``None``
    passes for an optional field. Raises :class:`SettingError`
    naming the flag (``prefix`` is the flat-name prefix of ``cfg`` inside a bigger config).
    """
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if "nested" in f.metadata:
            pre = f.metadata["prefix"]
            check_settings(value, f"{prefix}_{pre}" if prefix and pre else (pre or prefix))
            continue
        name = f"{prefix}_{f.name}" if prefix else f.name
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if optional:
            if value is None:
                continue
            tp = args[0]
        origin = typing.get_origin(tp)
        if origin in (tuple, list):
            elem = typing.get_args(tp)[0]
            if elem in (int, float):
                if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                    raise SettingError(name, f"must be a list of numbers, got {value!r}")
                for v in value:
                    _check_number(name, v, elem, f.metadata, None)
        elif tp in (int, float):
            _check_number(name, value, tp, f.metadata, _default_of(f))
        elif tp is bool and not isinstance(value, bool):
            raise SettingError(name, f"must be true or false, got {value!r}")
        elif tp is str and not isinstance(value, str):
            raise SettingError(name, f"must be a string, got {value!r}")
        elif origin is dict and not isinstance(value, dict):
            raise SettingError(name, f"must be a mapping of names to values, got {value!r}")
        if "choices" in f.metadata:
            choices = f.metadata["choices"]
            allowed = list(choices() if callable(choices) else choices)
            if value not in allowed:
                raise SettingError(name, f"must be one of {', '.join(map(str, allowed))}, got {value!r}")


def flat_from_dict(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """``{flat name: value}`` of a config saved as ``dataclasses.asdict`` (names the dict lacks are left out)."""
    out = {}
    for name, path in flat_names(cls).items():
        value: Any = d
        for part in path:
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            out[name] = value
    return out


def run_only_names(cls: type) -> frozenset[str]:
    """Flat names (:func:`flat_names`) of the run-only settings of the composed config class ``cls``: its
    leaves marked ``option(..., run_only=True)``, and those of its nested configs marked ``run_only="nested"``.

    Raises:
        TypeError: for a ``run_only`` mark other than ``True``, ``False`` or ``"nested"``.
    """
    return frozenset(_run_only(cls, nested=False))


def _run_only(cls: type, *, nested: bool) -> Iterator[str]:
    for f in dataclasses.fields(cls):
        if "nested" in f.metadata:
            pre = f.metadata["prefix"]
            yield from (f"{pre}_{name}" if pre else name for name in _run_only(f.metadata["nested"], nested=True))
            continue
        mark = f.metadata.get("run_only", False)
        if not (isinstance(mark, bool) or mark == "nested"):
            raise TypeError(f"{cls.__name__}.{f.name}: run_only must be True, False or 'nested', got {mark!r}")
        if mark is True or (mark == "nested" and nested):
            yield f.name


def without_run_only(cls: type, settings: dict[str, Any]) -> dict[str, Any]:
    """A flat settings dict (:func:`flat_dict` of a ``cls``, or one stored by an earlier run) without the
    run-only settings of ``cls``: what defines a run's results. Stored dicts go through it too, so a setting
    marked run-only later never makes earlier results look different."""
    run_only = run_only_names(cls)
    return {k: v for k, v in settings.items() if k not in run_only}


def config_mismatch(saved: dict[str, Any], current: dict[str, Any],
                    cls: type | None = None) -> dict[str, tuple[Any, Any]]:
    """``{flat name: (saved, current)}`` where two flat settings dicts (:func:`flat_dict`) differ.

    The run-only settings of the config class ``cls`` (:func:`run_only_names`: where/how a run executes) and
    names one side lacks are ignored; lists and tuples compare equal element by element.
    """
    run_only = run_only_names(cls) if cls is not None else frozenset()
    norm = lambda v: list(v) if isinstance(v, tuple) else v
    return {k: (saved[k], current[k]) for k in current
            if k not in run_only and k in saved and norm(saved[k]) != norm(current[k])}


def _flag_value(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{name.replace('_', '-')}"
    if isinstance(value, (list, tuple)):
        return f"{flag_of(name)} {' '.join(map(str, value))}"
    return f"{flag_of(name)} {value}"


def mismatch_message(what: str, diff: dict[str, tuple[Any, Any]], restart: str) -> str:
    """The refusal of a resume whose settings differ: names them, the flags to resume with, and ``restart``."""
    return (f"{what} was made with other settings than this run asks for ("
            + "; ".join(f"{flag_of(k)}: {a!r} there, {b!r} here" for k, (a, b) in diff.items())
            + "); resuming would mix the two. Resume with its settings ("
            + " ".join(_flag_value(k, a) for k, (a, _) in diff.items())
            + f"), or {restart}.")


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the block without changing the global RNG states (Python, NumPy's legacy RNG, torch CPU and CUDA).

    For work that seeds or draws from the global RNGs (e.g. training a baseline) inside a run that
    seeded them: what follows the block sees the same random numbers whether the block ran or not.
    """
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


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
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for name, sub in deeper.items():
        try:
            direct[name] = _replace_paths(getattr(cfg, name), sub)
        except SettingError as exc:  # name the setting as the composed config (and its flags) do
            raise exc.prefixed(fields[name].metadata.get("prefix", "")) from None
    return dataclasses.replace(cfg, **direct)


def flat_dict(cfg: Any) -> dict[str, Any]:
    """``{flat name: value}`` of every leaf setting (JSON-friendly: tuples become lists)."""
    out = {}
    for name in flat_names(type(cfg)):
        value = get_setting(cfg, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out
