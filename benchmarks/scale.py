"""Scale benchmark: preprocessing and training on 1x, 2x and 4x the real PetImages (18,000 photos).

Bigger inputs are made without copying data: a temporary tree holds k symlinks per real file under
different names. For each scale it runs ``catsdogs preprocess`` and then a bounded ``catsdogs
train`` (``--max-steps``) as subprocesses, and samples the memory of each whole process tree
(driver, Spark JVM, Python workers; RSS and PSS) every 0.25 s. Claims checked: preprocessing
throughput at 4x within 20% of 1x, and training peak memory flat (+-10%) from 1x to 4x.

Usage: ``flock /tmp/catsdogs-heavy.lock .venv/bin/python -m benchmarks.scale [--scales 1 2 4]``
(about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._common import REAL_DATA, heavy_lock, machine, write_fragment

_PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 2**20


# ------------------------------------------------------------------------------ memory sampling
def _proc_table() -> dict[int, tuple[int, str]]:
    """Return pid -> (parent pid, command line) for every visible process."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (ppid, cmd)
    return table


def _role(pid: int, root: int, cmd: str) -> str:
    """Classify a process of the tree: driver (the catsdogs command), jvm, workers (python children)."""
    if pid == root:
        return "driver"
    if "java" in cmd.split(" ", 1)[0] or "org.apache.spark" in cmd:
        return "jvm"
    return "workers"


def _mem(pid: int) -> tuple[int, int]:
    """Return (RSS, PSS) of one process in bytes; PSS splits shared pages between their users."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/statm") as fh:
            rss = int(fh.read().split()[1]) * _PAGE
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return rss, pss


def _cpu_ticks(pid: int) -> int:
    """Return utime + stime of one process in clock ticks (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # stat fields 14 and 15
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class TreeMemory:
    """Peak memory of a process tree, sampled in a thread; totals and per role."""

    root: int
    interval: float = 0.25
    peak_rss: int = 0
    peak_pss: int = 0
    peak_by_role: dict[str, int] = field(default_factory=dict)
    """Peak RSS per role (each role's own peak; they need not coincide in time)."""
    cpu_ticks: dict[int, int] = field(default_factory=dict)
    """Last seen user+system clock ticks per pid of the tree (summed: CPU seconds of the run)."""
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _cmd) in table.items():
            children.setdefault(ppid, []).append(pid)
        stack, rss_total, pss_total = [self.root], 0, 0
        roles: dict[str, int] = {}
        while stack:
            pid = stack.pop()
            stack.extend(children.get(pid, []))
            if pid not in table:
                continue
            rss, pss = _mem(pid)
            self.cpu_ticks[pid] = max(self.cpu_ticks.get(pid, 0), _cpu_ticks(pid))
            rss_total += rss
            pss_total += pss
            role = _role(pid, self.root, table[pid][1])
            roles[role] = roles.get(role, 0) + rss
        self.peak_rss = max(self.peak_rss, rss_total)
        self.peak_pss = max(self.peak_pss, pss_total)
        for role, value in roles.items():
            self.peak_by_role[role] = max(self.peak_by_role.get(role, 0), value)

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds used by the tree (up to the last sample of each process)."""
        return sum(self.cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self._stop.set()


def run_measured(cmd: list[str], log: Path) -> tuple[float, TreeMemory, str]:
    """Run ``cmd``, sampling its process tree; return (wall seconds, memory, stdout)."""
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        mem = TreeMemory(proc.pid)
        thread = threading.Thread(target=mem.run, daemon=True)
        thread.start()
        out, _ = proc.communicate()
        mem.stop()
        thread.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n"
                           f"{log.read_text()[-2000:]}")
    return wall, mem, out


# ------------------------------------------------------------------------------ inputs
def make_tree(src: Path, dest: Path, copies: int) -> int:
    """Fill ``dest`` with ``copies`` symlinks per image of ``src`` (class folders kept); return count."""
    n = 0
    for cls_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        out = dest / cls_dir.name
        out.mkdir(parents=True)
        for f in sorted(cls_dir.iterdir()):
            for c in range(copies):
                (out / f"c{c}_{f.name}").symlink_to(f)
                n += 1
    return n


def warm_cache(src: Path) -> None:
    """Read every input file once so each scale reads from the page cache (decode is what scales)."""
    for f in src.rglob("*"):
        if f.is_file():
            f.read_bytes()


# ------------------------------------------------------------------------------ benchmark
@dataclass
class Row:
    scale: int
    images: int
    pre_wall: float
    pre_ips: float
    job_ips: float
    spark_start: float
    task_ms: float
    """Sum of the tasks' read+decode+write seconds per image, in ms (excludes fixed start-up costs)."""
    pre_cpu: float
    """CPU seconds of the whole preprocess process tree."""
    load: float
    """1-minute load average just before the best preprocess run (2 = both cores busy elsewhere)."""
    pre_mem: TreeMemory
    train_wall: float
    train_ips: float
    train_mem: TreeMemory
    shard_mib: float


