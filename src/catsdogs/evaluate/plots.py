"""The evaluation figures: confusion matrix, ROC curves, training curves and the mistakes grid.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot), so nothing touches
global backend state and plotting works headless; each PNG is written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from catsdogs.io.atomic import atomic_save

DPI = 110
"""Resolution of every PNG in dots per inch: sharp on screen, small enough to embed in HTML."""

_TRAIN_COLOR = "#1f77b4"
_VAL_COLOR = "#d62728"


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically (tight bounding box); return the path."""
    path = Path(path)
    atomic_save(path, lambda fh: fig.savefig(fh, format="png", dpi=DPI, bbox_inches="tight"))
    return path


def message_figure(title: str, message: str, size: tuple[float, float] = (6.4, 3.0)) -> Figure:
    """Return a figure that only shows a title and a centred message (for empty or missing data)."""
    fig = Figure(figsize=size, layout="tight")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=12, fontweight="bold")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11, wrap=True,
            transform=ax.transAxes)
    ax.set_axis_off()
    return fig


def confusion_matrix_figure(cm: np.ndarray, classes: Sequence[str], title: str = "Confusion matrix"
                            ) -> Figure:
    """Plot counts with row percentages; cells are shaded by row % so class imbalance does not hide errors."""
    cm = np.asarray(cm, dtype=np.int64)
    n = len(classes)
    rows = cm.sum(axis=1, keepdims=True)
    pct = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0) * 100.0
    side = max(4.2, 1.1 * n + 2.2)
    fig = Figure(figsize=(side + 1.0, side), layout="tight")
    ax = fig.add_subplot()
    im = ax.imshow(pct, cmap="Blues", vmin=0.0, vmax=100.0)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("% of true class (row)")
    ax.set_xticks(range(n), labels=list(classes))
    ax.set_yticks(range(n), labels=list(classes))
    ax.set_xlabel("Predicted label")
    ax.set_ylabel("True label")
    ax.set_title(title, fontsize=12, fontweight="bold")
    font = 12 if n <= 4 else 9
    for i in range(n):
        for j in range(n):
            color = "white" if pct[i, j] > 55 else "black"
            ax.text(j, i, f"{cm[i, j]:,}\n{pct[i, j]:.1f}%", ha="center", va="center", color=color,
                    fontsize=font)
    return fig


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str = "ROC curve"
               ) -> Figure:
    """Plot one ROC curve per entry ``label -> (fpr, tpr, auc)`` with the chance diagonal."""
    if not curves:
        return message_figure(title, "ROC is undefined: the evaluated split holds a single class.")
    fig = Figure(figsize=(6.0, 5.4), layout="tight")
    ax = fig.add_subplot()
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, linewidth=2, label=f"{label} (AUC = {auc:.4f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance (AUC = 0.5)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title, fontsize=12, fontweight="bold")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return fig


