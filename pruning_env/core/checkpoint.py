"""Self-describing model checkpoints.

A checkpoint is a ``torch.save`` dict that rebuilds its network without knowing
how it was made, also after pruning changed the widths:

=================  ============================================================
key                content
=================  ============================================================
format_version     :data:`FORMAT_VERSION`
spec               :class:`~pruning_env.core.models.ModelSpec` as a dict (arch, classes,
                   input channels, actual width of every conv and hidden Linear)
state_dict         the weights
module             only for a user's own architecture (not in ``models``): the
                   pickled module; loading it needs ``trust_pickle=True``
input_shape        ``[C, H, W]`` of one image
dataset            data set name; ``classes``: class names
metrics            e.g. ``{"val_acc": 91.2, "test_acc": 90.8}`` (percent)
train_config       the config that trained it (dict), if any
plan               the pruning plan that produced it (dict), if any
extra              anything else (e.g. ``train_state`` for resuming)
=================  ============================================================

Writes are atomic (a uniquely named temporary file + rename), so an interrupted save never
leaves a truncated checkpoint behind and two processes saving the same path never mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning_env.core.models import ModelSpec, build_from_spec, channel_spec, list_models

__all__ = ["FORMAT_VERSION", "Checkpoint", "CheckpointError", "RunLockedError", "atomic_save", "atomic_write_text",
           "check_writable", "load", "run_lock", "save", "weights_digest"]

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit what was asked of it."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model plus everything recorded about it."""

    model: nn.Module
    input_shape: tuple[int, int, int]
    dataset: str | None = None
    classes: list[str] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    train_config: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        return getattr(self.model, "arch", type(self.model).__name__)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 (hex, first 16 digits) of a model's weights and buffers: every tensor's name, dtype, shape and bytes.

    Equal digests mean bit-identical networks; a checkpoint re-saved (other metrics, date) keeps its digest. Results
    measured on one baseline record it, so that a run resumed on another baseline (e.g. retrained on another CPU) is
    refused instead of silently mixing the two.
    """
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(tmp_path)`` on a fresh, uniquely named temporary file next to ``path``, then rename it
    over ``path``. Two processes writing the same ``path`` never share a temporary file: the last rename
    wins and a reader sees one complete file or the other, never a mix."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give a file path (e.g. {path / 'model.pt'})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a unique temporary file in the same folder, then rename over ``path``."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (unique temporary file + rename)."""
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def check_writable(path: str | os.PathLike, flag: str = "--out") -> None:
    """Raise ``ValueError`` naming ``flag`` unless a file can be written at ``path`` (checked before any work).

    ``path`` must not be a directory, and its folder must exist (or be creatable) and accept new files.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file path (e.g. {path / 'model.pt'})")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot create its folder {parent} ({exc.strerror}); "
                         "choose a writable location") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise ValueError(f"{flag} {path}: its folder {parent} is not writable ({exc.strerror}); "
                         "choose a writable location") from None
    os.close(fd)
    os.unlink(tmp)
    if path.exists() and not os.access(path, os.W_OK):
        # a rename would still replace it, but the user marked it read-only: respect that
        raise ValueError(f"{flag} {path} is read-only; choose another path or make it writable")


class RunLockedError(RuntimeError):
    """Another running process holds the lock of an output (see :func:`run_lock`)."""


def _lock_path(path: Path, file: bool) -> Path:
    return path.parent / f".{path.name}.lock" if file else path / ".lock"


def _holder(fh: Any) -> str:
    """Who holds the lock, as its lock file records it."""
    fh.seek(0)
    try:
        info = json.loads(fh.read())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError):  # not written yet (it has just taken the lock)
        return "no details recorded yet"


@contextlib.contextmanager
def run_lock(path: str | os.PathLike, flag: str = "--logdir", *, file: bool = False,
             wait: bool = False) -> Iterator[None]:
    """Hold an exclusive advisory lock on the output ``path`` of a run while the block runs.

    Every command that writes a result another run may also write (a run folder, a checkpoint, a
    benchmark's report, work dir or cache) holds this lock for its whole run, so two runs never mix
    their results. ``path`` is a folder (lock file ``path/.lock``) or, with ``file=True``, an output
    file (lock file ``.<name>.lock`` beside it). While held, the lock file records the holder (pid,
    host, start time, command line); it is removed at release.

    A second holder of the same ``path`` (another process, or another ``run_lock`` in this one) fails
    at once with :class:`RunLockedError` naming ``flag``, ``path`` and the holder; with ``wait=True``
    (a cache: what the other run is writing is what this one needs) it waits for the holder to finish
    instead, saying so on stderr. No-op where ``fcntl`` is unavailable (Windows).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    lock = _lock_path(path, file)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fh = open(lock, "a+")  # noqa: SIM115 - held open for the whole block
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fh)
            if not wait:
                fh.close()
                raise RunLockedError(f"{flag} {path} is in use by another running process ({holder}); wait for it "
                                     f"to finish or choose another {flag}") from None
            print(f"waiting for another run to finish with {path} ({holder})", file=sys.stderr, flush=True)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:  # the holder before removed the file at its release: lock the one that is there now
            same = os.path.samestat(os.fstat(fh.fileno()), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": shlex.join(sys.argv)}))
        fh.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        fh.close()  # releases the lock


def _first_nonfinite(state: dict[str, Any]) -> str | None:
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            return name
    return None


def save(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    input_shape: tuple[int, int, int],
    dataset: str | None = None,
    classes: list[str] | None = None,
    metrics: dict[str, float] | None = None,
    train_config: dict[str, Any] | None = None,
    plan: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a self-describing checkpoint of ``model`` (see the module docstring).

    Refuses (:class:`CheckpointError`) a model with NaN/inf weights or statistics: garbage is not saved.
    """
    bad = _first_nonfinite(model.state_dict())
    if bad is not None:
        raise CheckpointError(f"not saving {path}: the model's {bad} holds NaN/inf values (a diverged training?)")
    blob: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "input_shape": [int(s) for s in input_shape],
        "dataset": dataset,
        "classes": classes,
        "metrics": dict(metrics or {}),
        "train_config": train_config,
        "plan": plan,
        "extra": dict(extra or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if getattr(model, "arch", None) in list_models():
        blob["spec"] = channel_spec(model).to_dict()
    else:
        blob["module"] = model
    atomic_save(blob, path)


def load(
    path: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    expect_arch: str | None = None,
    trust_pickle: bool = False,
) -> Checkpoint:
    """Load a checkpoint written by :func:`save`.

    Args:
        path: the ``.pt`` file.
        map_location: device for the weights.
        expect_arch: if given, raise :class:`CheckpointError` unless the checkpoint holds this architecture.
        trust_pickle: allow loading a user's own pickled module (arbitrary code: only for files you trust).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=not trust_pickle)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not trust_pickle and ("weights_only" in str(exc) or "Unsupported global" in str(exc)):
            raise CheckpointError(
                f"{path} contains a pickled user module; load it with trust_pickle=True if you trust the file"
            ) from None
        raise CheckpointError(f"cannot read checkpoint {path}: {msg}") from None
    if not isinstance(blob, dict) or "format_version" not in blob:
        raise CheckpointError(
            f"{path} is not a pruning_env checkpoint (no format_version); save models with "
            "pruning_env.core.checkpoint.save"
        )
    if blob["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {blob['format_version']}, newer than this package's {FORMAT_VERSION}; "
            "upgrade pruning-env"
        )
    if "spec" in blob:
        spec = ModelSpec.from_dict(blob["spec"])
        if expect_arch is not None and spec.arch != expect_arch:
            raise CheckpointError(f"{path} holds a {spec.arch}, not a {expect_arch}")
        model = build_from_spec(spec)
        try:
            model.load_state_dict(blob["state_dict"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: its weights do not fit its recorded architecture "
                                  f"({str(exc).splitlines()[0]})") from None
    else:
        model = blob["module"]
        if expect_arch is not None:
            raise CheckpointError(f"{path} holds a user model ({type(model).__name__}), not a {expect_arch}")
    bad = _first_nonfinite(model.state_dict())
    if bad is not None:
        raise CheckpointError(f"{path} holds NaN/inf values in {bad}: the network is not usable (retrain it; a "
                              "diverged training?)")
    model.to(map_location)
    return Checkpoint(
        model=model,
        input_shape=tuple(blob["input_shape"]),  # type: ignore[arg-type]
        dataset=blob.get("dataset"),
        classes=blob.get("classes"),
        metrics=blob.get("metrics") or {},
        train_config=blob.get("train_config"),
        plan=blob.get("plan"),
        extra=blob.get("extra") or {},
    )
