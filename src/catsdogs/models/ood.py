"""Out-of-distribution detection: is an image like the training photos at all ("neither class")?

A detector is fitted at training time from the TRAINING split only, in the model's own feature
space (the input of its final linear layer, ``model.features(x)``), so it works for whatever classes
a run was trained on. Its threshold is then set on the VALIDATION split so that a chosen share of
validation images is accepted (:func:`calibrate_threshold`). Higher scores mean "less like training".

Methods (values of ``train --ood-method``), compared on real data in docs/models.md:

* ``concepts``: what the photo shows, then how it looks. The backbone's own ImageNet-1k head
  (:mod:`catsdogs.models.imagenet`, on the same pooled features) gives the photo's ImageNet
  distribution ``p``; each user class ``c`` has the mean distribution ``q_c`` of its TRAINING images
  (dog breeds and domestic cats for PetImages, plus the cages and sofas they sit in). The concept score
  is the cross-entropy ``-max_c sum_j p_j log(q_cj + eps)``: high when the photo's concepts are ones the
  training photos never show (a raccoon's grey fox and badger, a rocket's drilling platform). It is
  fused with the ``knn`` score (the look) by averaging the two scores' percentiles on VALIDATION,
  so neither scale dominates; other people's pugs and Sphynx cats keep their concept, a logo or a cage
  without a pet loses both. Needs ImageNet weights (EfficientNet-Lite models); measured against every
  other candidate in docs/models.md.
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

from catsdogs.models.imagenet import imagenet_names, imagenet_probabilities
from catsdogs.models.ood_names import AUTO, CONCEPTS, OOD_CHOICES, OOD_METHODS  # noqa: F401 - re-exported

DETECTOR_VERSION = 2
"""Version of a detector's checkpoint entry. 2: ImageNet concepts ("looks like") when the model has
them. Entries without a version were fitted before, on the look of the training photos alone."""
CONCEPT_EPS = 1e-4
"""Floor added to a class's mean ImageNet probability before its log: a concept no training photo shows
costs log(1e-4) = -9.2 nats per unit of probability instead of minus infinity (the Lite heads are soft:
every photo puts some mass on every class). 1e-5 and 1e-3 measured within one raccoon of it."""
LOOKS_LIKE_TOP = 3
"""Most ImageNet concepts named in an answer's ``looks_like``."""
LOOKS_LIKE_MIN = 0.05
"""Concepts under this ImageNet probability are left out of ``looks_like`` (the first one always shows)."""
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
_FIT_CHUNK = 4096
"""Training rows per ImageNet-probability block while fitting concepts (4096 x 1000 float32 = 16 MB)."""


