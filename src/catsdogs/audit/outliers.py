"""Outliers (probably neither class): the open-world rejection score of :mod:`catsdogs.models.ood`.

The audit flags the images a trained run would answer "unknown". With ``--run`` whose checkpoint has a
detector fitted on these features (same model, same size), that detector and its threshold are used
as they are. Otherwise one is fitted the way training fits it (``train/confidence.py``): a kNN bank of
the TRAIN split's features, the threshold set so that ``--accept-rate`` of the VALIDATION split is
accepted.

Every image is scored out of sample: validation and test images were never in the bank, and a
training image skips its own bank entry (``Detector.score(leave_out=...)``), so it is scored against
the other images exactly as a new photo would be. Leave-one-out rather than K-fold banks: it keeps the
one detector that training fits (and that a run stores), costs one pass, and a bank of 4,095 instead
of 4,096 rows is the same bank for every practical purpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from catsdogs.models.ood import KNN_K, Detector, calibrate_threshold, fit_detector
from catsdogs.progress import progress_bar

METHOD = "knn"
"""Method of the detector the audit fits itself: the train default (it rejected every generated non-pet
at 99 % validation acceptance, docs/models.md), and the one whose training rows can be left out of
their own score exactly (a bank of rows; the Mahalanobis means and covariance pool every row)."""
FEATURE_METHODS: tuple[str, ...] = ("concepts", "knn", "mahalanobis")
"""Detector methods that score features alone (energy needs the run's head's logits): a run's detector
of another method is replaced by one fitted here. A concepts detector flags the photos whose ImageNet
concepts lie outside the training set's (a non-pet), with no training row of its own to leave out."""


@dataclass
class OutlierScores:
    """Every image's detector score, the threshold above which it is an outlier, and where both came from."""

    score: np.ndarray
    """``(n,)`` float: the detector's score (higher = less like the training images)."""
    threshold: float
    source: str
    """One phrase for the report, e.g. "knn detector fitted on 14,400 train images"."""

    @property
    def flagged(self) -> np.ndarray:
        """Indices of the images above the threshold, highest score first."""
        idx = np.nonzero(self.score > self.threshold)[0]
        return idx[np.argsort(-self.score[idx], kind="stable")]


def fit(features: np.ndarray, labels: np.ndarray, split: np.ndarray, num_classes: int, accept_rate: float,
        seed: int, chunk_rows: int, progress: bool = True) -> Detector:
    """Fit a :data:`METHOD` detector on the train rows; threshold it on the val rows at ``accept_rate``.

    Without val rows the threshold is set on the train rows' out-of-sample scores instead.
    """
    train = np.nonzero(split == "train")[0]
    if not len(train):
        train = np.arange(len(split))  # no train split: every image is the reference
    detector = fit_detector(METHOD, features[train], labels[train], num_classes, seed)
    val = np.nonzero(split == "val")[0]
    calib = val if len(val) else train
    scores = score(detector, features[calib], np.isin(calib, train), chunk_rows, progress)
    return calibrate_threshold(detector, scores, accept_rate)


def score(detector: Detector, features: np.ndarray, in_bank: np.ndarray, chunk_rows: int,
          progress: bool = True) -> np.ndarray:
    """Return the detector's score of every row, ``chunk_rows`` at a time (memory: chunk x bank floats).

    ``in_bank`` marks the rows that may sit in the detector's bank (training images); they skip their
    own entry. A detector that needs logits (energy) cannot score features alone and is refused.
    """
    if detector.method not in FEATURE_METHODS:
        raise ValueError(f"the audit scores features; a {detector.method!r} detector needs the run's logits")
    out = np.zeros(len(features), dtype=np.float64)
    empty = torch.zeros(0, 0)
    bar = progress_bar(total=len(features), desc="outliers", unit="img", disable=not progress)
    for start in range(0, len(features), chunk_rows):
        f = torch.from_numpy(np.ascontiguousarray(features[start:start + chunk_rows], dtype=np.float32))
        own = torch.from_numpy(np.asarray(in_bank[start:start + chunk_rows], dtype=bool))
        out[start:start + len(f)] = detector.score(f, empty, leave_out=own).double().numpy()
        bar.update(len(f))
    bar.close()
    return out


def outlier_scores(features: np.ndarray, labels: np.ndarray, split: np.ndarray, num_classes: int,
                   accept_rate: float, seed: int, chunk_rows: int, run_detector: Detector | None = None,
                   progress: bool = True) -> OutlierScores:
    """Score every image with the run's detector (when given and usable) or one fitted here."""
    if run_detector is not None:
        detector = run_detector
        source = (f"the run's {detector.method} detector (threshold {detector.threshold:.4g}, accepts "
                  f"{detector.accept_rate:.1%} of its validation images)")
    else:
        detector = fit(features, labels, split, num_classes, accept_rate, seed, chunk_rows, progress)
        n_train = int((split == "train").sum()) or len(split)
        source = (f"{METHOD} detector (k={KNN_K}) fitted on {n_train:,} train images, threshold "
                  f"{detector.threshold:.4g} accepting {accept_rate:.1%} of val")
    s = score(detector, features, split == "train", chunk_rows, progress)
    return OutlierScores(score=s, threshold=float(detector.threshold), source=source)
