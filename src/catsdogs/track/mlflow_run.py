"""One MLflow run behind a facade that can never break the caller: the only way catsdogs logs to MLflow.

:func:`open_run` returns a :class:`TrackedRun`. With no tracking URI (``--tracking-uri`` or
``$MLFLOW_TRACKING_URI``) it is a no-op and mlflow is never imported. With one, every call is wrapped:
the first failure (a server that is down at the start, or lost mid-run) prints ONE warning and turns
tracking off for the rest of the run, which carries on; its run folder is complete either way.

MLflow's HTTP client retries a failed request 7 times with exponential backoff and waits up to 120 s
per request by default, which would stall training for minutes per epoch against a dead server; the
defaults are lowered (:func:`catsdogs.track.registry.client_defaults`) unless the user set them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from catsdogs.io.atomic import atomic_write_text
from catsdogs.track.registry import MODEL_ARTIFACT_PATH, client_defaults, tracking_uri

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "catsdogs"
"""Experiment used when neither ``--experiment`` nor ``$MLFLOW_EXPERIMENT_NAME`` names one."""
PARENT_TAG = "mlflow.parentRunId"
"""MLflow's tag that nests a run under another (the UI folds tune's trials under the study)."""
RUN_NAME_TAG = "mlflow.runName"
BATCH_PARAMS = 100
"""Most params per ``log_batch`` request (an MLflow server limit)."""
PARAM_MAX_CHARS = 6000
"""Longest param value an MLflow server stores."""


def experiment_name(given: str | None = None) -> str:
    """Return ``--experiment``, else ``$MLFLOW_EXPERIMENT_NAME``, else :data:`DEFAULT_EXPERIMENT`."""
    return given or os.environ.get(EXPERIMENT_ENV, "") or DEFAULT_EXPERIMENT


def experiment_name_given(given: str | None = None) -> bool:
    """True when ``--experiment`` or ``$MLFLOW_EXPERIMENT_NAME`` names an experiment."""
    return bool(given or os.environ.get(EXPERIMENT_ENV, ""))


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Return a config dict as MLflow params: nested dicts as ``a.b`` keys, values as strings."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = str(value)[:PARAM_MAX_CHARS]
    return out


class _Connection:
    """A client shared by a run and the runs it nests or links: once one fails, all stop."""

    def __init__(self, client: Any, uri: str, experiment_id: str) -> None:
        self.client = client
        self.uri = uri
        self.experiment_id = experiment_id
        self.seconds = 0.0
        """Wall time spent in MLflow calls (the tracking overhead, reported when a run ends)."""


class TrackedRun:
    """One MLflow run, or nothing (tracking off, or lost): every method is safe to call in any state."""

    def __init__(self, conn: _Connection | None = None, run_id: str = "") -> None:
        self._conn = conn
        self.run_id = run_id
        """The MLflow run id ('' when tracking is off or never started)."""

    @property
    def active(self) -> bool:
        """True while the run is being tracked (False when off, or after a failure)."""
        return self._conn is not None and self._conn.client is not None and bool(self.run_id)

    @property
    def uri(self) -> str:
        return self._conn.uri if self._conn is not None else ""

    @property
    def _client(self) -> Any:
        return self._conn.client if self._conn is not None else None

    # ------------------------------------------------------------------ safety
    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` against MLflow; on any failure warn once, stop tracking and return None."""
        if not self.active:
            return None
        assert self._conn is not None  # nosec B101 # type narrowing of an invariant, not input checking
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - no tracking problem may reach training
            warn(_lost(self.uri, what, exc, self.run_id))
            self._conn.client = None
            return None
        finally:
            self._conn.seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; on a resumed run only the new keys (MLflow params cannot change)."""
        def send() -> None:
            from mlflow.entities import Param

            flat = flatten_params(params)
            have = self._client.get_run(self.run_id).data.params
            items = [Param(k, v) for k, v in flat.items() if k not in have]
            for i in range(0, len(items), BATCH_PARAMS):
                self._client.log_batch(self.run_id, params=items[i:i + BATCH_PARAMS])
        self._call("logging params", send)

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Log the finite numbers of ``metrics`` at ``step`` (one point per key)."""
        def send() -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                     if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))]
            if items:
                self._client.log_batch(self.run_id, metrics=items)
        self._call(f"logging metrics of step {step}", send)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set string tags on the run."""
        def send() -> None:
            from mlflow.entities import RunTag

            items = [RunTag(k, str(v)[:PARAM_MAX_CHARS]) for k, v in tags.items()]
            if items:
                self._client.log_batch(self.run_id, tags=items)
        self._call("setting tags", send)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file (skipped when it does not exist)."""
        if Path(path).is_file():
            self._call(f"uploading {Path(path).name}", lambda: self._client.log_artifact(
                self.run_id, str(path), artifact_path))

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        """Upload every file of a folder (skipped when it does not exist)."""
        if Path(folder).is_dir():
            self._call(f"uploading {Path(folder).name}/", lambda: self._client.log_artifacts(
                self.run_id, str(folder), artifact_path))

    def log_model(self, save: Callable[[Path], object]) -> bool:
        """Upload a model folder under ``model/``; return True when it was logged.

        ``save(dest)`` writes the folder (:func:`catsdogs.track.pyfunc.save_pyfunc`, which the caller binds:
        the model knows the stages, this facade must not).
        """
        def send() -> bool:
            with tempfile.TemporaryDirectory(prefix="catsdogs-pyfunc-") as tmp:
                dest = Path(tmp) / MODEL_ARTIFACT_PATH
                save(dest)
                self._client.log_artifacts(self.run_id, str(dest), MODEL_ARTIFACT_PATH)
            return True
        return bool(self._call("uploading the model", send))

    def register(self, name: str) -> str:
        """Register this run's ``model/`` under ``name``; return the new version ('' when it failed)."""
        def send() -> str:
            from mlflow.exceptions import MlflowException

            try:
                self._client.create_registered_model(name)
            except MlflowException as exc:
                if "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")) + str(exc):
                    raise
            mv = self._client.create_model_version(name, source=f"runs:/{self.run_id}/{MODEL_ARTIFACT_PATH}",
                                                   run_id=self.run_id)
            return str(mv.version)
        return str(self._call(f"registering model {name!r}", send) or "")

    def other(self, run_id: str) -> TrackedRun:
        """Return another run of the same server (e.g. the training run an evaluation links to)."""
        return TrackedRun(self._conn, run_id)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED)."""
        if self._call("ending the run", lambda: self._client.set_terminated(self.run_id, status) or True):
            assert self._conn is not None  # nosec B101 # type narrowing of an invariant, not input checking
            print(f"catsdogs: MLflow run {self.run_id} {status.lower()} at {self.uri} (tracking took "
                  f"{self._conn.seconds:.1f} s so far)", file=sys.stderr, flush=True)
        self.run_id = ""


def warn(message: str) -> None:
    """Print one tracking warning on stderr (never raises)."""
    print(f"catsdogs: warning: {message}", file=sys.stderr, flush=True)


def _lost(uri: str, what: str, exc: BaseException, run_id: str) -> str:
    """The one warning printed when tracking fails."""
    unfinished = f" (MLflow run {run_id} stays unfinished)" if run_id else ""
    return (f"MLflow tracking at {uri} failed while {what} ({_short(exc)}); tracking is off for the rest "
            f"of this run{unfinished}, which carries on and keeps everything in its folder")


def _short(exc: BaseException) -> str:
    """First line of an exception, bounded: MLflow errors can carry whole HTML pages."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def open_run(given_uri: str | None, experiment: str | None, run_name: str, *,
             params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
             parent: TrackedRun | None = None, resume_run_id: str = "", experiment_id: str = ""
             ) -> TrackedRun:
    """Start (or with ``resume_run_id`` reopen) an MLflow run; a no-op run when tracking is off or fails.

    A ``parent`` nests the run under it (tune's trials under the study); it shares the parent's client.
    ``experiment_id`` (an existing experiment) takes the place of ``experiment``'s name.
    """
    if parent is not None and not parent.active:
        return TrackedRun()
    uri = parent.uri if parent is not None else tracking_uri(given_uri)
    if not uri:
        return TrackedRun()
    client_defaults()
    try:
        t0 = time.perf_counter()
        started = _start(uri, experiment, run_name, tags or {}, parent, resume_run_id, experiment_id)
        assert started._conn is not None  # nosec B101 # type narrowing of an invariant, not input checking
        started._conn.seconds += time.perf_counter() - t0  # includes importing mlflow
    except Exception as exc:  # noqa: BLE001 - a server that is down must not stop the command
        warn(_lost(uri, "starting a run", exc, ""))
        if parent is not None and parent._conn is not None:
            parent._conn.client = None  # one warning per command, not one per trial
        return TrackedRun()
    if resume_run_id and tags:
        started.set_tags(tags)
    if params:
        started.log_params(params)
    return started


