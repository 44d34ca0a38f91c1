"""Remote storage benchmark: the real PetImages from and to S3 (a local S3 server) vs local disk.

Starts moto's S3 server as its own process on 127.0.0.1, uploads ../shared/data/PetImages to
``s3a://pets/PetImages``, then runs through the CLI, each as a subprocess:

1. ``catsdogs preprocess`` local folder -> local folder (the reference);
2. ``catsdogs preprocess --input s3a://pets/PetImages --output s3a://pets/shards-...`` for each
   ``--read-threads`` value, directly and through a proxy that adds a round trip per request;
3. ``catsdogs train --data s3a://pets/shards --freeze ... --max-steps`` twice, timing the fetch into
   the cache (cold) and the sha256 check of an existing cache (warm).

Checks that the S3 output is byte-identical to the local one (files.csv and every shard's sha256).
The S3 server shares the 2 cores with Spark, so the S3 timings are an upper bound on catsdogs' own
overhead, not a measurement of AWS.

Usage: ``flock /tmp/catsdogs-heavy.lock .venv/bin/python -m benchmarks.remote_storage`` (~15 min).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import REAL_DATA, PeakRSS, heavy_lock, machine, write_fragment

CLI = [sys.executable, "-m", "catsdogs.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """Return user+system CPU seconds used so far by process ``pid``."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run a CLI command; return (wall s, peak RSS MiB of its process tree, stderr tail)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakRSS(proc.pid, interval=0.25) as rss:
        out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
    return wall, rss.peak_mib, (out + err)[-2000:]


def proxy(listen: int, target: int, delay_ms: float) -> None:
    """Forward 127.0.0.1:listen to 127.0.0.1:target, holding each new request ``delay_ms`` ms.

    A request is delayed once (the first bytes a client sends after the last response began), so
    this adds one network round trip per request like a remote object store, not a bandwidth cap.
    """
    import asyncio

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
        fresh = [True]  # next client bytes start a new request

        async def upstream() -> None:
            while data := await client_r.read(1 << 16):
                if fresh[0]:
                    fresh[0] = False
                    await asyncio.sleep(delay_ms / 1000)
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        async def downstream() -> None:
            while data := await server_r.read(1 << 16):
                fresh[0] = True
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        try:
            await asyncio.gather(upstream(), downstream())
        except (ConnectionError, OSError):
            client_w.close()
            server_w.close()

    async def serve() -> None:
        srv = await asyncio.start_server(handle, "127.0.0.1", listen)
        async with srv:
            await srv.serve_forever()

    asyncio.run(serve())


