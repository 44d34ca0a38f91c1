"""``catsdogs evaluate``: metrics, plots and a self-contained HTML report for a trained run.

Shards (npy or Parquet, :func:`catsdogs.shards.reader.iter_batches`) are streamed one batch at a time, so
memory stays bounded by ``--batch-size`` whatever the split size; only the ``(n, C)`` probabilities
are kept.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs import schema
from catsdogs.checkpoint import CKPT_TRAIN_CONFIG
from catsdogs.cluster.shardjob import in_shard_order, run_local
from catsdogs.cluster.work import AnswerWork, Ready
from catsdogs.config import EvaluateConfig, check_required, need, save_config, to_dict
from catsdogs.engines import feature_cache
from catsdogs.errors import ConfigError, InputError
from catsdogs.evaluate import plots
from catsdogs.evaluate.metrics import (
    answered_curve,
    compute_metrics,
    expected_calibration_error,
    jsonable,
    most_confident_mistakes,
    reliability_bins,
    roc_curves,
)
from catsdogs.evaluate.report import ReportData, write_report
from catsdogs.infer.explain import Explainer, overlay
from catsdogs.infer.load import load_predictor
from catsdogs.infer.predictor import Predictor
from catsdogs.io import storage
from catsdogs.io.atomic import atomic_write_text
from catsdogs.io.checksum import sha256_file
from catsdogs.rundir import EVAL_DIR, EVAL_METRICS_NAME, REPORT_NAME, RunDir, read_history
from catsdogs.shards.cache import cache_folder, fetch_manifest, local_shards, partial_copy
from catsdogs.shards.manifest import Manifest, load_manifest
from catsdogs.shards.reader import load_rows
from catsdogs.track.lineage import TAG_PREFIX, data_tags, git_tags
from catsdogs.track.mlflow_run import PARENT_TAG, ending, experiment_name_given, open_run, read_link
from catsdogs.track.registry import tracking_uri

OUTPUT_FILES: tuple[str, ...] = (
    EVAL_METRICS_NAME, "classification_report.txt", "predictions.csv", "confusion_matrix.png",
    "roc_curve.png", "reliability.png", "loss_curve.png", "accuracy_curve.png", "misclassified.png",
    "answered.png", REPORT_NAME,
    schema.CONFIG_NAME,
)
"""Everything evaluate writes into its output folder."""

ANSWERED_CAPTION = "Share answered vs accuracy among answered (the \"unknown\" threshold)"
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
    raw: np.ndarray | None = None
    """``(n, C)`` probabilities before temperature scaling (None: same as ``probs``)."""
    scores: np.ndarray | None = None
    """``(n,)`` OOD scores (NaN without a detector)."""
    known: np.ndarray | None = None
    """``(n,)`` False where the image is answered "unknown" (None: all known)."""

    @classmethod
    def from_parts(cls, parts: list[dict[str, np.ndarray] | None], classes: int) -> Predictions:
        """One split's answers from its shards' answer arrays (``Answers.arrays``), in shard order.

        A local pass and Spark tasks give the same parts; None is a shard without rows. Each row keeps
        its shard's position and its row inside it.
        """
        kept = [(pos, p) for pos, p in enumerate(parts) if p and len(p["labels"])]
        if not kept:
            return cls(np.zeros((0, classes), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int32),
                       np.zeros(0, np.int64), np.zeros((0, classes), np.float32), np.zeros(0, np.float32),
                       np.zeros(0, bool))

        def joined(key: str) -> np.ndarray:
            return np.concatenate([p[key] for _pos, p in kept])
        return cls(probs=joined("probs"), labels=joined("labels"),
                   shard=np.concatenate([np.full(len(p["labels"]), pos, np.int32) for pos, p in kept]),
                   row=np.concatenate([np.arange(len(p["labels"]), dtype=np.int64) for _pos, p in kept]),
                   raw=joined("raw"), scores=joined("scores"), known=joined("known"))


def predict_split(predictor: Any, root: Path, manifest: Manifest, split: str, batch_size: int,
                  tta: bool | None = None, progress: bool = True) -> Predictions:
    """Run ``predictor`` over every row of ``split``; return its answers, labels and locations.

    The same per-batch work as the Spark tasks of :func:`spark_predict_split`, run here. ``tta`` None
    follows the predictor's (the run's) setting.
    """
    work = AnswerWork(Ready(predictor), tta)
    results = run_local(root, manifest, (split,), work, batch_size=batch_size, desc=f"evaluate {split}",
                        progress=progress)
    parts = in_shard_order(results, split, len(manifest.split_shards(split)))
    return Predictions.from_parts(parts, len(manifest.classes))


def spark_predict_split(cfg: EvaluateConfig, predictor: Predictor, source: str, manifest: Manifest
                        ) -> Predictions:
    """:func:`predict_split` as Spark tasks on ``--master``: one task per shard, read by the executors.

    The executors run the driver's predictor (checkpoint and engine shipped, the int8 guard already
    passed here) and send back only the answers, so the result is the one :func:`predict_split` gives.
    """
    from catsdogs.cluster.session import NEEDED, runtime_modules, spark_session  # lazy: pyspark
    from catsdogs.cluster.shardjob import run_shards
    from catsdogs.cluster.ship import Shipment

    data = source if storage.is_remote(source) else str(Path(source).resolve())
    modules = NEEDED + runtime_modules(predictor.backend)
    master = need(cfg, "master")
    with spark_session(master, "catsdogs-evaluate", cfg.spark_conf, modules) as spark, \
            Shipment(spark.sparkContext) as shipment:
        work = AnswerWork(shipment.predictor(predictor, cfg.threads))
        results, _ = run_shards(spark, master, data, manifest, (cfg.split,), work,
                                batch_size=cfg.batch_size, desc=f"evaluate {cfg.split}")
    parts = in_shard_order(results, cfg.split, len(manifest.split_shards(cfg.split)))
    return Predictions.from_parts(parts, len(manifest.classes))


def cached_predict_split(predictor: Any, cfg: EvaluateConfig, data: Path, manifest: Manifest) -> Predictions:
    """``predict_split`` with the split's features read from the run's cache when it holds them.

    The cache (``engines/feature_cache.py``) is checked before any engine is built; on a miss the pass
    runs as usual and its features are saved for the next evaluation. Flip TTA needs the mirrored
    images' features, which are not cached: it always runs the engine.
    """
    if predictor.settings.tta or predictor.device.type != "cpu":
        return predict_split(predictor, data, manifest, cfg.split, cfg.batch_size)
    run = RunDir(predictor.path.parent)
    path = run.feature_cache(cfg.split, predictor.backend)  # --backend, else the run's engine
    base = feature_cache.base_key(data, manifest, cfg.split, sha256_file(predictor.path), predictor.backend,
                                  cfg.int8_max_drop, predictor.mean, predictor.std, predictor.size)
    hit = feature_cache.load(path, base, run.engine_dir)
    if hit is not None:
        print(f"catsdogs: {cfg.split} features of {hit.engine} reused from {path}", file=sys.stderr)
        predictor.engine = feature_cache.ReplayEngine(cached=hit.feats, facts=hit.facts, name=hit.engine)
        preds = predict_split(predictor, data, manifest, cfg.split, cfg.batch_size)
        if not np.array_equal(preds.labels, hit.labels):
            raise RuntimeError(f"feature cache {path} does not follow the shards' order; delete it")
        return preds
    recorder = feature_cache.RecordingEngine(predictor.feature_engine)
    predictor.engine = recorder
    try:
        preds = predict_split(predictor, data, manifest, cfg.split, cfg.batch_size)
    finally:
        predictor.engine = recorder.inner
    try:
        feature_cache.save(path, recorder.recorded(), preds.labels, base, recorder.inner)
    except OSError:
        pass  # a read-only run folder: evaluating again computes the features again
    return preds


def confidence_metrics(preds: Predictions, predictor: Any) -> dict[str, Any]:
    """ECE before/after temperature scaling, the share answered "unknown", accuracy among the rest."""
    raw = preds.raw if preds.raw is not None else preds.probs
    known = preds.known if preds.known is not None else np.ones(len(preds.labels), dtype=bool)
    correct = preds.probs.argmax(axis=1) == preds.labels
    n_known = int(known.sum())
    return {
        "ece_uncalibrated": expected_calibration_error(preds.labels, raw),
        "ece": expected_calibration_error(preds.labels, preds.probs),
        "temperature": predictor.temperature if predictor.settings.calibrate else 1.0,
        "reject": predictor.settings.reject,
        "ood_method": predictor.detector.method if predictor.detector is not None else None,
        "ood_threshold": predictor.detector.threshold if predictor.detector is not None else None,
        "engine": predictor.feature_engine.name,
        "unknown_share": 1.0 - n_known / max(1, len(known)),
        "accepted": n_known,
        "accuracy_accepted": float(correct[known].mean()) if n_known else float("nan"),
    }


def resolve_paths(cfg: EvaluateConfig, copy: bool = True
                  ) -> tuple[Path, str, Path, Path, dict[str, Any]]:
    """Return ``(run folder, shards as given, local shards folder, output folder, run's train config)``.

    The shards as given are ``--data`` or the run's own; remote ones are read from a verified local copy
    (with ``copy`` False the copy's folder, left empty: executors read the shards on ``--master``).
    """
    run = RunDir.from_arg(need(cfg, "run"))
    train_cfg = run.read_config()
    source = cfg.data or str(train_cfg.get("data", ""))
    if not source:
        raise ConfigError(f"run {str(run.root)!r} does not record its shards folder; give --data")
    out = Path(cfg.output) if cfg.output else run.eval_dir
    cache = cfg.cache_dir or str(train_cfg.get("cache_dir", ""))
    remote_only = not copy and storage.is_remote(source)
    data = cache_folder(source, cache) if remote_only else local_shards(source, cache)
    return run.root, source, Path(data), out, train_cfg


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
                split: str, overlays: np.ndarray | None = None) -> dict[str, Path]:
    """Write every PNG; return caption -> path in report order (``overlays``: heatmaps of the mistakes)."""
    n = metrics["n"]
    pred = preds.probs.argmax(axis=1)
    raw = preds.raw if preds.raw is not None else preds.probs
    figs = {
        "Confusion matrix (counts and row %)": (
            "confusion_matrix.png",
            plots.confusion_matrix_figure(np.asarray(metrics["confusion_matrix"]), classes,
                                          f"Confusion matrix \u2014 {split} (n = {n:,})")),
        "ROC curve": ("roc_curve.png", plots.roc_figure(
            roc_curves(preds.labels, preds.probs, classes),
            f"ROC \u2014 {split}" + (f" (macro AUC = {metrics['roc_auc']:.4f})"
                                     if len(classes) > 2 and metrics["roc_auc"] is not None else ""))),
        "Reliability diagram (calibration)": ("reliability.png", plots.reliability_figure(
            {"before (T = 1)": (*reliability_bins(preds.labels, raw), metrics["ece_uncalibrated"]),
             f"after (T = {metrics['temperature']:.3g})": (*reliability_bins(preds.labels, preds.probs),
                                                          metrics["ece"])},
            f"Reliability \u2014 {split} (n = {n:,})", num_classes=len(classes))),
        "Loss per epoch": ("loss_curve.png", plots.history_figure(
            history["epoch"], history.get("train_loss", []), history.get("val_loss", []),
            "Loss", "Loss per epoch")),
        "Accuracy per epoch": ("accuracy_curve.png", plots.history_figure(
            history["epoch"], history.get("train_acc", []), history.get("val_acc", []),
            "Accuracy", "Accuracy per epoch")),
        ANSWERED_CAPTION: ("answered.png", answered_plot(preds, metrics, split)),
        MISTAKES_CAPTION: ("misclassified.png", plots.mistakes_figure(
            images, [classes[i] for i in preds.labels[mistakes]], [classes[i] for i in pred[mistakes]],
            [float(preds.probs[i, pred[i]]) for i in mistakes], metrics["errors"], n, overlays)),
    }
    return {caption: plots.save_figure(fig, out / name) for caption, (name, fig) in figs.items()}


def answered_plot(preds: Predictions, metrics: dict[str, Any], split: str) -> Any:
    """The share-answered / accuracy-among-answered trade-off of the detector, with the run's point."""
    threshold = metrics.get("ood_threshold")
    title = f"Answered vs right \u2014 {split}"
    if threshold is None or preds.scores is None or np.isnan(preds.scores).all():
        return plots.message_figure(title, "This run has no out-of-distribution detector: it answers every "
                                           "image with a class.")
    known = preds.known if preds.known is not None else np.ones(len(preds.labels), dtype=bool)
    flat = ~known & (preds.scores <= threshold)  # rejected within the threshold: a flat image
    correct = preds.probs.argmax(axis=1) == preds.labels
    shares, accuracies = answered_curve(preds.scores, correct, flat)
    point = ((float(known.mean()), float(metrics["accuracy_accepted"]))
             if metrics.get("reject") and known.any() else None)
    return plots.answered_figure(shares, accuracies, point, title)


def explain_mistakes(predictor: Predictor, images: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Overlay on each mistake (a shard-size image) the Grad-CAM heatmap of the class it was taken for."""
    if len(images) == 0:
        return images
    found = Explainer(predictor).explain_arrays(images, pred)
    return np.stack([overlay(img, ex.heatmap) for img, ex in zip(images, found, strict=True)])


def write_predictions(path: Path, preds: Predictions, classes: list[str]) -> None:
    """Write one CSV line per evaluated row: shard position, row, true and predicted label, probs."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["shard", "row", "label", "pred", *[f"p_{c}" for c in classes], "ood_score", "unknown"])
    pred = preds.probs.argmax(axis=1)
    n = len(preds.labels)
    scores = preds.scores if preds.scores is not None else np.full(n, np.nan)
    known = preds.known if preds.known is not None else np.ones(n, dtype=bool)
    for i in range(n):
        w.writerow([int(preds.shard[i]), int(preds.row[i]), classes[preds.labels[i]], classes[pred[i]],
                    *[f"{p:.6f}" for p in preds.probs[i]], "" if np.isnan(scores[i]) else f"{scores[i]:.6g}",
                    int(not known[i])])
    atomic_write_text(path, buf.getvalue())


def main(cfg: EvaluateConfig) -> int:
    """Evaluate a run on one split of its shards and write metrics, plots and report.html."""
    check_required(cfg)
    # CheckpointError if none; --data also calibrates and checks an int8 engine.
    predictor = load_predictor(need(cfg, "run"), cfg, checkpoint=cfg.checkpoint, shards=cfg.data)
    run_dir, source, data, out, train_cfg = resolve_paths(cfg, copy=not cfg.master)
    manifest = fetch_manifest(source) if cfg.master else load_manifest(data, "--data")
    check_compatible(manifest, predictor, data)
    if manifest.split_rows(cfg.split) == 0:
        raise InputError(f"split {cfg.split!r} of {str(data)!r} has no images; choose another --split")

    if cfg.master:
        preds = spark_predict_split(cfg, predictor, source, manifest)
    else:
        preds = cached_predict_split(predictor, cfg, data, manifest)
    classes = list(manifest.classes)
    metrics, report_text = compute_metrics(preds.labels, preds.probs, classes)
    metrics.update(confidence_metrics(preds, predictor))
    description = jsonable(predictor.describe())
    remote = storage.is_remote(source)  # then ``data`` is its verified local copy
    metrics.update({"split": cfg.split, "data": source if remote else str(data.resolve()),
                    "run": str(run_dir.resolve()), "checkpoint": str(predictor.path.resolve()),
                    "tta": predictor.settings.tta, "model": description})
    if remote:
        metrics["data_cache"] = str(data)
    out.mkdir(parents=True, exist_ok=True)
    resolved = dataclasses.replace(cfg, data=source if remote else str(data), output=str(out))
    save_config(resolved, out / schema.CONFIG_NAME)
    atomic_write_text(out / EVAL_METRICS_NAME, json.dumps(jsonable(metrics), indent=2) + "\n")
    atomic_write_text(out / "classification_report.txt", report_text)
    write_predictions(out / "predictions.csv", preds, classes)

    mistakes = most_confident_mistakes(preds.labels, preds.probs, cfg.grid)
    if cfg.master and storage.is_remote(source):  # only the shards of the images the report shows
        data = Path(partial_copy(source, manifest, cfg.split, cache_dir=cfg.cache_dir or str(
            train_cfg.get("cache_dir", "")), positions={int(s) for s in preds.shard[mistakes]}))
    images = load_rows(data, manifest, cfg.split, preds.shard[mistakes], preds.row[mistakes])
    history = read_history(RunDir(run_dir).metrics)
    overlays = explain_mistakes(predictor, images, preds.probs[mistakes].argmax(axis=1))
    pngs = write_plots(out, preds, metrics, classes, history, mistakes, images, cfg.split, overlays)
    page = write_report(out / REPORT_NAME, ReportData(
        title=f"catsdogs evaluation: {run_dir.resolve().name}",
        metrics=jsonable(metrics), classification_report=report_text, images=pngs,
        wide={MISTAKES_CAPTION},
        train_config=train_cfg or dict(predictor.checkpoint.get(CKPT_TRAIN_CONFIG, {})),
        preprocess_config=dict(manifest.config), eval_config=to_dict(resolved),
        counts=manifest.counts, classes=classes, skipped=list(manifest.skipped),
        ignored=dict(manifest.ignored), stats=dict(manifest.stats),
        created=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    ))
    print(summary(metrics, page))
    log_evaluation(resolved, RunDir(run_dir), out, metrics, source, data, manifest)
    return 0


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of metrics.json worth charting: accuracy, AUC, log loss, errors, per-class scores."""
    out = {k: metrics[k] for k in ("accuracy", "roc_auc", "log_loss", "errors", "n")
           if isinstance(metrics.get(k), int | float)}
    for name, scores in metrics.get("per_class", {}).items():
        for key in ("precision", "recall", "f1-score"):
            if isinstance(scores.get(key), int | float):
                # "macro avg" -> macro_avg: metric names without spaces are easier to search and chart.
                out[f"{key.replace('-score', '')}_{name.replace(' ', '_')}"] = scores[key]
    return out


def log_evaluation(cfg: EvaluateConfig, run: RunDir, out: Path, metrics: dict[str, Any], source: str,
                   data: Path, manifest: Manifest) -> None:
    """With tracking on: log this evaluation as an MLflow run nested under the run's training run.

    Params are the resolved config, metrics the scalar results, artifacts everything in ``out`` (PNGs,
    report.html, metrics.json, ...). The two runs are linked both ways by tags, and the training run
    also gets the results as ``test_*`` metrics (``<split>_*``) and the report under ``eval/``, so
    one table compares trained models and each links its report.
    """
    if not tracking_uri(cfg.tracking_uri):
        return
    link = read_link(run.mlflow_link)
    train_id = link.get("run_id", "") if link.get("tracking_uri") == tracking_uri(cfg.tracking_uri) else ""
    tags = {**data_tags(source, data, manifest), **git_tags(), f"{TAG_PREFIX}command": "evaluate",
            f"{TAG_PREFIX}split": cfg.split, f"{TAG_PREFIX}run_folder": str(run.root.resolve())}
    if train_id:
        tags.update({f"{TAG_PREFIX}training_run_id": train_id, PARENT_TAG: train_id})
    # Unless told otherwise, the evaluation joins its training run's experiment (the UI nests it there).
    joined = train_id and not experiment_name_given(cfg.experiment)
    same_experiment = link.get("experiment_id", "") if joined else ""
    tracked = open_run(cfg.tracking_uri, cfg.experiment, f"{run.root.resolve().name}-eval-{cfg.split}",
                       params=to_dict(cfg), tags=tags, experiment_id=same_experiment)
    with ending(tracked):
        scalars = scalar_metrics(metrics)
        tracked.log_metrics(scalars)
        tracked.log_artifacts(out)
        if train_id and tracked.active:
            training = tracked.other(train_id)
            training.set_tags({f"{TAG_PREFIX}evaluation_run_id": tracked.run_id})
            training.log_metrics({f"{cfg.split}_{k}": v for k, v in scalars.items()})
            training.log_artifacts(out, EVAL_DIR)


def summary(metrics: dict[str, Any], page: Path) -> str:
    """Return the short human summary printed at the end of evaluate."""
    auc = metrics["roc_auc"]
    lines = [
        f"evaluated {metrics['n']:,} {metrics['split']} images of {metrics['data']} with "
        f"{metrics['model'].get('name')} (epoch {metrics['model'].get('epoch')})",
        f"  accuracy {metrics['accuracy']:.4f}  ROC AUC {'n/a' if auc is None else f'{auc:.4f}'}  "
        f"log loss {metrics['log_loss']:.4f}  errors {metrics['errors']:,}",
    ]
    lines.append(f"  ECE {metrics['ece_uncalibrated']:.4f} -> {metrics['ece']:.4f} after temperature "
                 f"{metrics['temperature']:.3g}  unknown {metrics['unknown_share'] * 100:.2f}% "
                 f"(accuracy among the {metrics['accepted']:,} accepted {metrics['accuracy_accepted']:.4f})")
    for name in metrics["classes"]:
        m = metrics["per_class"][name]
        lines.append(f"  {name:<12} precision {m['precision']:.4f}  recall {m['recall']:.4f}  "
                     f"f1 {m['f1-score']:.4f}  support {int(m['support']):,}")
    lines.append(f"report: {page.resolve()}")
    return "\n".join(lines)
