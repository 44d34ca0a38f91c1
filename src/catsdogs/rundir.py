"""The run folder: every file name in it, ``--run`` resolution, and ``metrics.csv`` read and append.

The one module that spells the run folder's layout; every stage asks it for paths::

    RUN/config.json            resolved TrainConfig          (train)
    RUN/run_config.json        resolved RunConfig            (catsdogs run)
    RUN/best.pt, RUN/last.pt   checkpoints                   (train; catsdogs.checkpoint)
    RUN/metrics.csv            one row per epoch             (train; read by evaluate)
    RUN/model.onnx, model.ts   exports                       (export)
    RUN/engine/                features.onnx (+ .sources.json), features-int8.onnx + .guard.json
                               (--backend engines); features/<split>.<engine>.npz (feature cache)
    RUN/eval/                  metrics.json, report.html ... (evaluate; shown by serve)
    RUN/mlflow.json            the MLflow run it was logged to (train with tracking; read by evaluate)

Light on purpose (csv and json only, no torch): the config takes its defaults from here.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catsdogs import schema
from catsdogs.errors import CheckpointError, ConfigError
from catsdogs.io.atomic import atomic_write_text

BEST_CKPT = "best.pt"
"""Checkpoint with the lowest validation loss: what evaluate, predict and serve load."""
LAST_CKPT = "last.pt"
"""Checkpoint of the latest position, with everything ``--resume`` needs."""
METRICS_CSV = "metrics.csv"
RUN_CONFIG_NAME = "run_config.json"
"""The resolved RunConfig of ``catsdogs run`` (config.json of the run belongs to train)."""
EVAL_DIR = "eval"
"""Default output folder of ``catsdogs evaluate`` inside the run."""
EVAL_METRICS_NAME = "metrics.json"
REPORT_NAME = "report.html"
MLFLOW_LINK_NAME = "mlflow.json"
"""Tracking server, experiment and run id of the MLflow run a training run logged to."""
ENGINE_DIR = "engine"
"""Graphs of the ONNX / OpenVINO engines (``--backend``), built once and reused while the weights match."""
FEATURES_GRAPH_NAME = "features.onnx"
"""The fp32 feature graph (``model.features``) both runtimes read."""
INT8_GRAPH_NAME = "features-int8.onnx"
"""Its int8 (QDQ) form, calibrated on training images."""
INT8_GUARD_NAME = "features-int8.guard.json"
"""The int8 accuracy check on the validation split, recorded with the int8 graph."""
FEATURE_SHARDS_DIR = "feature-shards"
"""Parquet feature shards a frozen-backbone run's Spark tasks write when the features are too big to
collect (``catsdogs.cluster.shardjob``); read back by the driver and deleted once the head is fitted."""
FEATURES_SOURCES_NAME = "features.sources.json"
"""Which checkpoints the fp32 graph was made from, so loading one of them needs no export (no tracing)."""
FEATURE_CACHE_DIR = "features"
"""Pooled features of whole shard splits, one file per split and engine, keyed by digests."""
EXPORT_NAMES: dict[str, str] = {"onnx": "model.onnx", "torchscript": "model.ts"}
"""Default file of each ``catsdogs export --format``; the keys are the format choices."""

METRICS_COLUMNS: tuple[str, ...] = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                                    "seconds")
HISTORY_COLUMNS: tuple[str, ...] = ("train_loss", "train_acc", "val_loss", "val_acc")
"""Columns of ``metrics.csv`` plotted per epoch by evaluate."""


@dataclass(frozen=True)
class RunDir:
    """A run folder and the paths of everything in it."""

    root: Path

    @classmethod
    def from_arg(cls, run: str | Path) -> RunDir:
        """Resolve ``--run``: a run folder, or a ``.pt`` file inside one (then its folder)."""
        if not str(run):
            raise ConfigError("--run is required: the run folder written by 'catsdogs train'")
        p = Path(run)
        return cls(p.parent if p.is_file() else p)

    @property
    def config(self) -> Path:
        return self.root / schema.CONFIG_NAME

    @property
    def run_config(self) -> Path:
        return self.root / RUN_CONFIG_NAME

    @property
    def best(self) -> Path:
        return self.root / BEST_CKPT

    @property
    def last(self) -> Path:
        return self.root / LAST_CKPT

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_CSV

    @property
    def eval_dir(self) -> Path:
        return self.root / EVAL_DIR

    @property
    def report(self) -> Path:
        return self.eval_dir / REPORT_NAME

    @property
    def eval_metrics(self) -> Path:
        return self.eval_dir / EVAL_METRICS_NAME

    @property
    def mlflow_link(self) -> Path:
        return self.root / MLFLOW_LINK_NAME

    @property
    def engine_dir(self) -> Path:
        return self.root / ENGINE_DIR

    @property
    def features_graph(self) -> Path:
        return self.engine_dir / FEATURES_GRAPH_NAME

    @property
    def int8_graph(self) -> Path:
        return self.engine_dir / INT8_GRAPH_NAME

    @property
    def int8_guard(self) -> Path:
        return self.engine_dir / INT8_GUARD_NAME

    @property
    def feature_shards(self) -> Path:
        return self.root / FEATURE_SHARDS_DIR

    @property
    def features_sources(self) -> Path:
        return self.engine_dir / FEATURES_SOURCES_NAME

    def feature_cache(self, split: str, engine: str) -> Path:
        """The cached features of shard split ``split`` made by engine ``engine``."""
        return self.engine_dir / FEATURE_CACHE_DIR / f"{split}.{engine}.npz"

    def export(self, fmt: str) -> Path:
        """Return the default export file of ``fmt`` (onnx or torchscript)."""
        return self.root / EXPORT_NAMES[fmt]

    def clear_training(self) -> None:
        """Delete what training and the stages after it wrote (``train --overwrite``).

        The checkpoints, metrics.csv, config.json, the MLflow link, the engine graphs, the evaluation and
        the exports go; what ``catsdogs run`` keeps beside them (its shards/ and run_config.json) stays.
        """
        for path in (self.best, self.last, self.metrics, self.config, self.mlflow_link,
                     *(self.export(fmt) for fmt in EXPORT_NAMES)):
            path.unlink(missing_ok=True)
        for folder in (self.engine_dir, self.eval_dir):
            shutil.rmtree(folder, ignore_errors=True)

    def read_config(self) -> dict[str, Any]:
        """Return the run's saved TrainConfig as a dict ({} when absent or unreadable)."""
        try:
            data = json.loads(self.config.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}


