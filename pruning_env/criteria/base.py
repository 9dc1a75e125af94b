"""The :class:`Criterion` base class, the registry of criteria by name, and :func:`score`.

A criterion is one class (modelled on Torch-Pruning's ``Importance`` classes) that says
what it needs and which options it takes, and computes one score per output filter of
the conv layers it is given; :func:`register_criterion` makes it available by name to
:func:`score`, :func:`list_criteria` and so to the environment and the CLIs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from pruning_env.criteria.checks import check_batch, check_model, select_layers, to_model, to_out

__all__ = [
    "Criterion",
    "get_criterion",
    "list_criteria",
    "prune_first",
    "register_criterion",
    "score",
    "unregister_criterion",
]

C = TypeVar("C", bound="type[Criterion]")


class Criterion:
    """Base class of a filter-importance criterion (LOW scores are pruned first).

    Subclasses set the class attributes and implement :meth:`compute`; decorate them with
    ``@register_criterion("name")``. Options are passed to the constructor (by
    :func:`score`, from its ``**options``) and read back from :attr:`config`.

    Attributes:
        name: the registered name (set by :func:`register_criterion`).
        needs_data: whether :meth:`compute` needs a calibration batch. ``False``: it gets
            ``images = labels = None`` (a batch the caller passes anyway is still validated).
        needs_labels: whether it needs labels too (see :meth:`labels_required` for
            criteria where that depends on an option).
        uses_seed: whether its scores depend on ``seed`` (every criterion accepts ``seed``;
            the others ignore it), so callers can tell which runs to repeat per seed.
        options: ``{option name: default}`` of the options it accepts (besides ``seed``).
        config: (instance) the options in effect: the defaults updated by the caller's.
    """

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = True
    uses_seed: ClassVar[bool] = False
    options: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            valid = ", ".join(self.options) or "none"
            raise TypeError(
                f"criterion {self.name!r} got unexpected option(s) {', '.join(unknown)}; valid options: {valid} "
                "(and seed, which every criterion accepts)"
            )
        self.config: dict[str, Any] = {**self.options, **options}
        self.check_options()

    def check_options(self) -> None:
        """Raise ``ValueError`` for bad option values (called by the constructor)."""

    def labels_required(self) -> bool:
        """Whether :meth:`compute` needs labels with these options (default: :attr:`needs_labels`)."""
        return self.needs_labels

    def compute(
        self,
        model: nn.Module,
        images: Tensor | None,
        labels: Tensor | None,
        convs: Mapping[str, nn.Conv2d],
        *,
        seed: int,
    ) -> Mapping[str, Tensor]:
        """Score every output filter of ``convs``; LOW = prune first.

        Args:
            model: the network; must be left exactly as found (see
                :func:`pruning_env.criteria.checks.preserved`).
            images: ``(N, C, H, W)`` validated calibration batch on the model's device and
                dtype (``None`` if not :attr:`needs_data`).
            labels: ``(N,)`` int64 on the model's device, or ``None`` when not required
                and not given.
            convs: ``{layer name: conv}`` to score, in ``named_modules()`` order.
            seed: integer seed for criteria with randomness (:attr:`uses_seed`).

        Returns:
            ``{layer name: (C_out,) tensor}`` for every layer of ``convs``; any float dtype
            and device (:func:`score` returns them as float32 CPU tensors).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement compute()")


_REGISTRY: dict[str, type[Criterion]] = {}


