"""Evaluation metrics from true labels and class probabilities: accuracy, ROC, log loss, report."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import (
    auc,
    classification_report,
    confusion_matrix,
    log_loss,
    roc_auc_score,
    roc_curve,
)

from catsdogs.io.jsonable import jsonable


def roc_curves(labels: np.ndarray, probs: np.ndarray, classes: list[str]
               ) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Return ``label -> (fpr, tpr, auc)``: the positive class for binary, one-vs-rest per class else.

    Classes absent from ``labels`` (or present alone) have no defined ROC and are left out.
    """
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
        "per_class": jsonable(per_class),
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


ECE_BINS = 15
"""Equal-width confidence bins for ECE and the reliability diagram (Guo et al. 2017 use 15)."""


def reliability_bins(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin: mean confidence, accuracy and count of the top-class predictions.

    Bins are ``(k/bins, (k+1)/bins]``; empty bins have NaN confidence and accuracy.
    """
    conf = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == labels) if len(probs) else np.zeros(0, dtype=bool)
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(idx, minlength=bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=bins) / counts
        acc = np.bincount(idx, weights=correct.astype(np.float64), minlength=bins) / counts
    return mean_conf, acc, counts


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over confidence bins."""
    if len(labels) == 0:
        return float("nan")
    conf, acc, counts = reliability_bins(labels, probs, bins)
    ok = counts > 0
    return float(np.sum(counts[ok] * np.abs(acc[ok] - conf[ok])) / counts.sum())


def answered_curve(scores: np.ndarray, correct: np.ndarray, flat: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Share answered and accuracy among the answered for every threshold on the OOD ``scores``.

    Images are answered lowest score first (most like training); ``flat`` ones (answered "unknown"
    whatever the threshold) never are. Returns ``(shares, accuracies)`` of equal length, share ascending.
    """
    n = len(scores)
    keep = np.ones(n, dtype=bool) if flat is None else ~np.asarray(flat, dtype=bool)
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64)[keep], nan=0.0)
    ok = np.asarray(correct, dtype=np.float64)[keep][np.argsort(s, kind="stable")]
    if not len(ok):
        return np.zeros(0), np.zeros(0)
    answered = np.arange(1, len(ok) + 1)
    return answered / max(n, 1), np.cumsum(ok) / answered
