"""A real Spark standalone cluster (one master, N workers) on this machine: to try ``--master spark://``.

It runs the master and worker daemons shipped inside the pyspark wheel (``sbin/spark-daemon.sh``),
bound to 127.0.0.1 on free ports, with their logs, pid files and work dirs in one folder, and always
stops them, also when the body of the ``with`` block raises. This exercises the same code path as
a multi-machine cluster (driver -> master -> workers -> executors over the network), minus the wire.
The tests and benchmarks use it; users run it as ``python -m catsdogs.cluster.standalone`` (which
prints the ``--master`` and ``--spark-conf`` flags to use and stops the daemons on Ctrl-C).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess  # nosec B404 # runs only pyspark's own sbin/spark-daemon.sh
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from catsdogs.errors import CatsdogsError

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
HOST = "127.0.0.1"
"""Everything binds to loopback: nothing is exposed and no DNS lookup of the host name is needed."""
QUICK_JVM_OPTS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
"""JVM flags for short-lived JVMs: C1 JIT only and the serial GC. On 2 busy cores they cut the
master+workers start-up from ~44 s to ~15 s (measured); the daemons do little work, so no loss."""


class ClusterError(CatsdogsError):
    """The standalone cluster could not be started (no Java, a daemon died, workers never registered)."""


@dataclass
class Cluster:
    """A running standalone cluster: where to submit to and what to stop."""

    master_url: str
    """``spark://127.0.0.1:<port>``, the value for ``--master``."""
    ui_url: str
    """Master web UI; ``<ui_url>/json/`` lists the registered workers."""
    work_dir: Path
    """Holds logs/, pids/, work/ (executor sandboxes) and conf/ of this cluster."""
    workers: int
    cores_per_worker: int
    memory: str
    tag: str
    """Marker passed to every daemon JVM (``-Dcatsdogs.cluster=<tag>``) to find them in ``ps``."""
    pids: dict[str, int] = field(default_factory=dict)
    """Daemon name (master, worker-1, ...) -> JVM pid."""

    def client_conf(self, quick_start: bool = False) -> dict[str, str]:
        """Spark settings a driver on this machine needs to use the cluster (loopback driver address).

        ``quick_start`` adds :data:`QUICK_JVM_OPTS` to driver and executors: for short test jobs.
        """
        conf = {
            "spark.driver.host": HOST,
            "spark.driver.bindAddress": HOST,
            "spark.executor.memory": self.memory,
            "spark.executor.cores": str(self.cores_per_worker),
        }
        if quick_start:
            conf["spark.driver.extraJavaOptions"] = QUICK_JVM_OPTS
            conf["spark.executor.extraJavaOptions"] = QUICK_JVM_OPTS
        return conf

    def status(self) -> dict:  # type: ignore[type-arg]
        """Return the master's JSON status (workers, cores, running applications)."""
        return _get_json(f"{self.ui_url}/json/")


