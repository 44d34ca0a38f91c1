"""``catsdogs evaluate``: metrics, plots and a self-contained HTML report for a trained run.

Shards (npy or Parquet, :func:`catsdogs.shards.open_shard`) are streamed one batch at a time, so
memory stays bounded by ``--batch-size`` whatever the split size; only the ``(n, C)`` probabilities
are kept.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs import plots, schema, storage
from catsdogs.config import EvaluateConfig, save_config, to_dict
from catsdogs.errors import ConfigError, InputError
from catsdogs.fsutil import atomic_write_text
from catsdogs.manifest import Manifest, load_manifest
from catsdogs.shardcache import local_shards
from catsdogs.shards import open_shard

OUTPUT_FILES: tuple[str, ...] = (
    "metrics.json", "classification_report.txt", "predictions.csv", "confusion_matrix.png",
    "roc_curve.png", "loss_curve.png", "accuracy_curve.png", "misclassified.png", "report.html",
    schema.CONFIG_NAME,
)
"""Everything evaluate writes into its output folder."""

MISTAKES_CAPTION = "Most confidently wrong images"


@dataclass
class Predictions:
    """Model outputs for one split, with where each row came from (to show images later)."""

    probs: np.ndarray
    """``(n, C)`` float32 class probabilities."""
    labels: np.ndarray
    """``(n,)`` int64 true labels."""
    shard: np.ndarray
    """``(n,)`` position of the row's shard in the split's shard list."""
    row: np.ndarray
    """``(n,)`` row index inside that shard."""


# ----------------------------------------------------------------------------------------------
# Reading shards


def iter_batches(root: Path, manifest: Manifest, split: str, batch_size: int
                 ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Yield ``(shard_pos, start_row, X uint8 NHWC, y)`` batches of at most ``batch_size`` rows."""
    for pos, info in enumerate(manifest.split_shards(split)):
        x, y = open_shard(root, info, manifest.size)
        for start in range(0, len(y), batch_size):
            # Copy just this batch out of the read-only shard view (torch wants writable memory).
            yield (pos, start, np.array(x[start:start + batch_size], copy=True),
                   np.asarray(y[start:start + batch_size], dtype=np.int64))


def predict_split(predictor: Any, root: Path, manifest: Manifest, split: str, batch_size: int,
                  tta: bool = False, progress: bool = True) -> Predictions:
    """Run ``predictor`` over every row of ``split``; return probabilities, labels and locations."""
    from tqdm import tqdm

    n_batches = sum(math.ceil(s.rows / batch_size) for s in manifest.split_shards(split))
    probs, labels, shard, row = [], [], [], []
    with tqdm(total=n_batches, desc=f"evaluate {split}", unit="batch", disable=not progress) as bar:
        for pos, start, x, y in iter_batches(root, manifest, split, batch_size):
            probs.append(predictor.predict_arrays(x, tta=tta))
            labels.append(y)
            shard.append(np.full(len(y), pos, dtype=np.int32))
            row.append(np.arange(start, start + len(y), dtype=np.int64))
            bar.update(1)
    c = len(manifest.classes)
    return Predictions(
        probs=np.concatenate(probs) if probs else np.zeros((0, c), dtype=np.float32),
        labels=np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64),
        shard=np.concatenate(shard) if shard else np.zeros(0, dtype=np.int32),
        row=np.concatenate(row) if row else np.zeros(0, dtype=np.int64),
    )


def load_rows(root: Path, manifest: Manifest, split: str, shard: np.ndarray, row: np.ndarray
              ) -> np.ndarray:
    """Return the images at ``(shard position, row)`` pairs of ``split`` as uint8 NHWC."""
    infos = manifest.split_shards(split)
    size = manifest.size
    out = np.zeros((len(row), size, size, 3), dtype=np.uint8)
    for i, (pos, r) in enumerate(zip(shard.tolist(), row.tolist(), strict=True)):
        x, _ = open_shard(root, infos[pos], size)
        out[i] = x[r]
    return out


# ----------------------------------------------------------------------------------------------
# Metrics


