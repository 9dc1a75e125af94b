"""Data sets: CIFAR-10/100 (official python format) and any image-folder data set.

Where data is looked for (first hit wins):

1. the ``root`` argument,
2. ``$PRUNING_ENV_DATA``,
3. the user cache directory ``~/.cache/pruning_env/data`` (``$XDG_CACHE_HOME`` respected).

Inside that directory a data set ``name`` may be stored as

* an image folder: ``<dir>/<name>/train/<class>/*`` and ``<dir>/<name>/test/<class>/*``
  (PNG/JPEG/..., RGB or grayscale; classes are the sorted folder names), or
* for ``cifar10`` / ``cifar100``: the official python archives extracted to
  ``<dir>/cifar-10-batches-py`` / ``<dir>/cifar-100-python`` (downloaded with MD5
  verification when ``download=True`` and they are missing).

``root`` may also point directly at an image folder (a directory holding ``train/``
and ``test/``). Any other name is treated as an image folder ``<dir>/<name>``.

Images are decoded once into ``uint8`` arrays cached under
``~/.cache/pruning_env/decoded`` (keyed by the source's path and every file's size and mtime,
validated when read, see :mod:`pruning_env.core.decoded_cache`), so a second load takes a
fraction of a second. Batches are produced from those tensors
(:mod:`pruning_env.core.batching`, re-exported here: ``batches``, ``augment``); augmentation
(random crop with zero padding, horizontal flip, Cutout) runs on whole batches, on the device
the batches go to, and on CUDA the split itself stays resident on the GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import tarfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pruning_env.core import decoded_cache
from pruning_env.core.batching import augment, batches
from pruning_env.core.checkpoint import run_lock
from pruning_env.core.config import check_settings, option

__all__ = [
    "CalibrationConfig",
    "DataError",
    "DatasetInfo",
    "ImageDataset",
    "Split",
    "Splits",
    "augment",
    "batches",
    "cache_dir",
    "calibration_batch",
    "data_dir",
    "dataset_info",
    "load_dataset",
    "load_splits",
    "make_synthetic",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CIFAR_SOURCES = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": b"labels",
        "meta": ("batches.meta", b"label_names"),
        "num_classes": 10,
    },
    "cifar100": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": b"fine_labels",
        "meta": ("meta", b"fine_label_names"),
        "num_classes": 100,
    },
}


class DataError(RuntimeError):
    """Data is missing or malformed; the message says where we looked and what to do."""


def cache_dir() -> Path:
    """Root of the package's cache: ``$XDG_CACHE_HOME/pruning_env`` or ``~/.cache/pruning_env``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pruning_env"


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """The directory data sets are read from: ``root``, else ``$PRUNING_ENV_DATA``, else the cache."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("PRUNING_ENV_DATA")
    if env:
        return Path(env).expanduser()
    return cache_dir() / "data"


@dataclass
class Split:
    """One split of a data set.

    Attributes:
        images: ``(N, C, H, W)`` uint8 tensor.
        labels: ``(N,)`` int64 tensor of class indices.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, n: int) -> Split:
        """The first ``n`` examples (the splits are already shuffled where it matters)."""
        return Split(self.images[:n], self.labels[:n])


@dataclass
class Splits:
    """Train / validation / test splits plus the normalisation they share.

    ``val`` is carved out of the official training data and is what rewards and
    model selection use; ``test`` is only for final reports.
    """

    train: Split
    val: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    name: str

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(int(s) for s in self.train.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class ImageDataset:
    """A decoded data set: official train and test splits as uint8 tensors."""

    name: str
    classes: list[str]
    train: Split
    test: Split

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.train.images.shape[1:])  # type: ignore[return-value]

    def splits(self, val_fraction: float = 0.1, seed: int = 0) -> Splits:
        """Deterministic, class-stratified train/validation split of the training data.

        All three splits come shuffled (deterministically), so any prefix is a fair sample.

        Args:
            val_fraction: share of each class held out for validation, in (0, 1).
            seed: seed of the split's permutation (the same seed always gives the same split).
        """
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        gen = np.random.default_rng(seed)
        labels = self.train.labels.numpy()
        val_idx, train_idx = [], []
        for c in range(len(self.classes)):
            idx = np.flatnonzero(labels == c)
            idx = idx[gen.permutation(len(idx))]
            n_val = max(1, round(len(idx) * val_fraction)) if len(idx) > 1 else 0
            val_idx.append(idx[:n_val])
            train_idx.append(idx[n_val:])
        val = np.concatenate(val_idx)
        train = np.concatenate(train_idx)
        # Shuffle across classes so that a prefix (`Split.subset`) is a fair sample.
        val = val[gen.permutation(len(val))]
        train = train[gen.permutation(len(train))]
        tr = Split(self.train.images[train], self.train.labels[train])
        # The test split is shuffled too (image folders list it class by class), so that a prefix
        # (`Split.subset`, `evaluate(limit=...)`) is a fair sample of every class.
        test_order = torch.from_numpy(gen.permutation(len(self.test)))
        test = Split(self.test.images[test_order], self.test.labels[test_order])
        images = tr.images[:10_000].float() / 255.0  # statistics from a fixed 10k sample are plenty
        mean = tuple(float(m) for m in images.mean(dim=(0, 2, 3)))
        std = tuple(float(s) for s in images.std(dim=(0, 2, 3)).clamp_min(1e-3))
        return Splits(
            train=tr,
            val=Split(self.train.images[val], self.train.labels[val]),
            test=test,
            mean=mean,
            std=std,
            classes=list(self.classes),
            name=self.name,
        )


