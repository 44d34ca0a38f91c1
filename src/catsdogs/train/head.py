"""The frozen backbone's logistic head: fitted in memory (scikit-learn), or by passes over feature shards.

Both minimise the same objective, scikit-learn's L2-penalised logistic loss on standardised features
(one logit for two classes, else a softmax), with L-BFGS from zero, for each inverse strength in
:data:`C_GRID`; the best validation log-loss wins. In memory the features are one array; streamed they are
:class:`~catsdogs.shards.feature_shards.StreamedFeatures`, and every loss-and-gradient evaluation sums
shard by shard, so the driver holds one shard's rows and the ``(logits, width)`` weights, whatever the
row count. The streamed fit is the in-memory one, within the solver's tolerance (tests/test_cluster_passes).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import numpy as np
import torch

from catsdogs.models.heads import num_logits
from catsdogs.shards.feature_shards import StreamedFeatures

log = logging.getLogger(__name__)

C_GRID: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
"""Inverse L2 strengths tried for the logistic head on standardised features; best val log-loss wins."""
MAX_ITER = 2000
"""L-BFGS iterations per C (scikit-learn's limit here); each is a pass over the features when streamed."""
GTOL = 1e-4
"""L-BFGS stops when the largest gradient component of the mean loss is below this (scikit-learn's tol)."""
SD_FLOOR = 1e-6
"""Added to each feature's standard deviation, so a constant feature standardises to 0, not NaN."""

Head = tuple[torch.Tensor, torch.Tensor, dict[str, float]]
"""A fitted head: Linear weight ``(logits, width)``, bias ``(logits,)``, and its metrics."""


def fit_head(train_x: np.ndarray | StreamedFeatures, train_y: np.ndarray, val_x: np.ndarray,
             val_y: np.ndarray, num_classes: int, seed: int = 0, c_grid: tuple[float, ...] = C_GRID,
             max_iter: int = MAX_ITER) -> Head:
    """Fit a logistic-regression head; return the Linear weight, bias and val metrics.

    Features are standardised for the solver, then the scaling is folded back into the weights,
    so the head applies directly to raw features: ``logits = x @ W.T + b`` (1 logit for 2 classes).
    Streamed features are fitted by passes (:func:`_fit_streamed`), an array by scikit-learn.
    """
    if isinstance(train_x, StreamedFeatures):
        mu, sd = moments(train_x)
        fitted = _fit_streamed(train_x, train_y, (val_x - mu) / sd, val_y, num_classes, c_grid, max_iter,
                               mu, sd)
    else:
        mu, sd = train_x.mean(0), train_x.std(0) + SD_FLOOR
        fitted = _fit_sklearn((train_x - mu) / sd, train_y, (val_x - mu) / sd, val_y, num_classes, seed,
                              c_grid, max_iter)
    coef, intercept, metrics = fitted
    coef = coef / sd  # fold the standardisation: w' = w / sd, b' = b - w' . mu
    bias = intercept - coef @ mu
    return torch.tensor(coef, dtype=torch.float32), torch.tensor(bias, dtype=torch.float32), metrics


def moments(features: StreamedFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (+ :data:`SD_FLOOR`) in one pass (Chan's merge, float64)."""
    n, mean, m2 = 0, np.zeros(features.width), np.zeros(features.width)
    for k, c_mean, c_m2 in features.map(_part_moments):
        delta = c_mean - mean
        mean = mean + delta * k / max(n + k, 1)
        m2 = m2 + c_m2 + np.square(delta) * n * k / max(n + k, 1)
        n += k
    return mean.astype(np.float32), (np.sqrt(m2 / max(n, 1)) + SD_FLOOR).astype(np.float32)


def _part_moments(x: np.ndarray, _y: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """One part's row count, mean and sum of squared deviations (float64)."""
    mean = x.mean(0, dtype=np.float64) if len(x) else np.zeros(x.shape[1])
    return len(x), mean, np.square(x - mean, dtype=np.float64).sum(0)


def _part_terms(x: np.ndarray, y: np.ndarray, mu: np.ndarray, sd: np.ndarray, w: np.ndarray,
                b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, int]:
    """One part's summed logistic loss, its gradient (weights, bias) and its right answers."""
    xs = (x - mu) / sd
    z = (xs @ w.astype(np.float32).T).astype(np.float64) + b
    rows = np.arange(len(y))
    if w.shape[0] == 1:
        loss = float(np.logaddexp(0.0, z[:, 0]).sum() - (y * z[:, 0]).sum())
        g = (1.0 / (1.0 + np.exp(-z[:, 0])) - y)[:, None]
        right = int(((z[:, 0] > 0).astype(np.int64) == y).sum())
    else:
        top = z.max(1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(z - top).sum(1))
        loss = float((lse - z[rows, y]).sum())
        right = int((z.argmax(1) == y).sum())
        g = np.exp(z - lse[:, None])
        g[rows, y] -= 1.0
    return loss, (g.T.astype(np.float32) @ xs).astype(np.float64), g.sum(0), right


def _fit_sklearn(tx: np.ndarray, ty: np.ndarray, vx: np.ndarray, vy: np.ndarray, num_classes: int, seed: int,
                 c_grid: tuple[float, ...], max_iter: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    from sklearn.linear_model import LogisticRegression

    best: tuple[float, float, Any] | None = None
    for c in c_grid:
        clf = LogisticRegression(C=c, max_iter=max_iter, tol=GTOL, random_state=seed).fit(tx, ty)
        loss = _log_loss(vy, clf.predict_proba(vx), num_classes)
        log.info("head C=%g val_loss=%.4f", c, loss)
        if best is None or loss < best[0]:
            best = (loss, c, clf)
    assert best is not None  # nosec B101 # type narrowing: the grid is not empty
    loss, c, clf = best
    metrics = {"val_loss": loss, "C": float(c), "train_acc": float((clf.predict(tx) == ty).mean()),
               "val_acc": float((clf.predict(vx) == vy).mean()) if len(vy) else float("nan")}
    return clf.coef_, clf.intercept_, metrics


def _log_loss(y: np.ndarray, probs: np.ndarray, num_classes: int) -> float:
    """Mean validation log-loss (0 without validation rows, so the first C wins)."""
    if not len(y):
        return 0.0
    from sklearn.metrics import log_loss

    return float(log_loss(y, probs, labels=list(range(num_classes))))


def _probabilities(z: np.ndarray) -> np.ndarray:
    """Class probabilities ``(n, classes)`` of logits ``(n, 1)`` (binary) or ``(n, classes)``."""
    if z.shape[1] == 1:
        p = 1.0 / (1.0 + np.exp(-z[:, 0]))
        return np.stack([1.0 - p, p], axis=1)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


class _Objective:
    """scikit-learn's objective, ``mean loss + ||W||^2 / (2 C n)``, and its gradient, summed by parts.

    Each evaluation is one :meth:`~catsdogs.shards.feature_shards.StreamedFeatures.map`: on Spark, a job
    whose tasks read their shards and send back a ``(logits, width)`` gradient each.
    """

    def __init__(self, x: StreamedFeatures, rows: int, mu: np.ndarray, sd: np.ndarray, logits: int) -> None:
        self.x, self.rows, self.mu, self.sd, self.logits = x, rows, mu, sd, logits
        self.alpha = 0.0
        self.right = 0

    def unpack(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = theta.reshape(self.logits, self.x.width + 1)
        return w[:, :-1], w[:, -1]

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = self.unpack(theta)
        terms = self.x.map(partial(_part_terms, mu=self.mu, sd=self.sd, w=w, b=b))
        loss = sum(t[0] for t in terms)
        gw = np.sum([t[1] for t in terms], axis=0)
        gb = np.sum([t[2] for t in terms], axis=0)
        self.right = sum(t[3] for t in terms)  # of this theta: the training accuracy for free
        value = loss / self.rows + 0.5 * self.alpha * float(np.square(w).sum())
        grad = np.concatenate([gw / self.rows + self.alpha * w, (gb / self.rows)[:, None]], axis=1)
        return value, grad.reshape(-1)

    def accuracy(self, theta: np.ndarray) -> float:
        """Training accuracy of ``theta`` (one more pass)."""
        self(theta)
        return self.right / max(self.rows, 1)


def _fit_streamed(x: StreamedFeatures, y: np.ndarray, vx: np.ndarray, vy: np.ndarray, num_classes: int,
                  c_grid: tuple[float, ...], max_iter: int, mu: np.ndarray, sd: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """L-BFGS per C on streamed features, each C started from zero as scikit-learn does.

    Warm-starting each C from the previous one saves passes but stops at other points of the flat
    optimum at large C, so the C chosen could differ from the in-memory fit's.
    """
    from scipy.optimize import minimize

    objective = _Objective(x, len(y), mu, sd, num_logits(num_classes))
    best: tuple[float, float, np.ndarray] | None = None
    for c in c_grid:
        objective.alpha = 1.0 / (c * len(y))
        theta = np.zeros(objective.logits * (x.width + 1))
        result = minimize(objective, theta, jac=True, method="L-BFGS-B",
                          options={"maxiter": max_iter, "gtol": GTOL, "ftol": 64 * np.finfo(float).eps})
        theta = result.x
        w, b = objective.unpack(theta)
        loss = _log_loss(vy, _probabilities(vx @ w.T + b), num_classes)
        log.info("head C=%g val_loss=%.4f (%d passes)", c, loss, result.nfev)
        if best is None or loss < best[0]:
            best = (loss, c, theta.copy())
    assert best is not None  # nosec B101 # type narrowing: the grid is not empty
    loss, c, theta = best
    w, b = objective.unpack(theta)
    pred = _probabilities(vx @ w.T + b).argmax(1)
    metrics = {"val_loss": loss, "C": float(c), "train_acc": objective.accuracy(theta),
               "val_acc": float((pred == vy).mean()) if len(vy) else float("nan")}
    return w, b, metrics