def history_figure(epochs: Sequence[float], train: Sequence[float], val: Sequence[float],
                   metric: str, title: str) -> Figure:
    """Plot a per-epoch training metric, train vs validation; NaN points (not logged) are skipped."""
    ep = np.asarray(epochs, dtype=float)
    tr = np.asarray(train, dtype=float)
    va = np.asarray(val, dtype=float)
    if ep.size == 0 or (np.isnan(tr).all() and np.isnan(va).all()):
        return message_figure(title, "No training history (metrics.csv) was found for this run.")
    fig = Figure(figsize=(6.4, 4.0), layout="tight")
    ax = fig.add_subplot()
    marker = "o" if ep.size <= 30 else None  # markers only while they stay readable
    for values, name, color in ((tr, "train", _TRAIN_COLOR), (va, "validation", _VAL_COLOR)):
        ok = ~np.isnan(values)
        if ok.any():
            ax.plot(ep[ok], values[ok], marker=marker, color=color, linewidth=2, label=name)
    ax.set_xlabel("Epoch")
    ax.set_ylabel(metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if np.unique(ep).size == 1:
        # One row (e.g. a frozen-backbone run: one feature pass, no epochs): no curve to draw, so
        # show the point on a readable axis with its value written next to it.
        ax.set_xlim(ep[0] - 1, ep[0] + 1)
        ax.set_xticks([ep[0]])
        for values in (tr, va):
            if not np.isnan(values[-1]):
                ax.annotate(f"{values[-1]:.4f}", (ep[-1], values[-1]), textcoords="offset points",
                            xytext=(8, 4))
        title += " (one training pass)"
    ax.set_title(title, fontsize=12, fontweight="bold")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def mistakes_figure(images: np.ndarray, true: Sequence[str], pred: Sequence[str],
                    prob: Sequence[float], total_errors: int, n: int,
                    overlays: np.ndarray | None = None) -> Figure:
    """Show the most confidently wrong images with true label, predicted label and its probability.

    With ``overlays`` (same shape as ``images``: each photo with the heatmap of what drove the wrong
    answer) every cell shows the photo and its overlay side by side. ``total_errors`` and ``n`` only
    go into the title; zero images gives a figure saying so.
    """
    title = "Most confidently wrong predictions"
    if len(images) == 0:
        return message_figure(title, f"No misclassified images: all {n:,} predictions are correct.")
    k = len(images)
    cols = min(4, k)
    rows = int(np.ceil(k / cols))
    cell_width = 2.6 if overlays is None else 4.6  # inches: a photo, or a photo and its overlay
    fig = Figure(figsize=(cell_width * cols, 2.9 * rows + 0.5), layout="tight")
    for i in range(k):
        ax = fig.add_subplot(rows, cols, i + 1)
        shown = images[i] if overlays is None else np.concatenate(
            [images[i], np.full((images.shape[1], max(2, images.shape[2] // 40), 3), 255, np.uint8),
             overlays[i]], axis=1)  # a thin white gap between photo and overlay
        ax.imshow(shown, interpolation="nearest")
        ax.set_title(f"true: {true[i]}\npred: {pred[i]} ({prob[i] * 100:.1f}%)", fontsize=10,
                     color="#b00020")
        ax.set_xticks([])
        ax.set_yticks([])
    note = ("" if overlays is None
            else "\nleft: photo, right: Grad-CAM of the predicted class (red = most evidence)")
    fig.suptitle(f"{title} ({k} of {total_errors:,} errors, n = {n:,}){note}", fontsize=12,
                 fontweight="bold")
    return fig


def reliability_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]],
                       title: str = "Reliability diagram", num_classes: int = 2) -> Figure:
    """Plot accuracy against confidence per bin for each ``name -> (conf, acc, counts, ece)``.

    Top: the diagonal is perfect calibration; points below it are over-confident. Bottom: images per
    bin (log scale), since most images usually sit in the last bin and nearly empty bins are noisy.
    The x axis starts at ``1 / num_classes``, the lowest possible top-class probability.
    """
    fig = Figure(figsize=(6.4, 5.6), layout="tight")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    lo = 1.0 / max(num_classes, 1)
    top.plot([lo, 1], [lo, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    colors = (_VAL_COLOR, _TRAIN_COLOR)
    for k, ((name, (conf, acc, counts, ece)), color) in enumerate(zip(curves.items(), colors, strict=False)):
        ok = counts > 0
        top.plot(conf[ok], acc[ok], marker="o", color=color, linewidth=1.5, alpha=0.85,
                 label=f"{name}: ECE {ece * 100:.2f}%")
        bins = max(len(counts), 1)  # equal-width bins over [0, 1], as metrics.reliability_bins
        width = 1.0 / bins / (len(curves) + 1)
        centres = (np.arange(len(counts)) + 0.5) / bins
        bottom.bar(centres[ok] + (k - (len(curves) - 1) / 2) * width, counts[ok], width=width,
                   color=color, alpha=0.8)
    top.set_xlim(lo - 0.01, 1.01)
    top.set_ylabel("Accuracy")
    top.set_title(title, fontsize=12, fontweight="bold")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=9)
    bottom.set_yscale("log")
    bottom.set_ylim(bottom=0.5)  # a bin of one image still shows
    bottom.set_ylabel("Images")
    bottom.set_xlabel("Confidence (probability of the predicted class)")
    bottom.grid(alpha=0.3)
    return fig


def answered_figure(shares: np.ndarray, accuracies: np.ndarray, point: tuple[float, float] | None,
                    title: str = "Share answered vs accuracy among answered") -> Figure:
    """Plot accuracy among the answered images against the share answered, as the threshold moves.

    The "unknown" threshold trades the two: answering fewer images leaves the easier ones. ``point`` is
    the run's own operating point (share, accuracy), marked; None without a detector.
    """
    fig = Figure(figsize=(6.4, 4.4), layout="tight")
    ax = fig.add_subplot()
    ax.plot(100 * shares, 100 * accuracies, color=_TRAIN_COLOR, linewidth=1.8)
    if point is not None:
        ax.plot([100 * point[0]], [100 * point[1]], marker="o", markersize=8, color=_VAL_COLOR,
                label=f"this run: {100 * point[0]:.1f} % answered, {100 * point[1]:.2f} % right")
        ax.legend(loc="lower left", fontsize=9)
    # From half answered: below that no product operating point lies, and the first few images (all
    # right) would stretch the axis over nothing.
    ax.set_xlim(50.0, 100.5)
    shown = shares >= 0.5
    if shown.any():
        ax.set_ylim(max(0.0, 100 * float(accuracies[shown].min()) - 0.5), 100.2)
    ax.set_xlabel("Images answered with a class (%)")
    ax.set_ylabel("Accuracy among them (%)")
    ax.set_title(title, fontsize=12, fontweight="bold")
    ax.grid(alpha=0.3)
    return fig
