"""The KD teacher's outputs, memoised across fine-tunes that replay the same batches.

A benchmark fine-tunes many pruned networks with one recipe and one seed (the reward-fidelity
truth, the proxy KD steps, every method's final fine-tune in ``benchmarks/marl.py``): every run
draws the SAME augmented training batches, and the unpruned teacher, in eval mode, gives the
same logits for them each time. Its forward pass is 40-55 % of a KD step at MACs ratios 0.5-0.3
(the teacher costs 1, the student's forward and backward about 3 x its MACs ratio), so
computing it once per batch and reading it back afterwards is the cheapest speed-up there is.

:class:`TeacherCache` is content-addressed: the key of a batch is a hash of its bytes (shape,
dtype and values), so a hit is the teacher's output for exactly that input: a different seed,
augmentation or batch size simply misses. The teacher's weights are fingerprinted too: when
they change, the cache empties itself. On CPU a cached output is bit-identical to a fresh one
(same input, same weights, eval mode, same autocast state and torch thread count); the tests
check that fine-tunes with and without the cache end with identical weights. Hashing costs
a small share of a teacher forward (the measured cost and gain: ``benchmarks/results/teacher_cache.md``).

Only CPU inputs are cached: on CUDA the teacher is cheap, and hashing would copy each batch to
the host and break the loops' sync-free fast path, so the cache calls the teacher directly there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

from pruning_env.core.checkpoint import weights_digest

__all__ = ["TeacherCache", "teacher_fn"]


def _cpu_autocast() -> torch.dtype | None:
    """The dtype CPU autocast runs in now, or None when it is off (torch >= 2.4 API, else the older one)."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None  # pragma: no cover


def _digest(x: torch.Tensor) -> bytes:
    """The key of a batch: its shape, dtype and bytes, with the state that changes a forward pass's result (CPU
    autocast, torch's thread count: reductions are split differently)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(x.shape)}|{x.dtype}|{_cpu_autocast()}|{torch.get_num_threads()}".encode())
    h.update(x.detach().contiguous().numpy().tobytes())
    return h.digest()


class TeacherCache:
    """``cache(x)`` = ``teacher(x)`` under ``torch.no_grad()``, computed once per distinct CPU batch.

    Args:
        teacher: the unpruned network (put in eval mode by the loops that use it; not modified).
        max_bytes: the most memory the stored outputs may take; once full, further outputs are computed
            and not stored. Two epochs of CIFAR-10 at batch 128 take 3.6 MB (45,000 x 10 float32 logits).

    ``hits`` / ``misses`` count the batches served from memory / computed.
    """

    def __init__(self, teacher: nn.Module, *, max_bytes: int = 256 * 2**20) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.teacher = teacher
        self.max_bytes = int(max_bytes)
        self.hits = 0
        self.misses = 0
        self._store: dict[bytes, torch.Tensor] = {}
        self._bytes = 0
        self._weights: str | None = None

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        """Forget every stored output."""
        self._store.clear()
        self._bytes = 0

    def check_teacher(self) -> None:
        """Empty the cache if the teacher's weights changed since the outputs were stored (called by the loops
        once per run; cheap: one hash of the weights). Nothing to check for a teacher off the CPU (never cached;
        hashing would copy its weights to the host)."""
        if any(p.device.type != "cpu" for p in self.teacher.parameters()):
            return
        digest = weights_digest(self.teacher)
        if digest != self._weights:
            self.clear()
            self._weights = digest

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's output for ``x`` (``(B, ...)`` -> ``(B, classes)``), from memory when seen before."""
        if x.device.type != "cpu" or self.teacher.training:  # train mode: batch statistics, not a function of x
            with torch.no_grad():
                return self.teacher(x)
        key = _digest(x)
        out = self._store.get(key)
        if out is not None:
            self.hits += 1
            return out
        with torch.no_grad():
            out = self.teacher(x)
        self.misses += 1
        size = out.numel() * out.element_size()
        # When full, new outputs are not stored (nothing is evicted): the loops replay batches in the same order,
        # so evicting the oldest would drop every output before its reuse and never hit again.
        if self._bytes + size <= self.max_bytes:
            self._store[key] = out
            self._bytes += size
        return out


def teacher_fn(teacher: nn.Module, cache: TeacherCache | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The callable a KD loop asks for teacher outputs: ``cache`` (checked to wrap ``teacher``) or the teacher
    itself under ``no_grad``. Raises ``ValueError`` when the cache belongs to another network."""
    if cache is None:
        def direct(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return teacher(x)
        return direct
    if cache.teacher is not teacher:
        raise ValueError("teacher_cache wraps another network than this run's teacher: build a "
                         "TeacherCache(teacher) for the unpruned network you distil from")
    cache.check_teacher()
    return cache
