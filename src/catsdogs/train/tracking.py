"""What a training run logs to MLflow (through :mod:`catsdogs.track`), when tracking is on.

- params: the resolved TrainConfig;
- tags: the data's identity (shards path, image folder, counts, files.csv sha256, schema version),
  the git commit, the run folder;
- metrics: one point per epoch (step = epoch) from the loop's ``on_epoch`` rows, then the final ones;
- artifacts: config.json, metrics.csv and the model as a pyfunc (``model/``), optionally registered.

The run folder records the MLflow run in ``mlflow.json``: evaluate links its own run to it, and a
resumed training run (``--resume``, ``catsdogs run`` again) continues the same MLflow run.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from catsdogs.config import TrainConfig, need, to_dict
from catsdogs.rundir import METRICS_COLUMNS, RunDir
from catsdogs.shards.cache import local_shards
from catsdogs.shards.manifest import Manifest, load_manifest
from catsdogs.track.lineage import TAG_PREFIX, data_tags, git_tags
from catsdogs.track.mlflow_run import TrackedRun, open_run, read_link, write_link
from catsdogs.track.registry import tracking_uri

EPOCH_METRICS: tuple[str, ...] = tuple(c for c in METRICS_COLUMNS if c not in ("epoch", "step"))
"""Columns of a metrics.csv row logged per epoch (epoch is the MLflow step)."""


def open_training_run(cfg: TrainConfig, manifest: Manifest | None = None, data_root: str = "") -> TrackedRun:
    """Start the MLflow run of a training run (a no-op run when tracking is off)."""
    uri = tracking_uri(cfg.tracking_uri)
    if not uri:
        return TrackedRun()
    run = RunDir(Path(need(cfg, "output")))
    if manifest is None:
        data_root = local_shards(need(cfg, "data"), cfg.cache_dir, quiet=True)
        manifest = load_manifest(data_root)
    link = read_link(run.mlflow_link) if cfg.resume else {}
    resume_id = link.get("run_id", "") if link.get("tracking_uri") == uri else ""
    tags = {**data_tags(need(cfg, "data"), data_root, manifest), **git_tags(),
            f"{TAG_PREFIX}command": "train", f"{TAG_PREFIX}model": cfg.model,
            f"{TAG_PREFIX}run_folder": str(run.root.resolve())}
    tracked = open_run(cfg.tracking_uri, cfg.experiment, run.root.resolve().name, params=to_dict(cfg),
                       tags=tags, resume_run_id=resume_id)
    if tracked.active:
        run.root.mkdir(parents=True, exist_ok=True)
        write_link(run.mlflow_link, tracked)
        print(f"catsdogs train: logging to MLflow run {tracked.run_id} at {tracked.uri}", file=sys.stderr,
              flush=True)
    return tracked


def log_epoch(tracked: TrackedRun, row: Mapping[str, Any]) -> None:
    """Log one epoch's metrics row at step = its epoch number."""
    tracked.log_metrics({k: row[k] for k in EPOCH_METRICS if k in row}, step=int(row["epoch"]))


def _save_model(run: RunDir, dest: Path) -> None:
    """Write the run's model as an MLflow pyfunc folder (with its engine) at ``dest``."""
    from catsdogs.track.pyfunc import save_pyfunc  # imports mlflow.pyfunc and torch: only with tracking on

    save_pyfunc(run.root, run.best, dest)


def finish_training_run(tracked: TrackedRun, cfg: TrainConfig, final: Mapping[str, Any],
                        log_model: bool = True) -> None:
    """Log the final metrics, config.json, metrics.csv and the model (registered with ``--register``)."""
    if not tracked.active:
        return
    run = RunDir(Path(need(cfg, "output")))
    tracked.log_metrics(final)
    tracked.log_artifact(run.config)
    tracked.log_artifact(run.metrics)
    if not log_model or not run.best.is_file():
        return
    if tracked.log_model(lambda dest: _save_model(run, dest)) and cfg.register:
        version = tracked.register(cfg.register)
        if version:
            print(f"catsdogs train: registered as models:/{cfg.register}/{version}", file=sys.stderr,
                  flush=True)