def roc_curves(labels: np.ndarray, probs: np.ndarray, classes: list[str]
               ) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Return ``label -> (fpr, tpr, auc)``: the positive class for binary, one-vs-rest per class else.

    Classes absent from ``labels`` (or present alone) have no defined ROC and are left out.
    """
    from sklearn.metrics import auc, roc_curve

    ks = [1] if len(classes) == 2 else list(range(len(classes)))
    curves = {}
    for k in ks:
        positive = labels == k
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, k])
        name = f"{classes[k]} (positive)" if len(classes) == 2 else f"{classes[k]} vs rest"
        curves[name] = (fpr, tpr, float(auc(fpr, tpr)))
    return curves


def roc_auc(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> float | None:
    """Binary: AUC of the positive class (index 1); N > 2: macro one-vs-rest AUC; None if undefined."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        return None
    try:
        if num_classes == 2:
            return float(roc_auc_score(labels == 1, probs[:, 1]))
        return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro",
                                   labels=list(range(num_classes))))
    except ValueError:  # e.g. a class missing from labels for one-vs-rest
        return None


def compute_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> tuple[dict[str, Any], str]:
    """Return ``(metrics dict, classification report text)`` for true labels and probabilities."""
    from sklearn.metrics import classification_report, confusion_matrix, log_loss

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    idx = list(range(len(classes)))
    pred = probs.argmax(axis=1)
    kw: dict[str, Any] = {"labels": idx, "target_names": list(classes), "zero_division": 0}
    per_class = classification_report(labels, pred, output_dict=True, **kw)
    per_class.pop("accuracy", None)
    text = classification_report(labels, pred, digits=4, **kw)
    cm = confusion_matrix(labels, pred, labels=idx)
    # Renormalise: float32 probabilities may sum to 1 +- 1e-7, which log_loss warns about.
    p = np.clip(probs, 1e-15, 1.0)
    metrics = {
        "n": int(len(labels)),
        "classes": list(classes),
        "accuracy": float((pred == labels).mean()) if len(labels) else float("nan"),
        "errors": int((pred != labels).sum()),
        "roc_auc": roc_auc(labels, probs, len(classes)),
        "roc_auc_kind": "positive class" if len(classes) == 2 else "macro one-vs-rest",
        "log_loss": float(log_loss(labels, p / p.sum(axis=1, keepdims=True), labels=idx)),
        "per_class": _jsonable(per_class),
        "confusion_matrix": cm.astype(int).tolist(),
        "confusion_matrix_axes": "rows = true class, columns = predicted class (order of classes)",
    }
    return metrics, text


def most_confident_mistakes(labels: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    """Return indices of up to ``k`` wrong predictions, highest predicted-class probability first."""
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != labels)
    conf = probs[wrong, pred[wrong]]
    return wrong[np.argsort(-conf, kind="stable")[:k]]


def read_history(path: Path) -> dict[str, list[float]]:
    """Read RUN/metrics.csv into per-epoch lists: the last logged value of each column per epoch.

    Mid-epoch rows may leave validation columns blank; a torn last line (a killed run) is skipped.
    """
    cols = ("train_loss", "train_acc", "val_loss", "val_acc")
    if not path.is_file():
        return {"epoch": []}
    by_epoch: dict[int, dict[str, float]] = {}
    with open(path, newline="") as fh:
        for rec in csv.DictReader(fh):
            if None in rec.values() or None in rec:  # too few or too many fields
                continue
            try:
                epoch = int(float(rec["epoch"]))
            except (KeyError, TypeError, ValueError):
                continue
            latest = by_epoch.setdefault(epoch, {})
            for col in cols:
                value = _float(rec.get(col))
                if math.isfinite(value):
                    latest[col] = value
    hist: dict[str, list[float]] = {"epoch": [float(e) for e in sorted(by_epoch)]}
    for col in cols:
        hist[col] = [by_epoch[e].get(col, float("nan")) for e in sorted(by_epoch)]
    return hist


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays and NaN inside nested containers to JSON-ready values."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    return str(obj)