@dataclass
class Detector:
    """A fitted detector: its method, parameters (tensors) and the accept threshold on its score.

    With ImageNet heads in ``params`` (``imagenet_weight`` ``(m, 1000, 1280)``, ``imagenet_bias``
    ``(m, 1000)``) it also says which ImageNet concepts a photo looks like, whatever its method.
    """

    method: str
    params: dict[str, torch.Tensor]
    threshold: float = math.inf
    accept_rate: float = 1.0
    version: int = DETECTOR_VERSION
    _float_params: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    """float32 copies of float16 parameters per device (not saved: rebuilt from ``params``)."""

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
        if self.method == CONCEPTS:
            concept = self.concept_score(f)
            look = self._knn(f, leave_out)
            return 0.5 * (_percentile(self.params["val_concept"], concept)
                          + _percentile(self.params["val_look"], look))
        if self.method == "mahalanobis":
            z = f @ self.params["whiten"].to(f.device)
            return torch.cdist(z, self.params["means"].to(f.device)).square().min(dim=1).values
        if self.method == "knn":
            return self._knn(f, leave_out)
        if self.method == "energy":
            return -torch.logsumexp(_full_logits(logits.float()), dim=1)
        raise ValueError(f"unknown OOD method {self.method!r}; expected one of {OOD_METHODS}")

    def _knn(self, f: torch.Tensor, leave_out: torch.Tensor | None) -> torch.Tensor:
        """Cosine distance to the k-th nearest bank row (see :meth:`score` for ``leave_out``)."""
        bank = self._float("bank", f.device)
        sims = F.normalize(f, dim=1) @ bank.T
        k = min(KNN_K, bank.shape[0])
        if leave_out is None:
            return 1.0 - sims.topk(k, dim=1).values[:, -1]
        top = sims.topk(min(k + 1, bank.shape[0]), dim=1).values
        own = leave_out.to(f.device) & (top[:, 0] >= 1.0 - SELF_COSINE_GAP)
        rank = torch.where(own, min(k, top.shape[1] - 1), k - 1)
        return 1.0 - top.gather(1, rank[:, None]).squeeze(1)

    @torch.inference_mode()
    def concept_score(self, features: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (nats) of each photo's ImageNet distribution with its closest class's."""
        p = self.imagenet_probabilities(features)
        return -(p @ self.params["concept_logq"].to(p.device, torch.float32).T).max(dim=1).values

    def calibrate(self, val_features: torch.Tensor, val_logits: torch.Tensor, accept_rate: float) -> Detector:
        """Fit what comes from VALIDATION, then the threshold that accepts ``accept_rate`` of it.

        For ``concepts`` that is first the two component scores' reference distributions (sorted, for
        the percentiles the fused score averages); every method then takes its threshold as the
        ``accept_rate`` quantile of its own validation scores (:func:`calibrate_threshold`).
        """
        f = val_features.float()
        if self.method == CONCEPTS:
            self.params["val_concept"] = self.concept_score(f).sort().values.contiguous()
            self.params["val_look"] = self._knn(f, None).sort().values.contiguous()
        scores = self.score(f, val_logits).numpy() if len(f) else np.zeros(0)
        return calibrate_threshold(self, scores, accept_rate)

    @property
    def has_concepts(self) -> bool:
        """True when the detector holds the ImageNet heads (it can say what a photo looks like)."""
        return "imagenet_weight" in self.params

    @property
    def legacy(self) -> bool:
        """True for a detector fitted before version 2 (on the look of the training photos alone)."""
        return self.version < DETECTOR_VERSION

    @torch.inference_mode()
    def imagenet_probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """Return ``(n, 1000)`` ImageNet probabilities of pooled features (needs :attr:`has_concepts`)."""
        f = features.float()
        return imagenet_probabilities(f, self._float("imagenet_weight", f.device),
                                      self.params["imagenet_bias"].to(f.device, torch.float32))

    @torch.inference_mode()
    def looks_like(self, features: torch.Tensor, top: int = LOOKS_LIKE_TOP,
                   min_probability: float = LOOKS_LIKE_MIN) -> list[list[tuple[str, float]]]:
        """Return each image's nearest ImageNet concepts, ``[(name, probability), ...]``, most likely first.

        At most ``top`` of them, those under ``min_probability`` left out but the first; empty lists
        without ImageNet heads (a model trained from scratch knows no concepts, so it names none).
        """
        if not self.has_concepts:
            return [[] for _ in range(len(features))]
        names = imagenet_names()
        values, indices = self.imagenet_probabilities(features).topk(top, dim=1)
        return [[(names[i], float(p)) for k, (p, i) in enumerate(zip(pv.tolist(), iv.tolist(), strict=True))
                 if k == 0 or p >= min_probability] for pv, iv in zip(values, indices, strict=True)]

    def _float(self, name: str, device: torch.device) -> torch.Tensor:
        """A float16 parameter in float32 on ``device``, converted once per detector.

        Converting the float16 kNN bank (up to 4096 x 2560) at every call was a fixed cost of every served
        batch, paid again for a lone image (docs/engines.md, serving).
        """
        key = f"{name}@{device}"
        if key not in self._float_params:
            self._float_params[key] = self.params[name].to(device, torch.float32)
        return self._float_params[key]

    def known(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        """Return a bool mask: True where the score is within the accepted range."""
        return np.asarray(scores) <= self.threshold

    def to_state(self) -> dict[str, Any]:
        """The checkpoint entry: plain tensors, floats and strings."""
        params = {k: v.cpu().contiguous() for k, v in self.params.items()}
        return {"method": self.method, "params": params, "threshold": float(self.threshold),
                "accept_rate": float(self.accept_rate), "version": int(self.version)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Detector:
        """Rebuild a detector from its checkpoint entry (one without a version is a legacy detector)."""
        return cls(method=str(state["method"]), params=dict(state["params"]),
                   threshold=float(state["threshold"]), accept_rate=float(state["accept_rate"]),
                   version=int(state.get("version", 1)))


def resolve_method(requested: str, has_imagenet: bool) -> str:
    """The detector method to fit: ``auto`` means concepts for ImageNet models, else knn.

    Raises ValueError for ``concepts`` on a model without ImageNet heads (the caller names the flag).
    """
    if requested == AUTO:
        return CONCEPTS if has_imagenet else "knn"
    if requested == CONCEPTS and not has_imagenet:
        raise ValueError("the concepts detector needs a model with ImageNet weights")
    return requested


def concept_log_profile(imagenet_probs: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        eps: float = CONCEPT_EPS) -> torch.Tensor:
    """Return ``(C, 1000)``: per user class, the log of its training images' mean ImageNet distribution.

    Per class, so a small class keeps its own concepts however rare it is; a class without training
    rows gets the all-classes mean.
    """
    rows = []
    for c in range(num_classes):
        members = imagenet_probs[labels == c]
        rows.append((members if len(members) else imagenet_probs).double().mean(dim=0))
    return (torch.stack(rows) + eps).log().float()


def _knn_bank(features: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded sample of at most KNN_BANK_ROWS training rows, unit length, float16."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(features), generator=g)[:KNN_BANK_ROWS]
    return F.normalize(features[keep].float(), dim=1).half()


def _percentile(reference: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Share (0..1) of the sorted ``reference`` scores below each score: its validation percentile."""
    ref = reference.to(scores.device, torch.float32)
    if not len(ref):
        return torch.zeros_like(scores, dtype=torch.float32)
    return torch.searchsorted(ref, scores.float().contiguous()).float() / len(ref)


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
                 num_classes: int, seed: int = 0,
                 imagenet: tuple[torch.Tensor, torch.Tensor] | None = None) -> Detector:
    """Fit ``method`` on TRAINING features ``(n, d)`` and labels ``(n,)``; the threshold is set later.

    ``imagenet`` is the backbone's ImageNet heads (weight ``(m, 1000, 1280)``, bias ``(m, 1000)``,
    :func:`catsdogs.models.imagenet.imagenet_heads`): kept by every method, so answers can say what a
    photo looks like; the ``concepts`` method needs them.
    """
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    heads: dict[str, torch.Tensor] = {}
    if imagenet is not None:
        # float16 weights: half the checkpoint bytes (5 MB for Lite1 + Lite2); logits move by < 1e-2.
        heads = {"imagenet_weight": imagenet[0].half(), "imagenet_bias": imagenet[1].float()}
    if method == CONCEPTS:
        if not heads:
            raise ValueError("the concepts detector needs the model's ImageNet heads")
        det = Detector(method, heads)
        probs = torch.cat([det.imagenet_probabilities(chunk) for chunk in f.float().split(_FIT_CHUNK)])
        det.params["concept_logq"] = concept_log_profile(probs, y, num_classes)
        det.params["bank"] = _knn_bank(f, seed)
        return det
    if method == "mahalanobis":
        means = torch.stack([f[y == c].mean(0) if (y == c).any() else f.mean(0) for c in range(num_classes)])
        cov, _shrink = ledoit_wolf(f - means[y])
        evals, evecs = torch.linalg.eigh(cov)
        whiten = evecs / evals.clamp_min(_EPS).sqrt()  # x @ whiten: unit covariance
        return Detector(method, {"whiten": whiten.float(), "means": (means @ whiten).float(), **heads})
    if method == "knn":
        return Detector(method, {"bank": _knn_bank(f, seed), **heads})
    if method == "energy":
        return Detector(method, dict(heads))
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
    # Channels first, then a contiguous reduction: numpy's std across the pixel axis of NHWC (stride 3)
    # took 1.96 ms per real 260 px photo, this 0.29 ms (python -m benchmarks.probes pixels); evaluate
    # had spent 3.9 s of its 6.5 s there on 1,800 test photos (python -m cProfile -m catsdogs.cli evaluate).
    n, channels = len(images), images.shape[-1]
    x = np.ascontiguousarray(np.asarray(images).reshape(n, -1, channels).transpose(0, 2, 1), dtype=np.float32)
    return x.std(axis=2).max(axis=1).astype(np.float64)


def flat_images(images: np.ndarray) -> np.ndarray:
    """Return a bool mask of uint8 NHWC images that are flat (blank or one colour, see FLAT_STD)."""
    return pixel_spread(images) < FLAT_STD