def resolve_checkpoint(run: str | Path, name: str = BEST_CKPT) -> Path:
    """Return the checkpoint file of ``--run`` (a run folder or the file itself); explain what is missing."""
    if not str(run):
        raise ConfigError("--run is required: the run folder written by 'catsdogs train'")
    p = Path(run)
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"run {str(p)!r} does not exist (fix --run)")
    for candidate in (p / name, p / LAST_CKPT):
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"run folder {str(p)!r} has no {name} or {LAST_CKPT}; train first with "
        f"'catsdogs train --output {p}' or fix --run"
    )


class MetricsLog:
    """``RUN/metrics.csv``: one row per epoch; every write replaces the file atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def start(self, keep_epochs: int | None) -> None:
        """Write the header (new run) or keep only rows of epochs <= ``keep_epochs`` (resume).

        A run killed after writing an epoch's row but before its checkpoint would otherwise repeat
        that row after resuming; rows of a partial epoch (``--max-steps``) are dropped the same way.
        """
        rows: list[list[str]] = []
        if keep_epochs is not None and self.path.is_file():
            with open(self.path, newline="") as fh:
                reader = csv.reader(fh)
                next(reader, None)
                rows = [r for r in reader if r and r[0].isdigit() and int(r[0]) <= keep_epochs]
        self._write(rows)

    def append(self, row: Mapping[str, float | int | str]) -> None:
        """Append one epoch's row (missing columns are left blank).

        The file is a few KB (one row per epoch), so it is rewritten whole through a temporary file:
        a kill mid-write leaves the previous complete file, never a torn last line.
        """
        rows: list[list[str]] = []
        if self.path.is_file():
            with open(self.path, newline="") as fh:
                reader = csv.reader(fh)
                next(reader, None)
                rows = [r for r in reader if r]
        self._write([*rows, [_fmt(row.get(c, "")) for c in METRICS_COLUMNS]])

    def _write(self, rows: list[list[str]]) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(METRICS_COLUMNS)
        w.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())


def _fmt(v: float | int | str) -> str:
    if isinstance(v, str):
        return v
    return str(v) if isinstance(v, int) else repr(float(v))


def read_metrics(path: Path) -> list[dict[str, str]]:
    """Return the rows of a ``metrics.csv`` as dicts ([] when absent); torn lines are skipped."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [rec for rec in csv.DictReader(fh) if None not in rec.values() and None not in rec]


def read_history(path: Path) -> dict[str, list[float]]:
    """Read a ``metrics.csv`` into per-epoch lists: the last logged value of each column per epoch.

    Mid-epoch rows may leave validation columns blank; a torn last line (a killed run) is skipped.
    A missing file gives ``{"epoch": []}`` (a run that has not finished an epoch has no history).
    """
    if not path.is_file():
        return {"epoch": []}
    by_epoch: dict[int, dict[str, float]] = {}
    for rec in read_metrics(path):
        try:
            epoch = int(float(rec["epoch"]))
        except (KeyError, TypeError, ValueError):
            continue
        latest = by_epoch.setdefault(epoch, {})
        for col in HISTORY_COLUMNS:
            value = _float(rec.get(col))
            if math.isfinite(value):
                latest[col] = value
    hist: dict[str, list[float]] = {"epoch": [float(e) for e in sorted(by_epoch)]}
    for col in HISTORY_COLUMNS:
        hist[col] = [by_epoch[e].get(col, float("nan")) for e in sorted(by_epoch)]
    return hist


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
