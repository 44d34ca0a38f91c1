"""A SparkSession for catsdogs' forward passes, checked before any work.

The master must answer, the executors must import what the work needs, and a failed job becomes one
line naming the fix.

Why check first: a standalone master that is not there makes Spark retry for a minute and then hang
the job, and an executor without torch or openvino fails each task four times with a Python
traceback buried in a Java one. Both are user mistakes with a known fix, so the driver finds them in
a second (a TCP connect, then one tiny probe job) and says which flag or node to fix.
"""

from __future__ import annotations

import re
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from catsdogs.errors import CatsdogsError, ConfigError
from catsdogs.spark import TaskProgress, get_spark, is_local

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

T = TypeVar("T")

CONNECT_TIMEOUT_S = 5.0
"""Seconds to wait for the master's TCP port: a live master accepts at once, even across a data centre."""
PROBE_TIMEOUT_S = 180.0
"""Seconds the dependency probe may wait for an executor. Executors of a 2-core test cluster start in
10-20 s; a job that no executor takes in 3 minutes waits for resources the cluster does not have."""
NEEDED: tuple[str, ...] = ("numpy", "pyarrow", "PIL", "torch", "catsdogs")
"""Modules every catsdogs task imports on an executor; an engine adds its runtime (``runtime_modules``)."""


class ExecutorError(CatsdogsError):
    """The executors cannot run catsdogs' tasks (a missing package, another Python, no free executor)."""


def runtime_modules(engine: str) -> tuple[str, ...]:
    """The Python modules an engine needs on the executors besides :data:`NEEDED`."""
    if engine.startswith("openvino"):
        return ("openvino",)
    if engine.startswith("onnx"):
        return ("onnxruntime",)
    return ()


def _endpoints(master: str) -> list[tuple[str, int]]:
    """``(host, port)`` pairs a master URL names: ``spark://h:7077[,h2:7077]``, ``k8s://https://h:443``."""
    if master.startswith("spark://"):
        out = []
        for part in master.removeprefix("spark://").split(","):
            host, _, port = part.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"--master {master!r}: expected spark://HOST:PORT (e.g. spark://10.0.0.5:7077)")
            out.append((host.strip("[]"), int(port)))
        return out
    if master.startswith("k8s://"):
        rest = master.removeprefix("k8s://")
        scheme, _, hostport = rest.rpartition("://")
        hostport = hostport.split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        if not host:
            host, port = hostport, "443" if scheme in ("https", "") else "80"
        return [(host.strip("[]"), int(port))] if port.isdigit() else []
    return []


def check_master(master: str, flag: str = "--master") -> None:
    """Fail with one line when a ``spark://`` or ``k8s://`` master does not answer on its port.

    Local masters need nothing; ``yarn`` is found through ``HADOOP_CONF_DIR``/``YARN_CONF_DIR`` (Spark
    says so itself when they are missing).
    """
    if is_local(master):
        return
    endpoints = _endpoints(master)
    errors = []
    for host, port in endpoints:
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
                return
        except OSError as exc:
            errors.append(f"{host}:{port} ({exc.strerror or type(exc).__name__})")
    if errors:
        raise ConfigError(f"{flag} {master}: nothing answers at {', '.join(errors)}; start the Spark master "
                          f"there (python -m catsdogs.cluster.standalone starts one on this machine) or fix "
                          f"{flag}")


_MISSING = re.compile(r"(?:ModuleNotFoundError|ImportError): No module named '([^']+)'")
_VERSION = re.compile(r"Python in worker has different version:? \(?([0-9.]+)\)? "
                      r"than that in driver:? \(?([0-9.]+)")
USER_ERROR = "catsdogs-user-error: "
"""A task's exception message starting with this is a user-fixable line (the rest of that line), shown
as it is instead of Spark's trace."""
_USER_LINE = re.compile(re.escape(USER_ERROR) + r"([^\n]+)")
_NO_PYTHON = re.compile(r"Cannot run program \"([^\"]+)\"")


def explain(exc: BaseException, master: str) -> str | None:
    """One line for a Spark job failure a user can fix on the executors, or None (a bug: keep the trace)."""
    text = str(exc)
    where = "this machine's Spark workers" if is_local(master) else f"the executors of {master}"
    fix = ("install catsdogs and its dependencies on every node (the same venv: make install), or point "
           "--spark-conf spark.pyspark.python=PATH at a Python that has them")
    found = _USER_LINE.search(text)
    if found:
        return found.group(1).strip()
    found = _MISSING.search(text)
    if found:
        return f"{where} cannot import {found.group(1).split('.')[0]!r}: {fix}"
    found = _VERSION.search(text)
    if found:
        return (f"{where} run Python {found.group(1)}, the driver {found.group(2)}: use the same Python "
                f"everywhere ({fix})")
    found = _NO_PYTHON.search(text)
    if found:
        return f"{where} have no Python at {found.group(1)!r}: {fix}"
    return None


