"""Out-of-distribution detection: is an image like the training photos at all ("neither class")?

A detector is fitted at training time from the TRAINING split only, in the model's own feature
space (the input of its final linear layer, ``model.features(x)``), so it works for whatever classes
a run was trained on. Its threshold is then set on the VALIDATION split so that a chosen share of
validation images is accepted (:func:`calibrate_threshold`). Higher scores mean "less like training".

Methods (values of ``train --ood-method``), compared on real data in docs/models.md:

* ``mahalanobis``: squared Mahalanobis distance to the nearest class mean under one shared,
  Ledoit-Wolf-shrunk covariance (Lee et al. 2018). Parameters: whitened class means and the
  whitening matrix, ``(C, d)`` + ``(d, d)``.
* ``knn``: cosine distance to the k-th nearest of a bounded sample of training features (Sun et al.
  2022). Parameters: the sample, ``(m, d)``, unit rows stored as float16 (half the bytes; a cosine
  similarity moves by < 1e-3).
* ``energy``: ``-logsumexp(logits)`` (Liu et al. 2020); needs no features, only the head.

Everything stored is a tensor, a float or a string, so checkpoints stay ``weights_only``-loadable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from catsdogs.models.ood_names import OOD_METHODS

KNN_K = 10
"""Neighbour rank for the kNN score (k=10: less noisy than k=1, still local)."""
KNN_BANK_ROWS = 4096
"""Training features kept for kNN: bounds the checkpoint (4096 x 1280 float16 = 10.5 MB for Lite0,
21 MB for the Lite1+Lite2 ensemble's 2560-d features)."""
FLAT_STD = 2.0
"""Pixel standard deviation (0..255 units) under which a decoded image is "flat" (blank or one colour):
it holds nothing to classify, so it is unknown whatever the detector says. JPEG noise on a flat photo
stays under ~1; the flattest PetImages photo is far above it."""
SELF_COSINE_GAP = 1e-3
"""A bank row within this cosine distance of a query is that image itself (or a pixel copy of it): the
float16 bank moves a cosine by < 1e-3, so an image's own entry scores above ``1 - 1e-3``. Used to score
training images out of sample (``Detector.score(..., leave_out=...)``)."""
MIN_SIDE = 16
"""Images with a side under this many pixels hold no recognisable subject; they are answered unknown."""
_EPS = 1e-6


@dataclass
class Detector:
    """A fitted detector: its method, parameters (tensors) and the accept threshold on its score."""

    method: str
    params: dict[str, torch.Tensor]
    threshold: float = math.inf
    accept_rate: float = 1.0
    _float_banks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    """float32 copies of the kNN bank per device (not saved: rebuilt from ``params``)."""

    @torch.inference_mode()
    def score(self, features: torch.Tensor, logits: torch.Tensor,
              leave_out: torch.Tensor | None = None) -> torch.Tensor:
        """Return the ``(n,)`` OOD score of a batch (higher = less like the training images).

        ``leave_out`` (bool ``(n,)``, knn only) marks rows that may be in the kNN bank themselves (training
        images): for those, a bank row within :data:`SELF_COSINE_GAP` of the query is taken to be the
        image itself and skipped, so the score is out of sample. The other methods ignore it: one image
        moves a class mean over thousands of training rows negligibly.
        """
        f = features.float()
        if self.method == "mahalanobis":
            z = f @ self.params["whiten"].to(f.device)
            return torch.cdist(z, self.params["means"].to(f.device)).square().min(dim=1).values
        if self.method == "knn":
            bank = self._bank(f.device)
            sims = F.normalize(f, dim=1) @ bank.T
            k = min(KNN_K, bank.shape[0])
            if leave_out is None:
                return 1.0 - sims.topk(k, dim=1).values[:, -1]
            top = sims.topk(min(k + 1, bank.shape[0]), dim=1).values
            own = leave_out.to(f.device) & (top[:, 0] >= 1.0 - SELF_COSINE_GAP)
            rank = torch.where(own, min(k, top.shape[1] - 1), k - 1)
            return 1.0 - top.gather(1, rank[:, None]).squeeze(1)
        if self.method == "energy":
            return -torch.logsumexp(_full_logits(logits.float()), dim=1)
        raise ValueError(f"unknown OOD method {self.method!r}; expected one of {OOD_METHODS}")

    def _bank(self, device: torch.device) -> torch.Tensor:
        """The kNN bank in float32 on ``device``, converted once per detector.

        Converting the float16 bank (up to 4096 x 2560) at every call was a fixed cost of every served
        batch, paid again for a lone image (docs/engines.md, serving).
        """
        key = str(device)
        if key not in self._float_banks:
            self._float_banks[key] = self.params["bank"].to(device, torch.float32)
        return self._float_banks[key]

    def known(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        """Return a bool mask: True where the score is within the accepted range."""
        return np.asarray(scores) <= self.threshold

    def to_state(self) -> dict[str, Any]:
        """The checkpoint entry: plain tensors, floats and strings."""
        params = {k: v.cpu().contiguous() for k, v in self.params.items()}
        return {"method": self.method, "params": params,
                "threshold": float(self.threshold), "accept_rate": float(self.accept_rate)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Detector:
        """Rebuild a detector from its checkpoint entry."""
        return cls(method=str(state["method"]), params=dict(state["params"]),
                   threshold=float(state["threshold"]), accept_rate=float(state["accept_rate"]))


def _full_logits(logits: torch.Tensor) -> torch.Tensor:
    """One-logit binary heads mean ``[0, z]``; N-logit heads are used as they are."""
    if logits.shape[1] == 1:
        return torch.cat([torch.zeros_like(logits), logits], dim=1)
    return logits


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Return the Ledoit-Wolf shrunk covariance of centred rows ``x`` ``(n, d)`` and its shrinkage.

    Same estimator as ``sklearn.covariance.ledoit_wolf`` (float64): ``(1 - a) S + a mu I`` with the
    shrinkage ``a`` that minimises the expected Frobenius error.
    """
    x = x.double()
    n, d = x.shape
    s = x.T @ x / n
    mu = float(torch.trace(s)) / d
    x2 = x.square()
    beta_ = float((x2.T @ x2).sum()) / n
    delta_ = float(s.square().sum())
    beta = (beta_ - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * float(torch.trace(s)) + d * mu * mu) / d
    beta = min(beta, delta)
    shrink = 0.0 if beta == 0 else beta / delta
    cov = (1.0 - shrink) * s + shrink * mu * torch.eye(d, dtype=torch.float64)
    return cov, shrink


def fit_detector(method: str, features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                 num_classes: int, seed: int = 0) -> Detector:
    """Fit ``method`` on TRAINING features ``(n, d)`` and labels ``(n,)``; the threshold is set later."""
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if method == "mahalanobis":
        means = torch.stack([f[y == c].mean(0) if (y == c).any() else f.mean(0) for c in range(num_classes)])
        cov, _shrink = ledoit_wolf(f - means[y])
        evals, evecs = torch.linalg.eigh(cov)
        whiten = evecs / evals.clamp_min(_EPS).sqrt()  # x @ whiten: unit covariance
        return Detector(method, {"whiten": whiten.float(), "means": (means @ whiten).float()})
    if method == "knn":
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(f), generator=g)[:KNN_BANK_ROWS]
        return Detector(method, {"bank": F.normalize(f[keep].float(), dim=1).half()})
    if method == "energy":
        return Detector(method, {})
    raise ValueError(f"unknown OOD method {method!r}; expected one of {OOD_METHODS}")


def calibrate_threshold(detector: Detector, val_scores: np.ndarray | torch.Tensor,
                        accept_rate: float) -> Detector:
    """Set the threshold so that at least ``accept_rate`` of the VALIDATION scores are accepted."""
    scores = np.sort(np.asarray(val_scores, dtype=np.float64))
    if len(scores) == 0:
        detector.threshold = math.inf  # nothing to calibrate on: accept everything
    else:
        k = min(len(scores) - 1, max(0, math.ceil(accept_rate * len(scores)) - 1))
        detector.threshold = float(scores[k])
    detector.accept_rate = float(accept_rate)
    return detector


def pixel_spread(images: np.ndarray) -> np.ndarray:
    """Return each uint8 NHWC image's largest per-channel pixel standard deviation (0..255 units).

    Per channel, so a one-colour image is 0 whatever its colour (red, green and blue differing do not
    count as detail).
    """
    if len(images) == 0:
        return np.zeros(0, dtype=np.float64)
    x = np.asarray(images, dtype=np.float32).reshape(len(images), -1, images.shape[-1])
    return x.std(axis=1).max(axis=1).astype(np.float64)


def flat_images(images: np.ndarray) -> np.ndarray:
    """Return a bool mask of uint8 NHWC images that are flat (blank or one colour, see FLAT_STD)."""
    return pixel_spread(images) < FLAT_STD
