"""Where a result came from: the git commit and a one-line description of the machine.

Every benchmark writes both next to its numbers, so a results table can be traced and
compared only with tables measured on the same kind of machine.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["git_commit", "machine_description"]


def git_commit(cwd: str | os.PathLike) -> str:
    """Short hash of ``HEAD`` in ``cwd``, marked when the working tree has uncommitted changes."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=cwd)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10,
                                   cwd=cwd).stdout.strip()
            return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    return "none (not a git checkout, or no commit yet)"


def machine_description(*, load: bool = True) -> str:
    """CPU model, cores, GPU, OS, Python, torch version and threads (and the load average)."""
    cpu = platform.processor() or platform.machine() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    text = (f"{cpu}, {os.cpu_count()} logical cores{gpu}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, torch threads {torch.get_num_threads()}")
    if load and hasattr(os, "getloadavg"):
        text += ", load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return text
