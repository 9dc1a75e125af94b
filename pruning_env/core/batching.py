"""Batches of a data split: normalisation, augmentation, and the device-resident (CUDA) path.

Two ways to produce the same batches (:func:`batches`):

* the **host path** (the default on CPU): every batch is indexed from the host tensors and
  copied to ``device``; augmentation draws its random numbers per batch;
* the **resident path** (the default on CUDA, ``resident=True``): the split is copied to the
  device once (:func:`resident_copy`, cached for as long as the host tensor lives), batches
  are indexed there, and the whole epoch's augmentation draws (crop offsets, flips, Cutout
  centres) are drawn on the CPU generator up front, in the host path's order, and copied in
  one transfer. No host-to-device copy or host synchronisation happens per batch.

Both paths consume the generator identically and yield the same tensors (bit for bit; checked
on CPU tensors by ``tests/test_device_path.py``). One difference: the resident path draws the
epoch's augmentation when the iterator starts, so a consumer that stops early with
``augment_data=True`` leaves the generator further advanced than the host path would.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pruning_env.core.data import Split

__all__ = ["augment", "batches", "resident_copy"]

# (id of a host tensor, device) -> (weak reference to it, its copy on the device)
_RESIDENT: dict[tuple[int, str], tuple[weakref.ref, torch.Tensor]] = {}


def _canonical(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``, so ``"cuda"`` and ``"cuda:0"`` share one copy (other devices as they are)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def resident_copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, copied once and cached while ``tensor`` lives (itself on its own device).

    A contiguous prefix of a cached tensor (``Split.subset``, ``evaluate(limit=...)``) is served as a
    view of the cached copy, so evaluating a subset costs no transfer either.
    """
    device = _canonical(device)
    if _canonical(tensor.device) == device:
        return tensor
    key = (id(tensor), str(device))
    hit = _RESIDENT.get(key)
    if hit is not None and hit[0]() is tensor:
        return hit[1]
    base = tensor._base  # views (of views) record their root tensor
    if (base is not None and tensor.is_contiguous() and base.is_contiguous() and tensor.dtype == base.dtype
            and tensor.data_ptr() == base.data_ptr() and tensor.numel() <= base.numel()):
        # the tensor is the start of its base's memory (a split's prefix): a view of the base's copy
        return resident_copy(base, device).reshape(-1)[: tensor.numel()].view(tensor.shape)
    copy = tensor.to(device)
    _RESIDENT[key] = (weakref.ref(tensor), copy)
    weakref.finalize(tensor, _RESIDENT.pop, key, None)
    return copy


def _draw(b: int, h: int, w: int, generator: torch.Generator, padding: int,
          cutout: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The random numbers of one augmented batch of ``b`` images, in :func:`augment`'s order (CPU tensors).

    Returns ``(offsets (2, B) int64, flips (B,) bool, top (B,) int64 or None, left (B,) int64 or None)``.
    """
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5
    if cutout <= 0:
        return offsets, flips, None, None
    top = torch.randint(0, h, (b,), generator=generator)
    left = torch.randint(0, w, (b,), generator=generator)
    return offsets, flips, top, left


def _apply(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, top: torch.Tensor | None,
           left: torch.Tensor | None, padding: int, cutout: int) -> torch.Tensor:
    """Crop, flip and Cutout ``images`` ``(B, C, H, W)`` with draws on the images' device."""
    b, c, h, w = images.shape
    dev = images.device
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = offsets[0][:, None] + torch.arange(h, device=dev)  # (B, H)
    cols = offsets[1][:, None] + torch.arange(w, device=dev)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    out = padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
    if cutout > 0:
        assert top is not None and left is not None
        top, left = top[:, None] - cutout // 2, left[:, None] - cutout // 2  # (B, 1)
        ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
        in_y = (ys >= top) & (ys < top + cutout)  # (B, H)
        in_x = (xs >= left) & (xs < left + cutout)  # (B, W)
        hole = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (B, 1, H, W)
        out = out.masked_fill(hole, 0)
    return out


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4, cutout: int = 0) -> torch.Tensor:
    """Random crop with zero padding, random horizontal flip and optional Cutout, on a whole batch.

    Args:
        images: ``(B, C, H, W)`` tensor (any dtype).
        generator: CPU generator that draws the crop offsets, flips and cutout centres.
        padding: pixels of zero padding on each side before cropping back to ``H x W``.
        cutout: side in pixels of a square set to zero at a random centre of every image
            (DeVries & Taylor, 2017; the square may be clipped at the border); 0 disables.

    Returns:
        ``(B, C, H, W)`` tensor of the same dtype and device.
    """
    b, _, h, w = images.shape
    draws = _draw(b, h, w, generator, padding, cutout)
    on_device = [d.to(images.device) if d is not None else None for d in draws]
    return _apply(images, *on_device, padding=padding, cutout=cutout)  # type: ignore[arg-type]


