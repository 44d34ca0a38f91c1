"""Helpers shared by the benchmarks: heavy-job lock, peak RSS of a process tree, result fragments.

Every benchmark writes a markdown fragment to ``docs/benchmarks/<name>.md`` (with the exact command
and the machine); ``benchmarks/run_all.py`` concatenates them into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DOCS_DIR = PROJECT_ROOT / "docs" / "benchmarks"
REAL_DATA = PROJECT_ROOT.parent / "shared" / "data" / "PetImages"
DEFAULT_RUN = PROJECT_ROOT / "runs" / "effnet_lite12_frozen"
"""Where `make run` puts the default preset's run (Makefile OUT); trained-run benchmarks default to it."""
HEAVY_LOCK = Path("/tmp/catsdogs-heavy.lock")
# Set by run_all (which holds the lock for all benchmarks) so nested benchmarks do not deadlock.
LOCK_HELD_ENV = "CATSDOGS_HEAVY_LOCK_HELD"
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def _held_by_ancestor(fd: int) -> bool:
    """True when a parent process holds the flock on ``fd``'s file, e.g. ``flock LOCK python -m ...``.

    Without this check a benchmark started under ``flock(1)`` would wait forever for its own parent.
    """
    inode = os.fstat(fd).st_ino
    try:
        with open("/proc/locks") as fh:  # "1: FLOCK  ADVISORY  WRITE <pid> <maj:min:inode> 0 EOF"
            holders = {int(f[4]) for f in (line.split() for line in fh)
                       if len(f) > 5 and f[1] == "FLOCK" and f[5].rsplit(":", 1)[-1] == str(inode)}
        pid = os.getppid()
        while pid > 1:
            if pid in holders:
                return True
            pid = _parent(pid)
    except (OSError, ValueError, IndexError):
        return False
    return False


@contextmanager
def heavy_lock() -> Iterator[None]:
    """Hold ``/tmp/catsdogs-heavy.lock`` (same lock as ``flock(1)``) so heavy jobs run one at a time."""
    if os.environ.get(LOCK_HELD_ENV) == "1":
        yield
        return
    with open(HEAVY_LOCK, "a") as fh:
        if _held_by_ancestor(fh.fileno()):
            yield
            return
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {HEAVY_LOCK} (another heavy job runs)...", file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        os.environ[LOCK_HELD_ENV] = "1"  # children (and nested helpers) already hold it through us
        try:
            yield
        finally:
            os.environ.pop(LOCK_HELD_ENV, None)
            fcntl.flock(fh, fcntl.LOCK_UN)


def _children() -> dict[int, list[int]]:
    """Return parent pid -> child pids for every process visible in /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4; the name (field 2) may hold spaces
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_pids(root: int) -> list[int]:
    """Return ``root`` and all its descendants' pids."""
    tree = _children()
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(tree.get(pid, []))
    return out


def tree_rss(root: int) -> int:
    """Return the summed resident set size in bytes of ``root`` and all its descendants."""
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * _PAGE
        except OSError:
            continue
    return total


def _cpu_and_label(pid: int, root: int) -> tuple[float, str] | None:
    """Return (user+system CPU seconds, kind) of a process: driver, java, pyspark or its name."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat.rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime (fields 14, 15)
    if pid == root:
        label = "driver"
    elif name == "java":
        label = "jvm"
    elif "pyspark.daemon" in cmd or "pyspark.worker" in cmd:
        label = "python workers"
    else:
        label = name
    return cpu, label


class Sampler:
    """Call :meth:`sample` every ``interval`` seconds in a daemon thread while the ``with`` block runs.

    Subclasses implement ``sample``; returning False stops the thread early (e.g. the process is gone).
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> bool | None:
        raise NotImplementedError

    def _run(self) -> None:
        while self.sample() is not False and not self._stop.wait(self.interval):
            pass

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class PeakRSS(Sampler):
    """Sample the RSS of a process tree in a thread (every ``interval`` s) and keep the peak.

    Also keeps each process's last seen CPU seconds; :attr:`cpu_by_kind` sums them per kind
    (driver, jvm, python workers, ...), accurate to one sampling interval for processes that exit.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.1) -> None:
        super().__init__(interval)
        self.pid = pid or os.getpid()
        self.peak = 0
        self._cpu: dict[int, tuple[float, str]] = {}

    def sample(self) -> None:
        self.peak = max(self.peak, tree_rss(self.pid))
        for pid in tree_pids(self.pid):
            seen = _cpu_and_label(pid, self.pid)
            if seen is not None:
                self._cpu[pid] = seen

    @property
    def cpu_by_kind(self) -> dict[str, float]:
        """Return CPU seconds per process kind over the sampled tree."""
        out: dict[str, float] = {}
        for cpu, label in self._cpu.values():
            out[label] = out.get(label, 0.0) + cpu
        return out

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


def machine() -> str:
    """Return the date and a one-line description of this machine for result fragments."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0))
    mem = os.sysconf("SC_PHYS_PAGES") * _PAGE / 2**30
    return (f"{datetime.date.today().isoformat()}, {cores} cores ({cpu}), {mem:.0f} GiB RAM, "
            f"Python {platform.python_version()}, {platform.system()}")


def write_fragment(name: str, markdown: str) -> Path:
    """Write ``docs/benchmarks/<name>.md`` and return its path."""
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    path = DOCS_DIR / f"{name}.md"
    path.write_text(markdown.rstrip() + "\n")
    return path


class Timer:
    """Context manager measuring wall seconds (``perf_counter``)."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
