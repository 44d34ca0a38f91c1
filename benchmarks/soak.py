"""Soak test of ``catsdogs serve``: minutes of mixed good and hostile uploads on loopback.

Starts the real server (``python -m catsdogs.cli serve``, 127.0.0.1 only, default limits), then 16
keep-alive clients send a fixed mix of requests until a request count OR a time limit is reached:
real PetImages JPEGs, and bad uploads (empty file, HTML saved as .jpg, random bytes, truncated
JPEG, a PNG declaring 30000x30000 pixels, a body over ``--max-bytes``, a JSON body, a text/plain
part). It checks every answer (200 with a label for good images; a 4xx JSON ``{"error", "detail"}``
with the expected code for bad ones; never a 5xx) and samples the server's RSS (VmRSS in
``/proc/<pid>/status``) twice a second. Passes when there are 0 5xx, 0 wrong answers, 0 dropped
connections, and RSS is flat: the median of the last quarter is within 16 MiB of the second quarter.

Usage: ``flock /tmp/catsdogs-heavy.lock .venv/bin/python -m benchmarks.soak [--seconds 120]
[--requests 100000] [--clients 16]``; writes docs/benchmarks/soak.md. Exit status 1 if it fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks._common import PROJECT_ROOT, REAL_DATA, Sampler, heavy_lock, machine, write_fragment
from benchmarks.serve import free_port, stop_server, wait_healthy

BOUNDARY = "catsdogssoakboundary"
MAX_BYTES = 10 * 1024 * 1024  # the server's default --max-bytes
DRIFT_LIMIT_MIB = 16.0


@dataclass(frozen=True)
class Kind:
    """One kind of request: its weight in the mix and the answer it must get."""

    name: str
    weight: int
    status: int
    error: str = ""  # expected JSON "error" code for refusals


KINDS = (
    Kind("good_jpeg", 60, 200),
    Kind("empty", 5, 400, "empty_file"),
    Kind("html_as_jpg", 5, 400, "not_an_image"),
    Kind("random_bytes", 5, 400, "not_an_image"),
    Kind("truncated_jpeg", 5, 400, "corrupt"),
    Kind("bomb_png", 5, 400, "decompression_bomb"),
    Kind("json_body", 5, 415, "unsupported_media_type"),
    Kind("text_part", 5, 415, "unsupported_media_type"),
    Kind("oversized_body", 2, 413, "payload_too_large"),
)


def multipart(data: bytes, name: str, ctype: str) -> bytes:
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: {ctype}\r\n\r\n").encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def post(port: int, body: bytes, ctype: str = f"multipart/form-data; boundary={BOUNDARY}") -> bytes:
    return (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def build_requests(port: int, jpegs: list[bytes]) -> dict[str, list[bytes]]:
    """Prepared raw HTTP requests per kind (several variants each, cycled)."""
    sys.path.insert(0, str(PROJECT_ROOT))
    from tests.fixtures import bomb_png

    rng = np.random.default_rng(0)
    jpeg = "image/jpeg"
    return {
        "good_jpeg": [post(port, multipart(j, f"{i}.jpg", jpeg)) for i, j in enumerate(jpegs)],
        "empty": [post(port, multipart(b"", "empty.jpg", jpeg))],
        "html_as_jpg": [post(port, multipart(b"<html><body>404 not found</body></html>", "page.jpg", jpeg))],
        "random_bytes": [post(port, multipart(rng.integers(0, 256, n, dtype=np.uint8).tobytes(), "r.jpg",
                                              "application/octet-stream")) for n in (100, 4096, 65536)],
        "truncated_jpeg": [post(port, multipart(j[: len(j) // 3], "t.jpg", jpeg)) for j in jpegs[:8]],
        "bomb_png": [post(port, multipart(bomb_png(), "bomb.png", "image/png"))],
        "json_body": [post(port, b'{"image": "cat.jpg"}', "application/json")],
        "text_part": [post(port, multipart(b"just text", "notes.txt", "text/plain"))],
        "oversized_body": [post(port, multipart(b"\xff\xd8\xff" + bytes(MAX_BYTES), "huge.jpg", jpeg))],
    }


@dataclass
class Tally:
    """Outcome counters of the whole soak."""

    sent: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    wrong: Counter[str] = field(default_factory=Counter)
    status: Counter[int] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    good_ms: list[float] = field(default_factory=list)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def judge(kind: Kind, status: int, headers: dict[str, str], body: bytes) -> str:
    """Return "" when the answer is right for this kind of request, else what is wrong."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{status} non-JSON body {body[:80]!r}"
    if not headers.get("content-type", "").startswith("application/json"):
        return f"{status} content-type {headers.get('content-type')!r}"
    if status != kind.status:
        return f"status {status} (want {kind.status}): {body[:120]!r}"
    if kind.status == 200:
        return "" if data.get("label") else f"200 without label: {body[:120]!r}"
    if data.get("error") != kind.error or not data.get("detail"):
        return f"{status} error {data.get('error')!r} (want {kind.error!r})"
    return ""