def wait_port(port: int) -> None:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REAL_DATA))
    parser.add_argument("--read-threads", type=int, nargs="+", default=[1, 16],
                        help="--read-threads values for the S3 preprocess runs")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0, 20],
                        help="round trip added to every S3 request by a local proxy (0: direct)")
    parser.add_argument("--proxy", type=int, nargs=3, metavar=("LISTEN", "TARGET", "MS"),
                        help=argparse.SUPPRESS)  # internal: run the latency proxy
    args = parser.parse_args()
    if args.proxy:
        proxy(args.proxy[0], args.proxy[1], float(args.proxy[2]))
        return
    data = Path(args.data)
    if not data.is_dir():
        raise SystemExit(f"real data not found at {data}")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1", "PYTHONUNBUFFERED": "1"}
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows: list[str] = []
    proxies: dict[float, tuple[subprocess.Popen[bytes], str]] = {}
    for ms in args.latency_ms:
        if ms:
            listen = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks.remote_storage", "--proxy",
                                     str(listen), str(port), str(int(ms))])
            proxies[ms] = (proc, f"http://127.0.0.1:{listen}")
    try:
        with heavy_lock(), tempfile.TemporaryDirectory(prefix="catsdogs-remote-") as tmp_s:
            tmp = Path(tmp_s)
            wait_port(port)
            import boto3
            import pyarrow.fs as pafs

            from catsdogs.io import storage

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="pets")
            s3 = storage.locate("s3a://pets").fs
            t0 = time.perf_counter()
            pafs.copy_files(str(data), "pets/PetImages", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=s3, use_threads=True)
            upload_s = time.perf_counter() - t0
            n_files = len(storage.list_files("s3a://pets/PetImages"))
            mb = sum(size for _, size in storage.list_files("s3a://pets/PetImages")) / 1e6
            common = ["--size", "64"]
            local_s, local_rss, _ = run([*CLI, "preprocess", "--input", str(data), "--output",
                                         str(tmp / "local"), *common], env)
            local_read_s = json.loads((tmp / "local" / "manifest.json").read_text())["stats"][
                "task_seconds"]["read"]
            local_manifest = json.loads((tmp / "local" / "manifest.json").read_text())
            remote_rows = []
            same_csv = same_shards = True
            for ms in args.latency_ms:
                run_env = env if not ms else {**env, "AWS_ENDPOINT_URL": proxies[ms][1]}
                for threads in args.read_threads:
                    out = f"s3a://pets/shards-{int(ms)}ms-{threads}"
                    cpu0 = cpu_seconds(server.pid)
                    remote_s, remote_rss, _ = run([*CLI, "preprocess", "--input", "s3a://pets/PetImages",
                                                   "--output", out, "--read-threads", str(threads), *common],
                                                  run_env)
                    busy = (cpu_seconds(server.pid) - cpu0) / remote_s
                    manifest = json.loads(storage.read_bytes(f"{out}/manifest.json"))
                    local_csv = (tmp / "local" / "files.csv").read_bytes()
                    same_csv &= storage.read_bytes(f"{out}/files.csv") == local_csv
                    same_shards &= manifest["shards"] == local_manifest["shards"]
                    read_s = manifest["stats"]["task_seconds"]["read"]
                    remote_rows.append(f"| s3a:// -> s3a://, +{ms:g} ms per request, `--read-threads "
                                       f"{threads}` | {remote_s:.1f} | {n_files / remote_s:,.0f} | "
                                       f"{1000 * read_s / n_files:.2f} | {remote_rss:,.0f} | {busy:.0%} |")
            storage_uri = out
            train = [*CLI, "train", "--data", storage_uri, "--cache-dir", str(tmp / "cache"),
                     "--model", "seed", "--epochs", "1", "--max-steps", "1", "--batch-size", "64"]
            cold_s, _, cold_log = run([*train, "--output", str(tmp / "run1")], env)
            warm_s, _, warm_log = run([*train, "--output", str(tmp / "run2")], env)
            shard_mb = sum(p.stat().st_size for p in (tmp / "cache").rglob("*.npy")) / 1e6
            fetch_line = next((line for line in cold_log.splitlines() if "fetched" in line), "")
            rows = [f"| local folder -> local folder | {local_s:.1f} | {n_files / local_s:,.0f} | "
                    f"{1000 * local_read_s / n_files:.2f} | {local_rss:,.0f} | - |", *remote_rows]
    finally:
        for proc in [server, *(p for p, _ in proxies.values())]:
            proc.terminate()
            proc.wait()
    kept = manifest["stats"]["kept"]
    text = f"""## Remote storage: PetImages from and to S3

Command: `flock /tmp/catsdogs-heavy.lock .venv/bin/python -m benchmarks.remote_storage`

Machine: {machine()}; CPU only. The S3 endpoint is moto's server (a separate process on 127.0.0.1,
sharing the same cores), so S3 timings include its CPU; they bound catsdogs' overhead from above and
are not a measurement of AWS.

Upload of the input ({n_files:,} files, {mb:,.0f} MB) with pyarrow `copy_files`: {upload_s:.1f} s.

`catsdogs preprocess --size 64` ({kept:,} images kept). "read ms/file" is the tasks' summed read
time per file (with threads, the wall time of each task's read phase); "S3 server CPU" is the moto
process's CPU time over the run's wall time (100% = one core, the most one Python process can use):

| input -> output | wall s | files/s | read ms/file | peak RSS MiB (whole process tree) | S3 server CPU |
|---|---|---|---|---|---|
{chr(10).join(rows)}

- "+N ms per request": a local proxy holds each request N ms before passing it on, as a network
  round trip to a remote object store would (20 ms is an assumed same-region figure, not measured here). With
  +0 ms the runs are bound by the S3 server itself, one Python process busy close to a full core
  (last column), so concurrent reads only add contention there; with a round trip per request,
  `--read-threads` hides the latency. That is why the default is 16.
- Output of every S3 run identical to the local run: files.csv {'identical' if same_csv else
  'DIFFERENT'}, every shard's sha256 {'identical' if same_shards else 'DIFFERENT'}
  ({len(manifest['shards'])} shards).
- `catsdogs train --data {storage_uri}` (1 step, so the time is the fetch plus start-up):
  cold cache {cold_s:.1f} s ({shard_mb:,.0f} MB of shards fetched and verified: `{fetch_line.strip()}`),
  warm cache {warm_s:.1f} s (files found, sha256 re-checked, nothing fetched:
  `{next((line for line in warm_log.splitlines() if "fetched" in line), "").strip()}`).
"""
    print(text)
    path = write_fragment("remote_storage", text)
    print(f"wrote {path}")
    if not (same_csv and same_shards):
        raise SystemExit("S3 output differs from the local output")


if __name__ == "__main__":
    main()