def _epoch_draws(sizes: list[int], h: int, w: int, generator: torch.Generator, padding: int, cutout: int,
                 device: torch.device) -> list[tuple[torch.Tensor | None, ...]]:
    """Every batch's draws of an epoch (``sizes``: augmented images per batch), moved to ``device`` in one copy each."""
    per_batch = [_draw(b, h, w, generator, padding, cutout) for b in sizes]
    if not per_batch:
        return []
    columns = []
    for k in range(4):
        parts = [d[k] for d in per_batch]
        if parts[0] is None:
            columns.append([None] * len(parts))
            continue
        joined = torch.cat(parts, dim=-1)  # type: ignore[arg-type]
        if device.type == "cuda":
            joined = joined.pin_memory().to(device, non_blocking=True)
        bounds = list(itertools.accumulate(sizes, initial=0))
        columns.append([joined[..., a:z] for a, z in itertools.pairwise(bounds)])
    return list(zip(*columns))


def batches(
    split: Split,
    batch_size: int,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    shuffle: bool = False,
    augment_data: bool = False,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    drop_last: bool = False,
    cutout: int = 0,
    padding: int = 4,
    copies: int = 1,
    resident: bool | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalised ``(images, labels)`` batches.

    Args:
        split: uint8 images and labels.
        batch_size: examples per batch.
        mean, std: per-channel normalisation, in [0, 1] pixel units.
        shuffle: draw a new permutation from ``generator`` (required then).
        augment_data: apply :func:`augment` (random crop + flip) per batch.
        generator: CPU ``torch.Generator``; makes shuffling and augmentation deterministic.
        device: where the batches go.
        drop_last: drop a last incomplete batch.
        cutout: with ``augment_data``, side of the Cutout square in pixels (0: none).
        padding: with ``augment_data``, zero padding in pixels of the random crop (0: no crop).
        copies: with ``augment_data``, independently augmented copies of every image in its
            batch (batch augmentation, Hoffer et al., 2020): a batch of ``b`` images yields
            ``copies * b`` examples, the copies stacked one block after another.
        resident: the device-resident path (see the module docstring); ``None``: on for CUDA,
            off otherwise. Both paths yield the same batches.

    Yields:
        ``(B, C, H, W)`` float32 images and ``(B,)`` int64 labels on ``device`` (``B`` is
        ``copies`` times the number of images drawn).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if cutout < 0:
        raise ValueError(f"cutout must be >= 0 pixels, got {cutout}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0 pixels, got {padding}")
    if copies < 1 or (copies > 1 and not augment_data):
        raise ValueError(f"copies must be >= 1, and > 1 only with augment_data, got {copies}")
    if (shuffle or augment_data) and generator is None:
        raise ValueError("shuffle/augment_data need a torch.Generator for determinism")
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else None
    dev = torch.device(device)
    if resident is None:
        resident = dev.type == "cuda"
    m = torch.tensor(mean, device=dev).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=dev).view(1, -1, 1, 1) * 255.0
    stop = n - n % batch_size if drop_last else n
    if resident:
        yield from _resident_batches(split, batch_size, stop, order, m, s, dev, augment_data, generator, cutout,
                                     padding, copies)
        return
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size] if order is not None else slice(start, start + batch_size)
        x = split.images[idx].to(dev, non_blocking=True)
        y = split.labels[idx].to(dev, non_blocking=True)
        if augment_data:
            if copies > 1:
                x, y = x.repeat(copies, 1, 1, 1), y.repeat(copies)
            x = augment(x, generator, padding=padding, cutout=cutout)  # type: ignore[arg-type]
        yield (x.float() - m) / s, y


def _resident_batches(split: Split, batch_size: int, stop: int, order: torch.Tensor | None, m: torch.Tensor,
                      s: torch.Tensor, dev: torch.device, augment_data: bool, generator: torch.Generator | None,
                      cutout: int, padding: int, copies: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`batches`' resident path: the split and the epoch's draws on ``dev``, nothing copied per batch."""
    images, labels = resident_copy(split.images, dev), resident_copy(split.labels, dev)
    order = order.to(dev) if order is not None else None
    starts = range(0, stop, batch_size)
    draws = None
    if augment_data:
        sizes = [copies * (min(start + batch_size, stop) - start) for start in starts]
        draws = _epoch_draws(sizes, images.shape[2], images.shape[3], generator, padding, cutout, dev)  # type: ignore[arg-type]
    for k, start in enumerate(starts):
        idx = order[start : start + batch_size] if order is not None else slice(start, start + batch_size)
        x, y = images[idx], labels[idx]
        if draws is not None:
            if copies > 1:
                x, y = x.repeat(copies, 1, 1, 1), y.repeat(copies)
            x = _apply(x, *draws[k], padding=padding, cutout=cutout)  # type: ignore[arg-type]
        yield (x.float() - m) / s, y