def spark_home() -> Path:
    """Return the pyspark package folder, which holds ``bin/spark-class`` and ``sbin/spark-daemon.sh``."""
    import pyspark

    home = Path(pyspark.__file__).resolve().parent
    if not (home / "sbin" / "spark-daemon.sh").is_file():
        raise ClusterError(f"{home} has no sbin/spark-daemon.sh; reinstall pyspark (pip install pyspark)")
    return home


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now (the OS picks it, so runs don't clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _get_json(url: str, timeout: float = 2.0) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 # nosec B310 # loopback URL we built
        return json.loads(resp.read().decode())


def _daemon_env(work_dir: Path, tag: str) -> dict[str, str]:
    """Environment of spark-daemon.sh: private log/pid/work/conf dirs and loopback binding."""
    env = dict(os.environ)
    for sub in ("logs", "pids", "work", "conf"):
        (work_dir / sub).mkdir(parents=True, exist_ok=True)
    env.update({
        "SPARK_HOME": str(spark_home()),
        "SPARK_CONF_DIR": str(work_dir / "conf"),  # empty: no user spark-env.sh or defaults leak in
        "SPARK_LOG_DIR": str(work_dir / "logs"),
        "SPARK_PID_DIR": str(work_dir / "pids"),
        "SPARK_WORKER_DIR": str(work_dir / "work"),
        "SPARK_LOCAL_IP": HOST,
        "SPARK_LOCAL_HOSTNAME": HOST,
        "SPARK_IDENT_STRING": tag,
        # Executors launched by the workers must import catsdogs and torch: use this interpreter.
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_DAEMON_JAVA_OPTS": f"-Dcatsdogs.cluster={tag} {QUICK_JVM_OPTS}",
        # The REST submission server would take port 6066 on every master: two runs would clash.
        "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false",
    })
    env.pop("SPARK_NO_DAEMONIZE", None)  # spark-daemon.sh must fork the JVM into the background
    env.pop("SPARK_ENV_LOADED", None)
    return env


def _pid_file(cluster: Cluster, cls: str, instance: int) -> Path:
    return cluster.work_dir / "pids" / f"spark-{cluster.tag}-{cls}-{instance}.pid"


def _run_daemon(env: dict[str, str], action: str, cls: str, instance: int, *args: str) -> None:
    script = Path(env["SPARK_HOME"]) / "sbin" / "spark-daemon.sh"
    proc = subprocess.run(["bash", str(script), action, cls, str(instance), *args], env=env,  # nosec B603 B607
                          capture_output=True, text=True, timeout=60, check=False)
    if action == "start" and (proc.returncode != 0 or "failed to launch" in proc.stdout):
        raise ClusterError(f"spark-daemon.sh could not start {cls} #{instance}: "
                           f"{(proc.stdout + proc.stderr).strip()[-2000:]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by nohup's parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _signal_alive(pids: set[int], sig: signal.Signals) -> None:
    """Send ``sig`` to each of ``pids`` still alive (one that ends meanwhile is skipped)."""
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def tagged_pids(tag: str) -> list[int]:
    """Return pids of live JVMs started with ``-Dcatsdogs.cluster=<tag>`` (this cluster's daemons)."""
    marker = f"-Dcatsdogs.cluster={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline.split(b"\0") and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def pids_under(folder: Path) -> list[int]:
    """Return pids of live processes whose working directory is inside ``folder``.

    Executors run with their sandbox (``<work>/app-*/<id>``) as working directory; after a stop none
    may be left, even if a worker died without cleaning up.
    """
    folder = Path(folder).resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cwd.is_relative_to(folder) and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def leftover_pids(cluster: Cluster) -> list[int]:
    """Return live daemons and executors of ``cluster`` (empty once it is stopped)."""
    pids = {p for p in cluster.pids.values() if _alive(p)}
    return sorted(pids | set(tagged_pids(cluster.tag)) | set(pids_under(cluster.work_dir / "work")))


def _log_tail(cluster: Cluster, lines: int = 15) -> str:
    out = []
    for log in sorted((cluster.work_dir / "logs").glob("*.out")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(out)


def wait_for_workers(cluster: Cluster, timeout: float = 60.0) -> dict:  # type: ignore[type-arg]
    """Poll the master's ``/json/`` until all workers are ALIVE; raise :class:`ClusterError` on timeout."""
    deadline = time.monotonic() + timeout
    last: dict = {}  # type: ignore[type-arg]
    while time.monotonic() < deadline:
        dead = [name for name, pid in cluster.pids.items() if not _alive(pid)]
        if dead:
            raise ClusterError(f"Spark daemon(s) {', '.join(dead)} exited during start-up; "
                               f"logs in {cluster.work_dir / 'logs'}:\n{_log_tail(cluster)}")
        try:
            last = cluster.status()
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(0.25)  # master UI not up yet
            continue
        alive = [w for w in last.get("workers", []) if w.get("state") == "ALIVE"]
        if len(alive) >= cluster.workers:
            return last
        time.sleep(0.25)
    registered = len([w for w in last.get("workers", []) if w.get("state") == "ALIVE"])
    raise ClusterError(f"only {registered} of {cluster.workers} Spark workers registered with "
                       f"{cluster.master_url} within {timeout:.0f} s; logs in {cluster.work_dir / 'logs'}:\n"
                       f"{_log_tail(cluster)}")


def worker_cpus(workers: int, cores_per_worker: int) -> list[set[int]]:
    """The CPUs each worker is pinned to: its own ``cores_per_worker`` of this process's CPUs, in order."""
    cpus = sorted(os.sched_getaffinity(0))
    if workers * cores_per_worker > len(cpus):
        raise ClusterError(f"pinning {workers} workers x {cores_per_worker} cores needs "
                           f"{workers * cores_per_worker} CPUs, this machine offers {len(cpus)}; "
                           f"start fewer workers or do not pin")
    return [set(cpus[i * cores_per_worker:(i + 1) * cores_per_worker]) for i in range(workers)]


def start_cluster(work_dir: Path, workers: int = 2, cores_per_worker: int = 1, memory: str = "1g",
                  timeout: float = 60.0, pin: bool = False) -> Cluster:
    """Start a master and ``workers`` workers in ``work_dir``; return once all workers registered.

    With ``pin`` each worker daemon, and so every executor and Python worker it starts, runs on its own
    CPUs only (:func:`worker_cpus`): a one-core worker is then one core, as on a one-core machine. Without
    it Spark's cores are only a scheduling count, and a "one-core" executor's helper threads (shard
    reads, normalisation) use the machine's other cores, which flatters a one-worker baseline.
    On any failure the daemons already started are stopped before the error propagates.
    """
    if workers < 1 or cores_per_worker < 1:
        raise ClusterError(f"need at least 1 worker with 1 core, got workers={workers}, "
                           f"cores_per_worker={cores_per_worker}")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise ClusterError("Java is not installed (Spark needs Java 17): apt-get install openjdk-17-jre")
    work_dir = Path(work_dir).resolve()
    tag = f"{os.getpid()}-{free_port()}"  # unique per cluster on this machine
    env = _daemon_env(work_dir, tag)
    port, ui_port = free_port(), free_port()
    cluster = Cluster(master_url=f"spark://{HOST}:{port}", ui_url=f"http://{HOST}:{ui_port}",
                      work_dir=work_dir, workers=workers, cores_per_worker=cores_per_worker,
                      memory=memory, tag=tag)
    try:
        _run_daemon(env, "start", MASTER_CLASS, 1, "--host", HOST, "--port", str(port),
                    "--webui-port", str(ui_port))
        cluster.pids["master"] = int(_pid_file(cluster, MASTER_CLASS, 1).read_text())
        # Workers start in parallel: spark-daemon.sh sleeps ~2.5 s per daemon to check it lived.
        procs = []
        placement = worker_cpus(workers, cores_per_worker) if pin else [None] * workers
        for i, cpus in enumerate(placement, start=1):
            script = Path(env["SPARK_HOME"]) / "sbin" / "spark-daemon.sh"
            procs.append(subprocess.Popen(  # nosec B603 B607 # pyspark's spark-daemon.sh
                ["bash", str(script), "start", WORKER_CLASS, str(i), "--host", HOST,
                 "--webui-port", str(free_port()), "--cores", str(cores_per_worker), "--memory", memory,
                 "--work-dir", str(work_dir / "work"), cluster.master_url],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                preexec_fn=None if cpus is None else (lambda cpus=cpus: os.sched_setaffinity(0, cpus))))
        for i, proc in enumerate(procs, start=1):
            out, _ = proc.communicate(timeout=60)
            if proc.returncode != 0 or "failed to launch" in out:
                raise ClusterError(f"spark-daemon.sh could not start worker #{i}: {out.strip()[-2000:]}")
            cluster.pids[f"worker-{i}"] = int(_pid_file(cluster, WORKER_CLASS, i).read_text())
        wait_for_workers(cluster, timeout)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: Cluster, grace: float = 15.0) -> None:
    """Stop workers then the master with spark-daemon.sh; SIGKILL whatever outlives ``grace`` seconds."""
    env = _daemon_env(cluster.work_dir, cluster.tag)
    for name in sorted(cluster.pids, reverse=True):  # workers first, the master last
        cls, instance = (MASTER_CLASS, 1) if name == "master" else (WORKER_CLASS, int(name.split("-")[1]))
        try:
            _run_daemon(env, "stop", cls, instance)
        except (subprocess.SubprocessError, OSError):
            pass  # the pid sweep below still ends it
    pids = set(cluster.pids.values()) | set(leftover_pids(cluster))
    deadline = time.monotonic() + grace
    _signal_alive(pids, signal.SIGTERM)
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    _signal_alive(pids, signal.SIGKILL)


@contextmanager
def standalone_cluster(workers: int = 2, cores_per_worker: int = 1, memory: str = "1g",
                       work_dir: str | Path | None = None, timeout: float = 60.0,
                       pin: bool = False) -> Iterator[Cluster]:
    """Run a standalone master + ``workers`` workers for the ``with`` block; always stop them.

    Without ``work_dir`` a temporary folder is used and removed afterwards (logs included). ``pin``: each
    worker on its own CPUs (:func:`start_cluster`).
    """
    tmp = None
    if work_dir is None:
        tmp = tempfile.mkdtemp(prefix="catsdogs-cluster-")
        work_dir = tmp
    cluster = start_cluster(Path(work_dir), workers, cores_per_worker, memory, timeout, pin)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m catsdogs.cluster.standalone``: run a loopback cluster until Ctrl-C, then stop it."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m catsdogs.cluster.standalone",
                                     description="Start a Spark standalone master and workers on "
                                                 "127.0.0.1 (for trying catsdogs' --master spark://); "
                                                 "Ctrl-C stops them.")
    parser.add_argument("--workers", type=int, default=2, help="worker daemons (default: 2)")
    parser.add_argument("--cores", type=int, default=1, help="cores each worker offers (default: 1)")
    parser.add_argument("--memory", default="2g", help="executor memory each worker offers (default: 2g)")
    parser.add_argument("--work-dir", default=None, help="folder for logs, pids and executor sandboxes "
                                                         "(default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with standalone_cluster(args.workers, args.cores, args.memory, args.work_dir) as c:
            flags = " ".join(f"--spark-conf {k}={v}" for k, v in c.client_conf().items())
            print(f"master {c.master_url} (web UI {c.ui_url}), {args.workers} workers x {args.cores} cores\n"
                  f"use: --master {c.master_url} {flags}\nCtrl-C stops the cluster", flush=True)
            stop.wait()
    except ClusterError as exc:
        print(f"catsdogs cluster: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