def bench_scale(k: int, src: Path, work: Path, args: argparse.Namespace) -> Row:
    tree = work / f"x{k}" / "PetImages"
    n = make_tree(src, tree, k)
    shards, run = work / f"x{k}" / "shards", work / f"x{k}" / "run"
    cli = [sys.executable, "-m", "catsdogs.cli"]
    best: tuple[float, TreeMemory, dict, float] | None = None  # type: ignore[type-arg]
    for rep in range(args.repeats):  # best of N: other users of the 2 cores only ever slow a run down
        print(f"[{k}x] preprocess {n:,} images (run {rep + 1}/{args.repeats}) ...", flush=True)
        load = os.getloadavg()[0]
        wall, mem, _ = run_measured(
            [*cli, "preprocess", "--input", str(tree), "--output", str(shards), "--size", str(args.size),
             "--overwrite"], work / f"preprocess-{k}x.log")
        stats = json.loads((shards / "manifest.json").read_text())["stats"]
        if best is None or wall < best[0]:
            best = (wall, mem, stats, load)
    assert best is not None
    pre_wall, pre_mem, stats, load = best
    task_ms = 1000 * sum(stats.get("task_seconds", {}).values()) / n
    shard_mib = sum(p.stat().st_size for p in shards.rglob("*.npy")) / MiB
    print(f"[{k}x] train {args.steps} steps ...", flush=True)
    train_wall, train_mem, out = run_measured(
        [*cli, "train", "--data", str(shards), "--output", str(run), "--model", args.model, "--epochs", "1",
         "--max-steps", str(args.steps), "--batch-size", str(args.batch_size)],
        work / f"train-{k}x.log")
    m = re.search(r"\((\d+) img/s train\)", out)
    row = Row(k, n, pre_wall, n / pre_wall, float(stats.get("job_images_per_s", 0.0)),
              float(stats.get("spark_start_s", 0.0)), task_ms, pre_mem.cpu_seconds, load, pre_mem,
              train_wall, float(m.group(1)) if m else 0.0, train_mem, shard_mib)
    print(f"[{k}x] preprocess {pre_wall:.1f} s ({row.pre_ips:.0f} img/s, job {row.job_ips:.0f} img/s, "
          f"task {task_ms:.2f} ms/img, {row.pre_cpu:.0f} CPU s, load {load:.1f}), peak RSS "
          f"{pre_mem.peak_rss / MiB:.0f} MiB; train {train_wall:.1f} s, peak RSS "
          f"{train_mem.peak_rss / MiB:.0f} MiB", flush=True)
    shutil.rmtree(work / f"x{k}", ignore_errors=True)  # 4x shards are ~0.9 GB
    return row


