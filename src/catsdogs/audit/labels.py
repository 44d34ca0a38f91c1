"""Suspected label errors: out-of-sample probabilities from K-fold heads, then confident learning.

Every image gets a predicted probability from a logistic head that never saw it (K folds, stratified,
over all splits pooled: the backbone features are fixed, so no split is special). Confident learning
(Northcutt et al. 2021, through cleanlab's ``find_label_issues`` with ``prune_by_noise_rate``) then
estimates how many labels of each class are flipped from the confident joint and flags that many of
the least likely ones. Each is scored by ``1 - p(given label)`` and suggested the most probable class.
"""

from __future__ import annotations

import logging

import numpy as np
from cleanlab.filter import find_label_issues
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from catsdogs.progress import progress_bar

log = logging.getLogger(__name__)

MAX_ITER = 2000
"""lbfgs iterations of each head; standardised 1280-d features converge in a few hundred."""


def out_of_fold_probs(features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int,
                      c: float, seed: int = 0, progress: bool = False) -> np.ndarray:
    """Return ``(n, num_classes)`` probabilities, each from a head fitted on the other folds."""
    probs = np.zeros((len(labels), num_classes), dtype=np.float64)
    smallest = int(np.bincount(labels, minlength=num_classes).min())
    k = max(2, min(folds, smallest))
    if k < folds:
        log.warning("only %d images in the smallest class: %d folds instead of %d", smallest, k, folds)
    splits = StratifiedKFold(k, shuffle=True, random_state=seed).split(features, labels)
    folds = progress_bar(splits, total=k, desc="K-fold heads", unit="fold", disable=not progress)
    for fit_idx, held_idx in folds:
        scaler = StandardScaler().fit(features[fit_idx])
        clf = LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed)
        clf.fit(scaler.transform(features[fit_idx]), labels[fit_idx])
        held = clf.predict_proba(scaler.transform(features[held_idx]))
        probs[np.ix_(held_idx, clf.classes_)] = held
    return probs


def label_issues(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the indices of suspected label errors, their scores and suggested labels (best first).

    The score is ``1 - p(given label)``: 1 means the heads are sure the label is wrong.
    """
    if len(np.unique(labels)) < 2:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
    idx = np.asarray(find_label_issues(labels, probs, filter_by="prune_by_noise_rate",
                                       return_indices_ranked_by="self_confidence"), dtype=np.int64)
    score = 1.0 - probs[idx, labels[idx]]
    suggested = probs[idx].argmax(1).astype(np.int64)
    return idx, score, suggested
