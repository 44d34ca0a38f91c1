"""Process-level settings for compute commands: threads, allocator tuning, device, seeding.

Called at the start of train/evaluate/predict/serve, never at import time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import random
import sys
import threading

import numpy as np
import torch

from catsdogs.devices import AUTO, CUDA
from catsdogs.errors import ConfigError

# glibc mallopt parameters (malloc.h). Training allocates and frees the same multi-MB activation
# buffers every step; above the default 128 KiB mmap threshold each one is a fresh mmap + page faults
# + munmap, which measured as much system time as compute. Keeping them in the heap removes that.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 512 * 1024 * 1024  # largest block kept in the heap instead of mmap
_TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024  # free heap kept before returning memory to the OS


def tune_malloc() -> bool:
    """Raise glibc's mmap/trim thresholds so tensor buffers are reused; return True if applied.

    Set ``CATSDOGS_NO_MALLOC_TUNING=1`` to keep glibc's defaults (e.g. to compare in a benchmark).
    """
    if os.environ.get("CATSDOGS_NO_MALLOC_TUNING") == "1":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1
        return bool(ok)
    except (OSError, AttributeError):  # not glibc (musl, macOS): keep the platform allocator
        return False


def cores() -> int:
    """Return the number of CPU cores this process may use (its affinity mask, else the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def lower_thread_priority(niceness: int) -> bool:
    """Add ``niceness`` to the calling thread's nice value; return True if applied (Linux only).

    Used as a thread-pool initializer for work that may wait while a heavier thread runs. Only Linux
    takes a thread id where ``setpriority`` expects a process id; elsewhere the id could name another
    process, so nothing is changed.
    """
    if niceness <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + niceness)
        return True
    except OSError:  # refused (a sandbox without the syscall): the threads keep their priority
        return False


def set_threads(threads: int | None) -> int:
    """Set torch intra-op threads (None or 0: every core available to this process); return the count."""
    n = max(1, int(threads or cores()))
    torch.set_num_threads(n)
    return n


def select_device(name: str) -> torch.device:
    """Resolve ``--device auto|cpu|cuda``; asking for cuda without a GPU is a user error."""
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == CUDA and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def setup(threads: int | None = None, device: str = AUTO, seed: int | None = None) -> torch.device:
    """Apply allocator tuning, thread count and seed; return the device to run on."""
    tune_malloc()
    set_threads(threads)
    if seed is not None:
        seed_everything(seed)
    return select_device(device)