# ----------------------------------------------------------------------------------------------
# Command


def resolve_paths(cfg: EvaluateConfig) -> tuple[Path, str, Path, Path, dict[str, Any]]:
    """Return ``(run folder, shards as given, local shards folder, output folder, run's train config)``.

    The shards as given are ``--data`` or the run's own; remote ones are read from a verified local copy.
    """
    if not cfg.run:
        raise ConfigError("--run is required: the run folder written by 'catsdogs train'")
    run = Path(cfg.run)
    run_dir = run.parent if run.is_file() else run
    train_cfg: dict[str, Any] = {}
    cfg_path = run_dir / schema.CONFIG_NAME
    if cfg_path.is_file():
        try:
            train_cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            train_cfg = {}
    source = cfg.data or str(train_cfg.get("data", ""))
    if not source:
        raise ConfigError(f"run {str(run_dir)!r} does not record its shards folder; give --data")
    out = Path(cfg.out) if cfg.out else run_dir / "eval"
    data = local_shards(source, cfg.cache_dir or str(train_cfg.get("cache_dir", "")))
    return run_dir, source, Path(data), out, train_cfg


def check_compatible(manifest: Manifest, predictor: Any, data: Path) -> None:
    """Refuse shards whose classes or image size differ from what the model was trained on."""
    if list(manifest.classes) != list(predictor.classes):
        raise ConfigError(f"shards {str(data)!r} have classes {manifest.classes}, the model was trained "
                          f"on {predictor.classes}; fix --data")
    if int(manifest.size) != int(predictor.size):
        raise ConfigError(f"shards {str(data)!r} hold {manifest.size}px images, the model expects "
                          f"{predictor.size}px; evaluate on shards made with --size {predictor.size} "
                          f"(fix --data)")


def write_plots(out: Path, preds: Predictions, metrics: dict[str, Any], classes: list[str],
                history: dict[str, list[float]], mistakes: np.ndarray, images: np.ndarray,
                split: str) -> dict[str, Path]:
    """Write every PNG; return caption -> path in report order."""
    n = metrics["n"]
    pred = preds.probs.argmax(axis=1)
    figs = {
        "Confusion matrix (counts and row %)": (
            "confusion_matrix.png",
            plots.confusion_matrix_figure(np.asarray(metrics["confusion_matrix"]), classes,
                                          f"Confusion matrix \u2014 {split} (n = {n:,})")),
        "ROC curve": ("roc_curve.png", plots.roc_figure(
            roc_curves(preds.labels, preds.probs, classes),
            f"ROC \u2014 {split}" + (f" (macro AUC = {metrics['roc_auc']:.4f})"
                                     if len(classes) > 2 and metrics["roc_auc"] is not None else ""))),
        "Loss per epoch": ("loss_curve.png", plots.history_figure(
            history["epoch"], history.get("train_loss", []), history.get("val_loss", []),
            "Loss", "Loss per epoch")),
        "Accuracy per epoch": ("accuracy_curve.png", plots.history_figure(
            history["epoch"], history.get("train_acc", []), history.get("val_acc", []),
            "Accuracy", "Accuracy per epoch")),
        MISTAKES_CAPTION: ("misclassified.png", plots.mistakes_figure(
            images, [classes[i] for i in preds.labels[mistakes]], [classes[i] for i in pred[mistakes]],
            [float(preds.probs[i, pred[i]]) for i in mistakes], metrics["errors"], n)),
    }
    return {caption: plots.save_figure(fig, out / name) for caption, (name, fig) in figs.items()}


