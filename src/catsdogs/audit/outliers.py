"""Outliers (probably neither class): distance to the nearest training images in feature space.

An image's score is ``1 - cosine similarity`` to its k-th nearest train image (deep k-NN, Sun et al.
2022), on backbone features centred on the train mean: a cat or a dog has many close train
neighbours; a logo, a text card or a blank frame has none. No covariance is estimated, so it works
with fewer images than feature dimensions. Scores become robust z-scores (median and MAD over all
images), so the threshold does not depend on the backbone's feature scale.
"""

from __future__ import annotations

import numpy as np

from catsdogs.audit.similarity import topk, unit_rows

MAD_TO_SIGMA = 1.4826
"""MAD x 1.4826 estimates the standard deviation of a normal distribution (consistency constant)."""


def knn_distance(features: np.ndarray, base_rows: np.ndarray, k: int, chunk_rows: int,
                 progress: bool = True) -> np.ndarray:
    """Return each row's ``1 - cos`` to its k-th nearest row among ``base_rows`` (never itself)."""
    center = features[base_rows].mean(0)
    z = unit_rows(features, center)
    same = np.full(len(z), -1, dtype=np.int64)
    same[base_rows] = np.arange(len(base_rows))
    k = max(1, min(k, len(base_rows) - 1))
    _, sim = topk(z, z[base_rows], k, chunk_rows, same=same, desc="outliers", progress=progress)
    return 1.0 - sim[:, k - 1].astype(np.float64)


def robust_z(scores: np.ndarray) -> np.ndarray:
    """Return ``(score - median) / (1.4826 MAD)`` (MAD floored so a constant column gives 0, not NaN)."""
    med = float(np.median(scores))
    mad = float(np.median(np.abs(scores - med))) * MAD_TO_SIGMA
    return (scores - med) / max(mad, np.finfo(np.float64).eps)


def outlier_scores(features: np.ndarray, split: np.ndarray, k: int, chunk_rows: int, progress: bool = True
                   ) -> np.ndarray:
    """Return every image's robust z-score of its k-NN distance to the train split (all rows without one)."""
    base = np.nonzero(split == "train")[0]
    if len(base) < 2:
        base = np.arange(len(split))
    return robust_z(knn_distance(features, base, k, chunk_rows, progress))
