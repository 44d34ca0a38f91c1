"""SparkSession construction shared by preprocessing, distributed training and the forward passes on Spark.

One place decides how catsdogs talks to Spark: which Python the workers run, quiet logging (no
log4j banner or stage progress bars on the console), loopback binding in local mode, and user
overrides from ``--spark-conf``. Works unchanged for ``local[*]``, ``spark://``, ``yarn``, ``k8s://``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess  # nosec B404 # only for subprocess.PIPE, no command is run
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING

from catsdogs.io.storage import ENDPOINT_ENV, REGION_ENV
from catsdogs.progress import progress_bar

if TYPE_CHECKING:
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

# Root logger at WARN, and loggers known to warn about harmless facts at ERROR. Used for the
# driver JVM only; executors on a cluster keep the cluster's own logging.
_LOG4J2 = """\
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n%ex
logger.hadoop.name = org.apache.hadoop.util.NativeCodeLoader
logger.hadoop.level = error
logger.utils.name = org.apache.spark.util.Utils
logger.utils.level = error
logger.sparkenv.name = org.apache.spark.SparkEnv
logger.sparkenv.level = error
logger.parquet.name = org.apache.parquet
logger.parquet.level = error
"""

# JIT and GC settings of the driver JVM (which is also the executor in local mode). catsdogs' JVM only
# schedules tasks; the work runs in Python workers. On 2 cores the default C2 compiler and parallel G1
# threads burned ~10 CPU-s per preprocess run, competing with the workers; C1 only + serial GC
# measured ~5 CPU-s, SparkSession start 8 -> 4 s and the 18,000-image job ~30% faster.
# A user-given spark.driver.extraJavaOptions replaces these (two GC choices would abort the JVM).
_JVM_TUNING = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"

# JVM stderr lines that carry no information for a user (printed before log4j is configured).
_NOISE = ("WARNING: Using incubator modules",)


def is_local(master: str) -> bool:
    """Return True for a local master (``local``, ``local[4]``, ``local[*]``, ``local[2,3]``)."""
    return master == "local" or master.startswith("local[")


def _log4j_file() -> Path:
    """Write the log4j2 config once (content-addressed in the temp folder) and return its path."""
    digest = hashlib.sha256(_LOG4J2.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"catsdogs-log4j2-{digest}.properties"
    if not path.is_file():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(_LOG4J2)
        os.replace(tmp, path)
    return path


def _forward_stderr(stream: IO[bytes]) -> None:
    """Copy the JVM's stderr to file descriptor 2 line by line, dropping known noise lines.

    Writes to the descriptor (not ``sys.stderr``, which test capture swaps) and never stops
    draining: a full pipe would block the JVM.
    """
    for raw in iter(stream.readline, b""):
        if raw.decode(errors="replace").startswith(_NOISE):
            continue
        try:
            os.write(2, raw)
        except OSError:
            pass


def build_conf(master: str, app_name: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the Spark settings catsdogs uses; entries of ``extra`` (``--spark-conf``) win."""
    conf: dict[str, str] = {
        "spark.master": master,
        "spark.app.name": app_name,
        # Job progress is shown by catsdogs' own tqdm bar; Spark's bar would interleave with it.
        "spark.ui.showConsoleProgress": "false",
        "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{_log4j_file()} {_JVM_TUNING}",
        # Python workers stay alive between tasks, so numpy/Pillow are imported once per worker.
        "spark.python.worker.reuse": "true",
    }
    if is_local(master):
        conf.update({
            "spark.ui.enabled": "false",
            "spark.driver.host": "127.0.0.1",
            "spark.driver.bindAddress": "127.0.0.1",
        })
    # Executors on a cluster do not inherit the driver's shell: pass on where S3 is (not secrets,
    # which executors take from their own AWS chain, or from --spark-conf spark.executorEnv.*).
    for name in ENDPOINT_ENV + REGION_ENV:
        if os.environ.get(name):
            conf[f"spark.executorEnv.{name}"] = os.environ[name]
    for key, value in (extra or {}).items():
        if key == "spark.driver.extraJavaOptions":
            value = f"-Dlog4j2.configurationFile=file:{_log4j_file()} {value}"  # keep our log config
        conf[key] = str(value)
    return conf