# ----------------------------------------------------------------------------- loading


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    download: bool = True,
    use_cache: bool = True,
) -> ImageDataset:
    """Load a data set by name (``cifar10``, ``cifar100`` or an image-folder name).

    Args:
        name: data set name, see the module docstring for where it is looked for.
        root: directory to look in (else ``$PRUNING_ENV_DATA``, else the user cache).
        download: for CIFAR, download the official archive if it is missing.
        use_cache: read/write the decoded-array cache.

    Raises:
        DataError: with the places looked at and how to fix it.
    """
    _check_name(name)
    base = data_dir(root)
    candidates = _candidates(name, base)
    found = _find(candidates)
    if found is not None:
        kind, path = found
        if kind == "folder":
            return _cached(name, path, use_cache, lambda: _read_folder(name, path))
        return _cached(name, path, use_cache, lambda: _read_cifar(name, path))
    if name in CIFAR_SOURCES and download:
        path = _download_cifar(name, base)
        return _cached(name, path, use_cache, lambda: _read_cifar(name, path))
    looked = "\n  ".join(str(p) for _, p in candidates)
    hint = (
        f"Download it with load_dataset({name!r}, download=True) when online, or "
        if name in CIFAR_SOURCES
        else ""
    )
    raise DataError(
        f"data set {name!r} not found. Looked in:\n  {looked}\n{hint}"
        f"put it in the image-folder layout <dir>/{name}/train/<class>/*.png and <dir>/{name}/test/<class>/*.png "
        "and pass root=<dir> or set PRUNING_ENV_DATA=<dir>."
    )


def _candidates(name: str, base: Path) -> list[tuple[str, Path]]:
    """Where data set ``name`` may be stored below ``base``, in the order looked at: ``(kind, path)`` pairs."""
    candidates = []
    if (base / "train").is_dir() and (base / "test").is_dir():
        candidates.append(("folder", base))
    candidates.append(("folder", base / name))
    if name in CIFAR_SOURCES:
        src = CIFAR_SOURCES[name]
        candidates.append(("cifar", base / src["folder"]))
        candidates.append(("cifar", base / name / src["folder"]))
    return candidates


def _find(candidates: list[tuple[str, Path]]) -> tuple[str, Path] | None:
    for kind, path in candidates:
        if kind == "folder" and (path / "train").is_dir() and (path / "test").is_dir():
            return kind, path
        if kind == "cifar" and path.is_dir():
            return kind, path
    return None


@dataclass(frozen=True)
class DatasetInfo:
    """What a model must fit to run on a data set: its class count and the ``(C, H, W)`` of one image."""

    num_classes: int
    input_shape: tuple[int, int, int]


