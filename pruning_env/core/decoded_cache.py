"""The decoded-image cache of :mod:`pruning_env.core.data`: uint8 arrays keyed by a fingerprint of the source.

The key covers the source's resolved path and the relative path, size and modification time (ns) of
EVERY file in it, so adding, removing, renaming or rewriting any file (in place too) gives a new key.
What is read back is validated (array types and shapes, label count and range against the classes);
a cache entry that is corrupt, truncated, zero-byte or inconsistent is reported as missing, and the
caller rebuilds it. Entries are written with unique temporary files and renamed into place, so two
processes filling one entry never mix their files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ARRAYS", "CACHE_VERSION", "entry_name", "read_entry", "source_key", "write_entry"]

CACHE_VERSION = 2
ARRAYS = ("xtr", "ytr", "xte", "yte")


def source_key(path: Path) -> str:
    """A fingerprint of a data source: its path and every file's relative path, size and mtime."""
    h = hashlib.sha1(json.dumps([str(path.resolve()), CACHE_VERSION]).encode())
    for dirpath, dirs, files in os.walk(path):
        dirs.sort()
        rel = os.path.relpath(dirpath, path)
        for f in sorted(files):
            st = os.stat(os.path.join(dirpath, f))
            h.update(f"{rel}/{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def entry_name(name: str, key: str) -> str:
    """The cache folder's name of data set ``name`` (a plain name: never a path outside the cache)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "dataset"
    return f"{safe}-{key}"


def _valid(classes: Any, a: dict[str, np.ndarray]) -> bool:
    if not isinstance(classes, list) or not classes:
        return False
    for x, y in ((a["xtr"], a["ytr"]), (a["xte"], a["yte"])):
        if x.dtype != np.uint8 or x.ndim != 4 or y.ndim != 1 or y.dtype != np.int64 or len(x) != len(y) or not len(y):
            return False
        if int(y.min()) < 0 or int(y.max()) >= len(classes):
            return False
    return a["xtr"].shape[1:] == a["xte"].shape[1:]


def read_entry(folder: Path) -> tuple[list[str], dict[str, np.ndarray]] | None:
    """``(classes, arrays)`` of a valid cache entry, else ``None`` (missing, corrupt or inconsistent)."""
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        arrays = {k: np.load(folder / f"{k}.npy", allow_pickle=False) for k in ARRAYS}
        if not _valid(meta.get("classes"), arrays):
            return None
        return list(meta["classes"]), arrays
    except Exception:  # a zero-byte, truncated or foreign file: rebuilt by the caller
        return None


def _replace(folder: Path, final: str, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{final}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, folder / final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_entry(folder: Path, classes: list[str], arrays: dict[str, np.ndarray], source: str) -> None:
    """Write a cache entry (arrays first, ``meta.json`` last: an entry without it is not read)."""
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        (folder / "meta.json").unlink()
    for k in ARRAYS:
        def save(tmp: str, arr: np.ndarray = arrays[k]) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
        _replace(folder, f"{k}.npy", save)
    _replace(folder, "meta.json", lambda tmp: Path(tmp).write_text(json.dumps({"classes": classes, "source": source})))