def write_predictions(path: Path, preds: Predictions, classes: list[str]) -> None:
    """Write one CSV line per evaluated row: shard position, row, true and predicted label, probs."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["shard", "row", "label", "pred", *[f"p_{c}" for c in classes]])
    pred = preds.probs.argmax(axis=1)
    for i in range(len(preds.labels)):
        w.writerow([int(preds.shard[i]), int(preds.row[i]), classes[preds.labels[i]], classes[pred[i]],
                    *[f"{p:.6f}" for p in preds.probs[i]]])
    atomic_write_text(path, buf.getvalue())


def main(cfg: EvaluateConfig) -> int:
    """Evaluate a run on one split of its shards and write metrics, plots and report.html."""
    from catsdogs.inference import Predictor
    from catsdogs.report import ReportData, write_report
    from catsdogs.runtime import setup

    if not cfg.run:
        raise ConfigError("--run is required: the run folder written by 'catsdogs train'")
    device = setup(cfg.threads, cfg.device)
    predictor = Predictor.from_run(cfg.run, device, cfg.checkpoint)  # CheckpointError if none
    run_dir, source, data, out, train_cfg = resolve_paths(cfg)
    manifest = load_manifest(data, "--data")
    check_compatible(manifest, predictor, data)
    if manifest.split_rows(cfg.split) == 0:
        raise InputError(f"split {cfg.split!r} of {str(data)!r} has no images; choose another --split")

    preds = predict_split(predictor, data, manifest, cfg.split, cfg.batch_size, cfg.tta)
    classes = list(manifest.classes)
    metrics, report_text = compute_metrics(preds.labels, preds.probs, classes)
    description = _jsonable(predictor.describe())
    remote = storage.is_remote(source)  # then ``data`` is its verified local copy
    metrics.update({"split": cfg.split, "data": source if remote else str(data.resolve()),
                    "run": str(run_dir.resolve()), "checkpoint": str(predictor.path.resolve()),
                    "tta": cfg.tta, "model": description})
    if remote:
        metrics["data_cache"] = str(data)
    out.mkdir(parents=True, exist_ok=True)
    resolved = dataclasses.replace(cfg, data=source if remote else str(data), out=str(out))
    save_config(resolved, out / schema.CONFIG_NAME)
    atomic_write_text(out / "metrics.json", json.dumps(_jsonable(metrics), indent=2) + "\n")
    atomic_write_text(out / "classification_report.txt", report_text)
    write_predictions(out / "predictions.csv", preds, classes)

    mistakes = most_confident_mistakes(preds.labels, preds.probs, cfg.grid)
    images = load_rows(data, manifest, cfg.split, preds.shard[mistakes], preds.row[mistakes])
    history = read_history(run_dir / schema.METRICS_CSV)
    pngs = write_plots(out, preds, metrics, classes, history, mistakes, images, cfg.split)
    page = write_report(out / "report.html", ReportData(
        title=f"catsdogs evaluation: {run_dir.resolve().name}",
        metrics=_jsonable(metrics), classification_report=report_text, images=pngs,
        wide={MISTAKES_CAPTION},
        train_config=train_cfg or dict(predictor.checkpoint.get(schema.CKPT_TRAIN_CONFIG, {})),
        preprocess_config=dict(manifest.config), eval_config=to_dict(resolved),
        counts=manifest.counts, classes=classes, skipped=list(manifest.skipped),
        ignored=dict(manifest.ignored), stats=dict(manifest.stats),
        created=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    ))
    print(summary(metrics, page))
    return 0


def summary(metrics: dict[str, Any], page: Path) -> str:
    """Return the short human summary printed at the end of evaluate."""
    auc = metrics["roc_auc"]
    lines = [
        f"evaluated {metrics['n']:,} {metrics['split']} images of {metrics['data']} with "
        f"{metrics['model'].get('name')} (epoch {metrics['model'].get('epoch')})",
        f"  accuracy {metrics['accuracy']:.4f}  ROC AUC {'n/a' if auc is None else f'{auc:.4f}'}  "
        f"log loss {metrics['log_loss']:.4f}  errors {metrics['errors']:,}",
    ]
    for name in metrics["classes"]:
        m = metrics["per_class"][name]
        lines.append(f"  {name:<12} precision {m['precision']:.4f}  recall {m['recall']:.4f}  "
                     f"f1 {m['f1-score']:.4f}  support {int(m['support']):,}")
    lines.append(f"report: {page.resolve()}")
    return "\n".join(lines)
