"""Input validation and model-state bookkeeping shared by every criterion.

The checks turn bad inputs into short ``ValueError`` / ``TypeError`` messages before any
work is done; :func:`preserved` guarantees that a criterion leaves the model exactly as it
found it (modes, ``requires_grad`` and ``inplace`` flags, optionally buffers) even when it
fails half-way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from pruning_env.core.fx import model_place, preserved_modes

__all__ = [
    "check_batch",
    "check_logits",
    "check_model",
    "first_line",
    "forward",
    "model_errors",
    "no_inplace",
    "preserved",
    "select_layers",
    "set_modes",
    "to_model",
    "to_out",
]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (empty if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def check_model(model: Any) -> None:
    """Raise ``TypeError`` unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def select_layers(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Conv2d]:
    """The conv layers to score: ``{name: conv}`` in ``named_modules()`` order.

    Args:
        layers: names of ``nn.Conv2d`` modules, or ``None`` for all of them.
    """
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if layers is None:
        if not convs:
            raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer to score")
        return convs
    if isinstance(layers, str):
        raise TypeError(f"layers must be a sequence of layer names, not a string ({layers!r}); use [{layers!r}]")
    wanted = list(layers)
    if not wanted:
        raise ValueError("layers is empty; pass None to score every conv layer")
    unknown = [n for n in wanted if n not in convs]
    if unknown:
        modules = dict(model.named_modules())
        details = [f"{n!r} ({type(modules[n]).__name__}, not nn.Conv2d)" if n in modules else repr(n) for n in unknown]
        shown = ", ".join(list(convs)[:8]) + (", ..." if len(convs) > 8 else "")
        raise ValueError(f"not conv layers of this model: {', '.join(details)}. Conv layers: {shown}")
    keep = set(wanted)
    return {name: m for name, m in convs.items() if name in keep}


def check_batch(images: Any, labels: Any, *, need_labels: bool) -> tuple[Tensor, Tensor | None]:
    """Validate a calibration batch.

    Args:
        images: must be a finite float ``(N, C, H, W)`` tensor with ``N >= 1``.
        labels: ``(N,)`` integer class indices ``>= 0``, or ``None`` unless ``need_labels``.

    Returns:
        ``(images, labels as int64 or None)``, on their original device.
    """
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a (N, C, H, W) float tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(
            f"images must be float and normalised (e.g. via pruning_env.core.data.batches), got {images.dtype}"
        )
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (N = 0)")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or inf")
    if labels is None:
        if need_labels:
            raise ValueError("this criterion needs labels: a (N,) int64 tensor of class indices")
        return images, None
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a (N,) int64 tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must have shape ({images.shape[0]},) to match images; got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be class indices >= 0; got minimum {int(labels.min())}")
    return images, labels.long()


def check_logits(logits: Any, n: int, labels: Tensor | None) -> Tensor:
    """Check that the model returned ``(n, K)`` logits and that ``labels`` are ``< K``."""
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"the model must return (N, num_classes) logits; it returned {shape} for N = {n}")
    if labels is not None and int(labels.max()) >= logits.shape[1]:
        raise ValueError(
            f"labels must be < num_classes = {logits.shape[1]} (the model's output size); "
            f"got maximum {int(labels.max())}"
        )
    return logits


def to_model(model: nn.Module, images: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Images on the model's device and dtype, labels on its device."""
    device, dtype = model_place(model)
    return images.to(device, dtype), None if labels is None else labels.to(device)


def to_out(t: Tensor) -> Tensor:
    """A layer's scores as returned by :func:`pruning_env.criteria.score`: flat float32 on the CPU."""
    return t.detach().to("cpu", torch.float32).flatten()


@contextmanager
def model_errors(images: Tensor) -> Iterator[None]:
    """Turn shape/type errors raised while running the model into a short ValueError."""
    try:
        yield
    except (RuntimeError, TypeError, IndexError) as exc:
        first = first_line(exc) or type(exc).__name__
        raise ValueError(f"the model failed on images of shape {tuple(images.shape)}: {first}") from None


def forward(model: Callable[[Tensor], Any], images: Tensor) -> Any:
    """``model(images)`` with the errors of :func:`model_errors`."""
    with model_errors(images):
        return model(images)


@contextmanager
def preserved(model: nn.Module, *, restore_buffers: bool) -> Iterator[None]:
    """Restore train/eval modes, requires_grad flags, ``inplace`` flags and (optionally)
    every buffer's values on exit, whatever happens inside."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    inplace = [(m, m.inplace) for m in model.modules() if isinstance(getattr(m, "inplace", None), bool)]
    saved = [(b, b.detach().clone()) for b in model.buffers()] if restore_buffers else []
    try:
        with preserved_modes(model):
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, flag in inplace:
            m.inplace = flag
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def set_modes(model: nn.Module, *, batchnorm_train: bool) -> None:
    """Every module in eval mode; BatchNorm layers in train mode if ``batchnorm_train``."""
    for m in model.modules():
        m.training = batchnorm_train and isinstance(m, _BatchNorm)


def no_inplace(model: nn.Module) -> None:
    """Switch off ``inplace`` of activations so cached activations are never overwritten
    (restored by :func:`preserved`)."""
    for m in model.modules():
        if getattr(m, "inplace", None) is True:
            m.inplace = False