def _start(uri: str, experiment: str | None, run_name: str, tags: Mapping[str, Any],
           parent: TrackedRun | None, resume_run_id: str, experiment_id: str) -> TrackedRun:
    """Create (or reopen) the run on the server; raises on any MLflow failure."""
    if parent is not None and parent._conn is not None:
        conn = parent._conn
    else:
        try:
            from mlflow import MlflowClient  # lazy: tracking off costs no import
        except ImportError:
            raise RuntimeError("mlflow-skinny is not installed (pip install mlflow-skinny)") from None
        client = MlflowClient(uri, registry_uri=uri)
        conn = _Connection(client, uri, experiment_id or _experiment_id(client, experiment_name(experiment)))
    client = conn.client
    if resume_run_id:
        run_id = client.get_run(resume_run_id).info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        all_tags = {RUN_NAME_TAG: run_name, **tags}
        if parent is not None:
            all_tags[PARENT_TAG] = parent.run_id
        run_id = client.create_run(conn.experiment_id, run_name=run_name,
                                   tags={k: str(v) for k, v in all_tags.items()}).info.run_id
    return TrackedRun(conn, run_id)


def _experiment_id(client: Any, name: str) -> str:
    """Return the id of experiment ``name``, creating it (another process may create it meanwhile)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except Exception:  # noqa: BLE001 - lost a creation race: it exists now
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def write_link(path: str | Path, run: TrackedRun) -> None:
    """Record where ``run`` lives (server, experiment, run id) in a small JSON file, when tracked."""
    if run.active and run._conn is not None:
        atomic_write_text(path, json.dumps({"tracking_uri": run.uri, "experiment_id": run._conn.experiment_id,
                                            "run_id": run.run_id}, indent=2) + "\n")


def read_link(path: str | Path) -> dict[str, str]:
    """Return the record written by :func:`write_link` ({} when absent or unreadable)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return {k: str(v) for k, v in data.items()} if isinstance(data, dict) else {}


@contextmanager
def ending(run: TrackedRun) -> Iterator[TrackedRun]:
    """End ``run`` FINISHED, FAILED on an exception or KILLED on Ctrl-C, then re-raise."""
    try:
        yield run
    except KeyboardInterrupt:
        run.finish("KILLED")
        raise
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish("FINISHED")