def get_spark(master: str = "local[*]", app_name: str = "catsdogs",
              extra: Mapping[str, str] | None = None) -> SparkSession:
    """Return the active SparkSession, or start one configured by :func:`build_conf`.

    Sets ``PYSPARK_PYTHON``/``PYSPARK_DRIVER_PYTHON`` to this interpreter unless the user set them,
    so workers import the same catsdogs and libraries (on a cluster the same path must exist on
    every node, e.g. a shared venv).
    """
    # Lazy: pyspark costs ~1 s at import; catsdogs.spark is imported by commands that may not start Spark.
    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # pyspark reads the workers' Python from the environment only; spark-submit turns the
    # spark.pyspark.python setting into it, so a driver started here must do the same.
    if (extra or {}).get("spark.pyspark.python"):
        os.environ["PYSPARK_PYTHON"] = str((extra or {})["spark.pyspark.python"])
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if is_local(master):
        # Without it Spark warns that the host name resolves to a loopback address.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # Under spark-submit the JVM already runs and holds its --master/--conf/--py-files: keep those
    # (our defaults only fill gaps; --spark-conf still wins).
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ
    if submitted:
        SparkContext._ensure_initialized()  # noqa: SLF001 - connect to that JVM to read its settings
    conf = SparkConf(loadDefaults=submitted)
    if submitted and conf.contains("spark.master"):
        master = str(conf.get("spark.master"))  # e.g. no loopback driver address for a real cluster
    for key, value in build_conf(master, app_name, extra).items():
        if submitted and conf.contains(key) and key not in (extra or {}):
            continue
        conf.set(key, value)
    if SparkContext._gateway is None and not submitted:  # noqa: SLF001 - the hook to filter JVM stderr
        gateway = launch_gateway(conf, popen_kwargs={"stderr": subprocess.PIPE})
        threading.Thread(target=_forward_stderr, args=(gateway.proc.stderr,),
                         name="spark-jvm-stderr", daemon=True).start()
        sc = SparkContext(conf=conf, gateway=gateway)
    else:
        sc = SparkContext.getOrCreate(conf)
    sc.setLogLevel("ERROR")
    return SparkSession(sc)


class TaskProgress:
    """A tqdm bar on stderr fed by polling Spark's status tracker from a thread.

    Spark reports finished tasks, so units done = completed tasks x mean units per task (exact at the
    end): preprocess counts images of one shard per task, the forward passes images per task.
    """

    def __init__(self, sc: SparkContext, group: str, total: int, tasks: int, desc: str) -> None:
        self._sc = sc
        self._group = group
        self._per_task = total / max(tasks, 1)
        self._tasks = tasks
        self._stop = threading.Event()
        self.bar = progress_bar(total=total, unit="img", desc=desc, file=sys.stderr, mininterval=0.5,
                                dynamic_ncols=True, smoothing=0.1)
        self._thread = threading.Thread(target=self._poll, name=f"{desc}-progress", daemon=True)

    def _completed_tasks(self) -> int:
        tracker = self._sc.statusTracker()
        done = 0
        for job_id in tracker.getJobIdsForGroup(self._group):
            job = tracker.getJobInfo(job_id)
            for stage_id in job.stageIds if job else []:
                stage = tracker.getStageInfo(stage_id)
                done += stage.numCompletedTasks if stage else 0
        return min(done, self._tasks)

    def _poll(self) -> None:
        while not self._stop.wait(0.25):
            try:
                n = round(self._completed_tasks() * self._per_task)
            except Exception:  # noqa: BLE001 # nosec B112 # progress polling only; the tracker may vanish while Spark stops
                continue
            if n > self.bar.n:
                self.bar.update(min(n, self.bar.total) - self.bar.n)

    def __enter__(self) -> TaskProgress:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._stop.set()
        self._thread.join()
        if exc_type is None:
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()