def dataset_info(name: str, root: str | os.PathLike | None = None) -> DatasetInfo:
    """The class count and image shape of data set ``name``, without loading it (for checks before any work).

    Found where :func:`load_dataset` would look: an image folder gives its class folders and the shape of its
    first image; CIFAR-10/100 (stored or not) their own; ``"synthetic"`` that of :func:`make_synthetic`.

    Raises:
        DataError: when ``name`` is neither CIFAR, ``"synthetic"`` nor an image folder there.
    """
    if name == "synthetic":
        ds = make_synthetic(n_train=1, n_test=1)
        return DatasetInfo(len(ds.classes), ds.input_shape)
    _check_name(name)
    found = _find(_candidates(name, data_dir(root)))
    if found is not None and found[0] == "folder":
        train = found[1] / "train"
        classes = sorted(d for d in train.iterdir() if d.is_dir())
        first = next((f for c in classes for f in sorted(c.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES), None)
        if first is None:
            raise DataError(f"no image files (*.png, *.jpg, ...) under {train}/<class>/")
        image = _decode(str(first))
        channels = 1 if image.ndim == 2 else int(image.shape[2])
        return DatasetInfo(len(classes), (channels, int(image.shape[0]), int(image.shape[1])))
    if name in CIFAR_SOURCES:
        return DatasetInfo(CIFAR_SOURCES[name]["num_classes"], (3, 32, 32))
    raise DataError(f"data set {name!r} not found: not cifar10/cifar100 and no image folder "
                    f"{data_dir(root) / name}/train/<class>/ (set --data-dir or PRUNING_ENV_DATA)")


def _cached(name: str, path: Path, use_cache: bool, read) -> ImageDataset:
    if not use_cache:
        return read()
    folder = cache_dir() / "decoded" / decoded_cache.entry_name(name, decoded_cache.source_key(path))
    # locked while read or filled: a process decoding the same source meanwhile is waited for, and its entry read
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(OSError):  # a cache this process may not write to is still read
            stack.enter_context(run_lock(folder, "the decoded-image cache", wait=True))
        hit = decoded_cache.read_entry(folder)
        if hit is not None:
            classes, a = hit
            return ImageDataset(name=name, classes=classes,
                                train=Split(torch.from_numpy(a["xtr"]), torch.from_numpy(a["ytr"])),
                                test=Split(torch.from_numpy(a["xte"]), torch.from_numpy(a["yte"])))
        ds = read()  # missing, stale or broken: rebuilt
        arrays = {"xtr": ds.train.images.numpy(), "ytr": ds.train.labels.numpy(), "xte": ds.test.images.numpy(),
                  "yte": ds.test.labels.numpy()}
        decoded_cache.write_entry(folder, ds.classes, arrays, str(path))
        return ds


def _check_name(name: str) -> None:
    """A data set name is a plain name: a path would look outside the data directory (and cache outside the cache)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or os.path.isabs(name) or name.startswith("~"):
        raise DataError(f"data set name {name!r} is not a plain name; to read a folder elsewhere, pass its parent "
                        "folder as --data-dir (root=) and its folder name as --dataset")


def _decode(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
            im = im.convert("L" if mode in ("L", "1", "I;16", "I") else "RGB")
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}. Remove or replace the corrupt file.") from None


def _read_folder_split(root: Path, classes: list[str] | None) -> tuple[Split, list[str]]:
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    if classes is None:
        classes = found
    if not classes:
        raise DataError(f"{root} has no class folders; expected {root}/<class>/<image files>")
    extra = sorted(set(found) - set(classes))
    if extra:
        raise DataError(f"{root} has class folders that the training split lacks ({', '.join(extra[:5])}); "
                        "train and test must have the same classes")
    files, labels = [], []
    for i, c in enumerate(classes):
        folder = root / c
        if not folder.is_dir():
            raise DataError(f"class folder {folder} is missing (train and test must have the same classes)")
        names = sorted(f for f in os.listdir(folder) if Path(f).suffix.lower() in IMAGE_SUFFIXES)
        if not names:
            raise DataError(f"class folder {folder} has no image files (*.png, *.jpg, ...); add images or remove "
                            "the folder (every class needs examples in train and test)")
        files += [str(folder / f) for f in names]
        labels += [i] * len(names)
    if not files:
        raise DataError(f"no image files (*.png, *.jpg, ...) under {root}/<class>/")
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(_decode, files, chunksize=256))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(
            f"images under {root} have different sizes/channels {sorted(shapes)[:4]}; resize them to one size first"
        )
    x = np.stack(arrays)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.tensor(labels, dtype=torch.int64)), classes


def _read_folder(name: str, path: Path) -> ImageDataset:
    train, classes = _read_folder_split(path / "train", None)
    test, _ = _read_folder_split(path / "test", classes)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(f"train images are {tuple(train.images.shape[1:])} but test images "
                        f"{tuple(test.images.shape[1:])}")
    return ImageDataset(name=name, classes=classes, train=train, test=test)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR python batches (dicts of bytes, lists and numpy arrays) and nothing else: a pickle
    naming any other global (code a copied or downloaded file would run) is refused."""

    _ALLOWED = frozenset((mod, name) for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
                         for name in ("_reconstruct", "scalar")) | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it names the global {module}.{name}, which no CIFAR batch holds: a pickle "
                                         "that could run code is not loaded")
        return super().find_class(module, name)


