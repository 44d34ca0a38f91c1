"""Load a model from MLflow: ``--run models:/NAME/VERSION`` (or ``@ALIAS``) and ``runs:/RUN_ID/model``.

The model's artifacts (the checkpoint and config.json, see :mod:`catsdogs.track.pyfunc`) are downloaded
once into the cache folder and handed on as an ordinary run folder, so the Predictor, predict and serve
load it like any other run. A registered version never changes, so its download is reused; an alias or
``latest`` is resolved to a version number first.

Light at import: mlflow is imported only when a models:/ or runs:/ URI is actually given.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from catsdogs.errors import ConfigError
from catsdogs.shards.cache import default_cache_dir

SCHEMES: tuple[str, ...] = ("models", "runs")
"""MLflow's model URI schemes accepted by ``--run`` (predict, serve)."""
_URI = re.compile(r"^(models|runs):/")
MODEL_ARTIFACT_PATH = "model"
"""Artifact folder of a run that holds the pyfunc model (``runs:/ID/model``)."""
MODEL_FILES = "artifacts"
"""Folder inside a saved pyfunc model where MLflow puts its artifacts: here the run folder's files."""
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
"""MLflow's own variable naming the tracking server; ``--tracking-uri`` overrides it."""


HTTP_RETRIES = 2
"""Retries per MLflow request (MLflow's default 7, with backoff 2 s, 4 s, 8 s ... ~2 min per call)."""
HTTP_TIMEOUT_S = 15
"""Seconds one MLflow request may take (MLflow's default 120); a model upload of ~50 MB on a local
network takes about a second."""
CLIENT_ENV_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(HTTP_RETRIES),
    "MLFLOW_HTTP_REQUEST_TIMEOUT": str(HTTP_TIMEOUT_S),
    # Download/upload progress bars would interleave with the training bar on stderr.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def client_defaults() -> None:
    """Apply :data:`CLIENT_ENV_DEFAULTS` where the user has not set those variables (before any call)."""
    for key, value in CLIENT_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def mlflow_scheme(value: str) -> str:
    """Return ``models`` or ``runs`` for an MLflow model URI, else ''."""
    m = _URI.match(value or "")
    return m.group(1) if m else ""


def tracking_uri(given: str | None = None) -> str:
    """Return ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else '' (tracking off)."""
    return given or os.environ.get(TRACKING_URI_ENV, "")


def local_run(run: str, given_uri: str | None = None, cache_dir: str | Path | None = None) -> str:
    """Return ``run`` unchanged, or for a models:/ or runs:/ URI a local run folder holding its checkpoint.

    Raises :class:`ConfigError` (one line naming --run) when no server is set, it cannot be reached, or
    the model does not exist.
    """
    scheme = mlflow_scheme(run)
    if not scheme:
        return run
    uri = tracking_uri(given_uri)
    if not uri:
        raise ConfigError(f"--run {run!r} is an MLflow model: set MLFLOW_TRACKING_URI or --tracking-uri "
                          f"to the server that holds it")
    try:
        import mlflow  # lazy: only --run models:/ or runs:/ pays for it
        from mlflow import MlflowClient
    except ImportError:
        raise ConfigError(f"--run {run!r} needs mlflow-skinny (pip install mlflow-skinny); it is not "
                          f"installed") from None
    client_defaults()
    try:
        client = MlflowClient(uri, registry_uri=uri)
        source, key = _resolve(client, run, scheme, uri)
        folder = Path(cache_dir or default_cache_dir()).expanduser() / "mlflow" / key
        if not (folder / MODEL_FILES).is_dir():
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
            try:
                # models:/ lands in tmp itself, runs:/ID/model in tmp/model: use the path MLflow returns.
                got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp),
                                                               tracking_uri=uri))
                if not (got / MODEL_FILES).is_dir():
                    raise ConfigError(f"--run {run!r} is not a catsdogs model (no {MODEL_FILES}/ folder); "
                                      f"fix --run")
                shutil.rmtree(folder, ignore_errors=True)
                got.rename(folder)  # complete downloads only: a killed one stays a hidden temp folder
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any MLflow or network failure is one user-facing line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--run {run!r}: cannot load it from MLflow at {uri} ({first[:300]}); fix --run "
                          f"or --tracking-uri") from None
    return str(folder / MODEL_FILES)


def _resolve(client: object, run: str, scheme: str, uri: str) -> tuple[str, str]:
    """Return ``(artifact URI to download, cache key)``; aliases and ``latest`` become a version."""
    rest = run.split(":/", 1)[1].strip("/")
    if scheme == "runs":
        run_id, _, path = rest.partition("/")
        path = path or MODEL_ARTIFACT_PATH
        return f"runs:/{run_id}/{path}", _key(uri, "runs", run_id, path)
    name, sep, alias = rest.partition("@")
    if sep:
        version = client.get_model_version_by_alias(name, alias).version  # type: ignore[attr-defined]
    else:
        name, _, version = rest.rpartition("/")
        if not name:
            raise ConfigError(f"--run {run!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
        if version == "latest":
            versions = client.search_model_versions(f"name='{name}'")  # type: ignore[attr-defined]
            if not versions:
                raise ConfigError(f"--run {run!r}: model {name!r} has no versions; fix --run")
            version = str(max(int(v.version) for v in versions))
        else:
            client.get_model_version(name, version)  # type: ignore[attr-defined] - raises if absent
    # The version's own artifact location, not models:/: MLflow resolves a models:/ download through its
    # process-wide registry URI ($MLFLOW_TRACKING_URI), not this server, so --tracking-uri alone failed.
    source = client.get_model_version_download_uri(name, version)  # type: ignore[attr-defined]
    return str(source), _key(uri, "models", name, str(version))


def _key(uri: str, kind: str, *parts: str) -> str:
    """Cache folder name: readable parts plus a digest of the server and the parts.

    The same name on two servers is two models; names may hold characters that paths cannot.
    """
    digest = hashlib.sha256("\n".join((uri, kind, *parts)).encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))[:60]
    return f"{kind}-{safe}-{digest}"