def register_criterion(name: str) -> Callable[[C], C]:
    """Class decorator: register a :class:`Criterion` subclass under ``name``.

    Raises:
        ValueError: ``name`` is empty or already taken by another class.
        TypeError: the decorated object is not a :class:`Criterion` subclass.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"a criterion name must be a non-empty string without surrounding spaces, got {name!r}")

    def decorate(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, Criterion)):
            raise TypeError(f"@register_criterion({name!r}) decorates Criterion subclasses, not {cls!r}")
        old = _REGISTRY.get(name)
        # The same class registered again (a module reloaded) is fine; a different one is a clash.
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"criterion {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def unregister_criterion(name: str) -> None:
    """Remove a registered criterion (for tests and interactive sessions)."""
    if name not in _REGISTRY:
        raise ValueError(f"criterion {name!r} is not registered")
    del _REGISTRY[name]


def list_criteria() -> list[str]:
    """Names accepted by :func:`score`, in registration order (the built-ins first)."""
    return list(_REGISTRY)


def get_criterion(name: str) -> type[Criterion]:
    """The class registered under ``name``.

    Raises:
        ValueError: no criterion of that name (the message lists the valid ones).
    """
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown criterion {name!r}; valid criteria: {', '.join(_REGISTRY)}")
    return cls


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return seed


def score(
    model: nn.Module,
    images: Tensor | None,
    labels: Tensor | None,
    criterion: str,
    *,
    layers: Sequence[str] | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    """Score every output filter of the model's conv layers; LOW values are pruned first.

    Args:
        model: any ``nn.Module`` with ``nn.Conv2d`` layers, on any device; left unchanged.
        images: ``(N, C, H, W)`` float calibration batch, normalised as in training.
            May be ``None`` for the data-free criteria ``l1``, ``l2``, ``fpgm``, ``random``.
        labels: ``(N,)`` int64 class indices in ``[0, num_classes)``; may be ``None`` for
            data-free criteria and for ``kl`` in modes ``exact``, ``exact_loop``, ``linear``.
        criterion: a name of :func:`list_criteria` (see the package docstring).
        layers: names (as in ``model.named_modules()``) of the conv layers to score;
            default: every ``nn.Conv2d``.
        **options: ``seed`` (int, default 0), accepted by every criterion and used by those
            with randomness (``random``); the others are criterion-specific
            (``Criterion.options``):
            ``kl``: ``kl`` (mode, default ``"exact"``, see :data:`~pruning_env.criteria.KL_MODES`),
            ``kl_batch_size`` (default 128: the first that many images are used),
            ``kl_chunk_size`` (filters per batched run in ``exact`` mode; default: sized
            to about 256 MiB per activation), ``kl_verify`` (default True).
            ``dsfp``: ``direction`` (required, ``"low"`` or ``"high"``) and the ``kl`` options.

    Returns:
        ``{layer name: (out_channels,) float32 CPU tensor}`` in ``named_modules()`` order.

    Raises:
        ValueError: unknown criterion, bad inputs, unknown layer names, bad option values.
        TypeError: an option the criterion does not take.
    """
    cls = get_criterion(criterion)
    seed = _check_seed(options.pop("seed", 0))
    crit = cls(**options)
    check_model(model)
    convs = select_layers(model, layers)
    x: Tensor | None = None
    y: Tensor | None = None
    if not crit.needs_data:
        if images is not None or labels is not None:
            check_batch(images, labels, need_labels=False)  # a batch passed anyway must still be valid
    else:
        x, y = check_batch(images, labels, need_labels=crit.labels_required())
        x, y = to_model(model, x, y)
    out = crit.compute(model, x, y, convs, seed=seed)
    missing = [name for name in convs if name not in out]
    if missing:
        raise RuntimeError(f"criterion {criterion!r} returned no scores for layer(s) {', '.join(missing)}")
    result = {name: to_out(torch.as_tensor(out[name])) for name in convs}
    for name, conv in convs.items():
        if result[name].numel() != conv.out_channels:
            raise RuntimeError(
                f"criterion {criterion!r} returned {result[name].numel()} scores for layer {name!r}, "
                f"which has {conv.out_channels} filters"
            )
    return result


def prune_first(scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Filter indices of every layer in pruning order: lowest score first, ties by index.

    Args:
        scores: ``{layer: (C,) tensor}`` as returned by :func:`score`.

    Returns:
        ``{layer: (C,) int64 CPU tensor}``, a permutation of ``0..C-1`` per layer.
    """
    out: dict[str, Tensor] = {}
    for name, s in scores.items():
        s = torch.as_tensor(s).detach().to("cpu").flatten()
        if torch.isnan(s).any():
            raise ValueError(f"layer {name!r}: scores contain NaN; cannot order its filters")
        out[name] = torch.sort(s, stable=True).indices.to(torch.int64)
    return out