def render(rows: list[Row], args: argparse.Namespace, command: str, total: float) -> str:
    def mib(v: int) -> str:
        return f"{v / MiB:,.0f}"

    base = rows[0]
    lines = [
        "## Scale: 1x / 2x / 4x the PetImages data",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}; CPU only. Total {total / 60:.1f} min.",
        "",
        f"Inputs: k symlinks per real image (18,000 photos), preprocess `--size {args.size}` with `local[*]` "
        f"(one Spark task per 1,500-image shard; best wall time of {args.repeats} runs per scale), then "
        f"`catsdogs train --model {args.model} --epochs 1 --max-steps {args.steps} --batch-size "
        f"{args.batch_size}` (a bounded number of steps, then a full validation pass over the val split, "
        "which grows with k). Page cache warmed before the 1x run. Memory and CPU are sampled every "
        "0.25 s over the whole process tree: RSS summed over processes (shared pages counted once per "
        "process) and PSS (shared pages split, the honest total). \"task ms/img\" is the tasks' own "
        "read+decode+write time per image (no start-up costs); \"load\" is the 1-minute load average "
        "before the run (other users of the 2 cores).",
        "",
        "| scale | images | preprocess wall s | img/s end-to-end | img/s Spark job | task ms/img "
        "| CPU s (ms/img) | load | Spark start s | preprocess peak RSS MiB (PSS) "
        "| driver / JVM / Python workers RSS MiB | shards MiB | train wall s | train img/s "
        "| train peak RSS MiB (PSS) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        roles = r.pre_mem.peak_by_role
        lines.append(
            f"| {r.scale}x | {r.images:,} | {r.pre_wall:.1f} | {r.pre_ips:,.0f} | {r.job_ips:,.0f} "
            f"| {r.task_ms:.2f} | {r.pre_cpu:.0f} ({1000 * r.pre_cpu / r.images:.2f}) | {r.load:.1f} "
            f"| {r.spark_start:.1f} "
            f"| {mib(r.pre_mem.peak_rss)} ({mib(r.pre_mem.peak_pss)}) "
            f"| {mib(roles.get('driver', 0))} / {mib(roles.get('jvm', 0))} / {mib(roles.get('workers', 0))} "
            f"| {r.shard_mib:,.0f} | {r.train_wall:.1f} | {r.train_ips:,.0f} "
            f"| {mib(r.train_mem.peak_rss)} ({mib(r.train_mem.peak_pss)}) |")
    top = rows[-1]

    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    job_ratio, e2e_ratio = ratio(top.job_ips, base.job_ips), ratio(top.pre_ips, base.pre_ips)
    task_ratio = ratio(top.task_ms, base.task_ms)
    cpu_ratio = ratio(top.pre_cpu / top.images, base.pre_cpu / base.images)
    mem_ratio = ratio(top.train_mem.peak_rss, base.train_mem.peak_rss)
    pre_mem_ratio = ratio(top.pre_mem.peak_rss, base.pre_mem.peak_rss)

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    lines += [
        "",
        f"Checks ({top.scale}x vs 1x):",
        f"- preprocessing throughput, Spark job: {job_ratio:.2f}x of 1x "
        f"({verdict(job_ratio >= 0.8)}: not more than 20% slower); end to end incl. JVM start and "
        f"listing: {e2e_ratio:.2f}x ({verdict(e2e_ratio >= 0.8)}). Per-image task time {task_ratio:.2f}x "
        "of 1x" + (": the work per image does not grow with the data, so higher throughput at larger "
                   "scale comes from fixed costs (JVM and Python worker start-up, imports, the last, "
                   "partly idle wave of tasks) spread over more images." if 0.8 <= task_ratio <= 1.2
                   and job_ratio > 1.1 else "."),
        f"- preprocessing CPU per image (all processes, robust to other load on the machine): "
        f"{cpu_ratio:.2f}x of 1x ({verdict(cpu_ratio <= 1.2)}: not more than 20% more CPU per image).",
        f"- training peak RSS: {mem_ratio:.2f}x of 1x ({verdict(abs(mem_ratio - 1) <= 0.10)}: flat within "
        "+-10%; the loader holds one shuffle buffer plus one memory-mapped shard, whatever the data size).",
        f"- preprocessing peak RSS: {pre_mem_ratio:.2f}x of 1x (tasks write their own shards; the driver "
        "only collects per-image metadata rows, which grow with the image count).",
        "",
        "GPU: no GPU was available on this machine, so the `--device cuda` path (DDP over nccl, bfloat16 "
        "autocast) could not be benchmarked here; its selection logic is unit-tested on CPU "
        "(tests/test_distributed.py).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--data", type=Path, default=REAL_DATA)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=150, help="training optimiser steps per scale")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="seed")
    parser.add_argument("--repeats", type=int, default=2, help="preprocess runs per scale (best is kept)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"real data not found at {args.data}; pass --data PetImages", file=sys.stderr)
        return 2
    command = "flock /tmp/catsdogs-heavy.lock .venv/bin/python -m benchmarks.scale" + (
        " " + " ".join(argv if argv is not None else sys.argv[1:]) if (argv or sys.argv[1:]) else "")
    work = Path(tempfile.mkdtemp(prefix="catsdogs-scale-", dir=args.work))
    t0 = time.perf_counter()
    try:
        with heavy_lock():
            warm_cache(args.data)
            rows = [bench_scale(k, args.data, work, args) for k in args.scales]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = write_fragment("scale", render(rows, args, command, time.perf_counter() - t0))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