def _probe(modules: tuple[str, ...]) -> Callable[[Any], list[tuple[str, str]]]:
    """The probe task: import each module on the executor; return ``(module, error)`` for failures.

    A closure, so cloudpickle ships it by value: it runs even where catsdogs itself is missing.
    """

    def run(_: Any) -> list[tuple[str, str]]:
        import importlib

        failed = []
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - any failure to import is the finding
                failed.append((name, f"{type(exc).__name__}: {exc}"))
        return failed

    return run


def run_job(spark: SparkSession, master: str, body: Callable[[], T], what: str,
            timeout: float | None = None, progress: tuple[int, int, str] | None = None) -> T:
    """Run ``body`` (which runs Spark jobs) under a job group; a user-fixable failure becomes one line.

    With ``timeout`` the jobs are cancelled and :class:`ExecutorError` raised when they do not finish
    in time (no executor took them). Ctrl-C cancels them. ``progress`` = ``(images, tasks, label)``
    shows a bar fed by the finished tasks.
    """
    import secrets

    sc = spark.sparkContext
    group = f"catsdogs-{secrets.token_hex(4)}"
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        sc.setJobGroup(group, what, interruptOnCancel=True)
        try:
            result.append(body())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name="catsdogs-spark-job", daemon=True)
    try:
        with TaskProgress(sc, group, *progress) if progress else nullcontext():
            thread.start()
            thread.join(timeout)
            if thread.is_alive():
                sc.cancelJobGroup(group)
                thread.join(30)
                raise ExecutorError(f"no executor of {master} ran {what} within {timeout:.0f} s: the cluster "
                                    f"has no free cores or too little memory for the executors asked for "
                                    f"(check its web UI; lower --spark-conf spark.executor.memory / "
                                    f"spark.executor.cores)")
            if error:
                line = explain(error[0], master)
                if line:
                    raise ExecutorError(line) from None
                raise error[0]
    except KeyboardInterrupt:
        sc.cancelJobGroup(group)
        raise
    return result[0]


def check_executors(spark: SparkSession, master: str, modules: tuple[str, ...]) -> None:
    """Import ``modules`` in one task per executor slot; fail with one line naming what is missing."""
    sc = spark.sparkContext
    slots = max(1, sc.defaultParallelism)

    def body() -> list[tuple[str, str]]:
        return sc.parallelize(range(slots), slots).flatMap(_probe(modules)).collect()

    failed = run_job(spark, master, body, "the executor check", PROBE_TIMEOUT_S)
    if failed:
        name, detail = failed[0]
        where = "this machine's Spark workers" if is_local(master) else f"the executors of {master}"
        raise ExecutorError(f"{where} cannot import {name!r} ({detail.splitlines()[0][:200]}): install "
                            f"catsdogs and its dependencies on every node (the same venv: make install), or "
                            f"point --spark-conf spark.pyspark.python=PATH at a Python that has them")


_STAGES: dict[str, Path] = {}
"""Per Spark application: the folder its shipped files are staged in (``SparkContext.addFile`` serves a
file from its path for the application's lifetime, and a name can be registered only once)."""


def staging_dir(spark_context: Any) -> Path:
    """The folder this application's shipped files are staged in (made on first use)."""
    app = str(spark_context.applicationId)
    if app not in _STAGES:
        _STAGES[app] = Path(tempfile.mkdtemp(prefix="catsdogs-ship-"))
    return _STAGES[app]


EXECUTOR_ENV: dict[str, str] = {"spark.executorEnv.OMP_WAIT_POLICY": "PASSIVE"}
"""Executors do not inherit the driver's shell: idle OpenMP threads must sleep there too, as
``catsdogs.cli`` makes them on the driver (spinning threads starved a shared 2-core box)."""


@contextmanager
def spark_session(master: str, app_name: str, conf: Mapping[str, str] | None = None,
                  modules: tuple[str, ...] | Callable[[], tuple[str, ...]] = NEEDED
                  ) -> Iterator[SparkSession]:
    """Yield a checked SparkSession on ``master``; stop it afterwards if this call started it.

    ``modules`` (what the executors must import) may be a callable, asked once the JVM is up: a caller
    that learns them from work it started beside the session (predict's model load) overlaps the two.
    """
    from pyspark.sql import SparkSession  # lazy: pyspark costs ~1 s at import

    check_master(master)
    owned = SparkSession.getActiveSession() is None
    try:
        spark = get_spark(master, app_name, {**EXECUTOR_ENV, **(conf or {})})
    except Exception as exc:
        line = explain(exc, master)
        if line is None:
            raise
        raise ExecutorError(line) from None
    app = str(spark.sparkContext.applicationId)
    try:
        check_executors(spark, master, modules() if callable(modules) else modules)
        yield spark
    finally:
        if owned:
            spark.stop()
            sys.stderr.flush()
            stage = _STAGES.pop(app, None)
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