async def soak(port: int, requests: dict[str, list[bytes]], clients: int, max_requests: int,
               seconds: float, seed: int = 0, only: str = "") -> tuple[Tally, float]:
    """Run ``clients`` keep-alive connections until ``max_requests`` or ``seconds`` (one kind: ``only``)."""
    tally = Tally()
    kinds = {k.name: k for k in KINDS}
    rng = random.Random(seed)
    schedule = ([only] * max_requests if only else
                rng.choices([k.name for k in KINDS], weights=[k.weight for k in KINDS], k=max_requests))
    issued = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def client() -> None:
        nonlocal issued
        reader = writer = None
        while issued < max_requests and time.perf_counter() < deadline:
            name = schedule[issued]
            req = requests[name][issued % len(requests[name])]
            issued += 1
            tally.sent[name] += 1
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                t0 = time.perf_counter()
                writer.write(req)
                status, headers, body = await read_response(reader)
                ms = (time.perf_counter() - t0) * 1000
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                tally.dropped[name] += 1
                if len(tally.examples) < 20:
                    tally.examples.append(f"{name}: connection error {type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            tally.status[status] += 1
            problem = judge(kinds[name], status, headers, body)
            if problem:
                tally.wrong[name] += 1
                if len(tally.examples) < 20:
                    tally.examples.append(f"{name}: {problem}")
            else:
                tally.ok[name] += 1
                if name == "good_jpeg":
                    tally.good_ms.append(ms)
            if headers.get("connection", "").lower() == "close":  # e.g. after a 413: reconnect
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return tally, time.perf_counter() - start


def vm_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler(Sampler):
    """Sample a process's VmRSS every ``interval`` seconds in a thread: (seconds, MiB) pairs."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(interval)
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self._t0: float | None = None

    def sample(self) -> bool:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        try:
            self.samples.append((time.perf_counter() - self._t0, vm_rss_mib(self.pid)))
        except (OSError, RuntimeError):
            return False  # the server is gone
        return True


def start_server(run: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "catsdogs.cli", "serve", "--run", str(run), "--host", "127.0.0.1",
           "--port", str(port), "--rate-limit", "0", "--max-uploads", "0"]  # one client: soak, don't limit
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=fh, stderr=subprocess.STDOUT)
    return wait_healthy(proc, port, lambda: log.read_text()[-2000:])


def load_jpegs(n: int) -> list[bytes]:
    files: list[Path] = []
    for cls in ("Cat", "Dog"):
        files += sorted((REAL_DATA / cls).glob("*.jpg"), key=lambda p: int(p.stem))[: n // 2]
    if not files:
        raise SystemExit(f"no JPEGs found under {REAL_DATA}")
    return [p.read_bytes() for p in files]


def quarter_medians(samples: list[tuple[float, float]], t_start: float, t_end: float) -> list[float]:
    """Median RSS of each quarter of the load phase [t_start, t_end]."""
    span = (t_end - t_start) / 4
    out = []
    for q in range(4):
        vals = [m for t, m in samples if t_start + q * span <= t <= t_start + (q + 1) * span]
        out.append(statistics.median(vals) if vals else float("nan"))
    return out


def render(args: argparse.Namespace, tally: Tally, elapsed: float, rss: dict[str, float],
           quarters: list[float], verdict: dict[str, bool], server_log_tail: str) -> str:
    cmd = "flock /tmp/catsdogs-heavy.lock .venv/bin/python -m benchmarks.soak " + " ".join(args.argv)
    total = sum(tally.sent.values())
    lines = [
        "## Soak test (`catsdogs serve` under mixed good and hostile uploads)", "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {machine()}; server and load generator share these cores.  ",
        f"Server: `catsdogs serve` with default limits (`--max-bytes {MAX_BYTES}`, `--max-pixels 89478485`), "
        f"untrained 64x64 seed CNN (`tests.fixtures.make_run(size=64)`), 127.0.0.1 only.  ",
        f"Load: {args.clients} keep-alive clients, bounded by {args.requests} requests and "
        f"{args.seconds:.0f} s; "
        f"sent {total} requests in {elapsed:.1f} s ({total / elapsed:.0f} req/s overall).", "",
        "| request kind | sent | right answer | wrong answer | dropped connection | expected |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for k in KINDS:
        want = "200 + label" if k.status == 200 else f"{k.status} `{k.error}`"
        lines.append(f"| {k.name} | {tally.sent[k.name]} | {tally.ok[k.name]} | {tally.wrong[k.name]} | "
                     f"{tally.dropped[k.name]} | {want} |")
    ms = np.array(tally.good_ms) if tally.good_ms else np.zeros(1)
    n5xx = sum(c for s, c in tally.status.items() if s >= 500)
    lines += [
        "",
        f"Status codes: {dict(sorted(tally.status.items()))}; 5xx: **{n5xx}**.  ",
        f"Good-image latency under this mix: p50 {np.percentile(ms, 50):.1f} ms, "
        f"p99 {np.percentile(ms, 99):.1f} ms.  ",
        f"Server RSS (VmRSS, MiB): after warm-up {rss['start']:.1f}, peak {rss['peak']:.1f}, "
        f"end {rss['end']:.1f} (kernel high-water mark VmHWM {rss['hwm']:.1f}); medians per quarter of "
        f"the load: {', '.join(f'{q:.1f}' for q in quarters)}.", "",
        "Verdict: " + "; ".join(f"{name} **{'PASS' if ok else 'FAIL'}**" for name, ok in verdict.items())
        + f" (flat = last-quarter median within {DRIFT_LIMIT_MIB:.0f} MiB of the second quarter).",
    ]
    if tally.examples:
        lines += ["", "First problems seen:", ""] + [f"- `{e}`" for e in tally.examples[:10]]
    if server_log_tail.strip():
        lines += ["", "Server log tail:", "", "```", server_log_tail.strip()[-1500:], "```"]
    return "\n".join(lines)


def vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="time limit of the load phase")
    parser.add_argument("--requests", type=int, default=100000, help="request limit of the load phase")
    parser.add_argument("--clients", type=int, default=16, help="concurrent keep-alive connections")
    parser.add_argument("--images", type=int, default=200, help="distinct real JPEGs cycled through")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    jpegs = load_jpegs(args.images)
    with heavy_lock(), tempfile.TemporaryDirectory(prefix="catsdogs-soak-") as tmp:
        sys.path.insert(0, str(PROJECT_ROOT))
        from tests.fixtures import make_run

        run = make_run(Path(tmp) / "run", size=64)
        port = free_port()
        log = Path(tmp) / "server.log"
        proc = start_server(run, port, log)
        try:
            requests = build_requests(port, jpegs)
            with RssSampler(proc.pid) as sampler:
                # Warm-up with good images only: model, thread pools and allocator reach steady state.
                asyncio.run(soak(port, requests, args.clients, 400, 60, only="good_jpeg"))
                time.sleep(1.0)
                rss_start = vm_rss_mib(proc.pid)
                t_start = sampler.samples[-1][0] if sampler.samples else 0.0
                tally, elapsed = asyncio.run(soak(port, requests, args.clients, args.requests, args.seconds))
                t_end = sampler.samples[-1][0] if sampler.samples else 0.0
                time.sleep(2.0)  # idle: whatever the load left behind
                rss_end = vm_rss_mib(proc.pid)
            hwm = vm_hwm_mib(proc.pid)
            alive = proc.poll() is None
        finally:
            stop_server(proc)
        load_samples = [m for t, m in sampler.samples if t >= t_start]
        rss = {"start": rss_start, "peak": max(load_samples), "end": rss_end, "hwm": hwm}
        quarters = quarter_medians(sampler.samples, t_start, t_end)
        n5xx = sum(c for s, c in tally.status.items() if s >= 500)
        verdict = {
            "0 5xx": n5xx == 0,
            "every answer right": not tally.wrong,
            "0 dropped connections": not tally.dropped,
            "server alive": alive,
            "RSS flat": quarters[3] - quarters[1] <= DRIFT_LIMIT_MIB,
        }
        text = render(args, tally, elapsed, rss, quarters, verdict, log.read_text(errors="replace"))
    path = write_fragment("soak", text)
    print(text)
    print(f"wrote {path}", file=sys.stderr)
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