def _read_cifar(name: str, path: Path) -> ImageDataset:
    src = CIFAR_SOURCES[name]

    def unpickle(fname: str) -> dict:
        f = path / fname
        if not f.is_file():
            raise DataError(
                f"{f} is missing: {path} is not a complete {name} python-format folder. "
                f"Delete it and re-download ({src['url']}), or use the image-folder layout."
            )
        try:
            with open(f, "rb") as fh:
                return _ArrayUnpickler(fh, encoding="bytes").load()
        except Exception as exc:
            raise DataError(f"{f} is corrupt ({exc}); delete {path} and download again") from None

    def read(files: list[str]) -> Split:
        xs, ys = [], []
        for fname in files:
            d = unpickle(fname)
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[src["label_key"]], dtype=np.int64))
        return Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))

    meta_file, key = src["meta"]
    classes = [c.decode() for c in unpickle(meta_file)[key]]
    return ImageDataset(name=name, classes=classes, train=read(src["train"]), test=read(src["test"]))


def _download_cifar(name: str, base: Path) -> Path:
    src = CIFAR_SOURCES[name]
    base.mkdir(parents=True, exist_ok=True)
    archive = base / Path(src["url"]).name
    try:
        if not archive.is_file():
            tmp = archive.with_suffix(".part")
            with urllib.request.urlopen(src["url"], timeout=30) as resp, open(tmp, "wb") as fh:
                from tqdm import tqdm

                total = int(resp.headers.get("Content-Length", 0)) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}") as bar:
                    while chunk := resp.read(1 << 20):
                        fh.write(chunk)
                        bar.update(len(chunk))
            os.replace(tmp, archive)
    except OSError as exc:
        raise DataError(
            f"could not download {name} from {src['url']} ({exc}). Offline? Put the data set in an image folder "
            f"<dir>/{name}/train/<class>/*.jpg + <dir>/{name}/test/<class>/*.jpg (or the extracted "
            f"{src['folder']}/ folder) and set PRUNING_ENV_DATA=<dir> or pass root=<dir>. "
            f"Looked in {base}."
        ) from None
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    if md5 != src["md5"]:
        archive.unlink()
        raise DataError(f"{archive.name} failed its MD5 check ({md5} != {src['md5']}); deleted it, try again")
    with tarfile.open(archive) as tar:
        tar.extractall(base, filter="data")
    return base / src["folder"]


# ----------------------------------------------------------------------------- synthetic


def make_synthetic(
    *,
    num_classes: int = 4,
    n_train: int = 1024,
    n_test: int = 256,
    size: int = 32,
    channels: int = 3,
    seed: int = 0,
    noise: float = 0.35,
) -> ImageDataset:
    """A small learnable data set generated in-process (for tests and tutorials).

    Each class is a fixed random low-frequency pattern; examples are the pattern,
    randomly shifted by up to 3 pixels, scaled and plus Gaussian noise, as uint8.
    Deterministic in ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=gen)
    protos = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def sample(n: int) -> Split:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=gen)]
        x = protos[labels]
        shifts = torch.randint(-3, 4, (n, 2), generator=gen)
        x = torch.stack([torch.roll(x[i], tuple(shifts[i].tolist()), dims=(1, 2)) for i in range(n)])
        x = x * (0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=gen)) + noise * torch.randn(x.shape, generator=gen)
        return Split((x.clamp(0, 1) * 255).round().to(torch.uint8), labels.to(torch.int64))

    classes = [f"class_{i}" for i in range(num_classes)]
    return ImageDataset(name="synthetic", classes=classes, train=sample(n_train), test=sample(n_test))


# ----------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class CalibrationConfig:
    """How many training images the data-driven criteria are computed on (see :func:`calibration_batch`)."""

    calib_size: int = option(128, "calibration images (from the TRAINING split) for data-driven criteria",
                             min=1)

    def __post_init__(self) -> None:
        check_settings(self)


def calibration_batch(splits: Splits, n: int, *, seed: int = 0,
                      device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration batch of the data-driven criteria: ``n`` TRAINING images drawn with ``seed``.

    One rule for every caller (the env uses ``seed=0``; the prune CLI its ``--seed``), so the
    env's DSFP-uniform plan and ``prune --criterion dsfp --rate r`` score the same images.

    Returns:
        ``(images, labels)``: ``(n, C, H, W)`` float32 normalised as in training, ``(n,)`` int64,
        on ``device`` (``n`` is capped at the training split's size).
    """
    if n < 1:
        raise ValueError(f"the calibration batch needs n >= 1 images, got {n}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(splits.train), generator=gen)[: min(n, len(splits.train))]
    subset = Split(splits.train.images[idx], splits.train.labels[idx])
    return next(batches(subset, len(subset), mean=splits.mean, std=splits.std, device=device))


def load_splits(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    download: bool = True,
) -> Splits:
    """Load ``name`` and split it (see :meth:`ImageDataset.splits`).

    ``name="synthetic"`` gives the seeded in-process data set of :func:`make_synthetic`.
    """
    ds = make_synthetic(seed=split_seed) if name == "synthetic" else load_dataset(name, root, download=download)
    return ds.splits(val_fraction=val_fraction, seed=split_seed)
