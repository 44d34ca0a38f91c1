"""Out-of-distribution detection: is an image like the training photos at all ("neither class")?

A detector is fitted at training time from the TRAINING split only, in the model's own feature
space (the input of its final linear layer, ``model.features(x)``), so it works for whatever classes
a run was trained on. Its threshold is then set on the VALIDATION split so that a chosen share of
validation images is accepted (:func:`calibrate_threshold`). Higher scores mean "less like training".

Methods (values of ``train --ood-method``), compared on real data in docs/models.md:

* ``concepts``: what the photo shows, and how it looks. The backbone's own ImageNet-1k head
  (:mod:`catsdogs.models.imagenet`, on the same pooled features) gives the photo's ImageNet
  distribution ``p``. Each user class owns the smallest WordNet node under which most of its TRAINING
  photos' top-1 concepts fall (:func:`catsdogs.models.taxonomy.owned_node`: "dog" for PetImages' dogs,
  "domestic cat" for its cats), so a concept every photo shares (the breeds) is owned and one a few
  photos show as background (sofas, laptops) is not. Three questions, each a score:

  - "what is it": ``-log`` of the photo's mass under the owned nodes (a printer has none);
  - "is it another of their kind": ``-log`` of the owned share of the mass of the owned nodes' kind
    (:func:`catsdogs.models.taxonomy.kin_mask`, every other ImageNet animal for cats and dogs). A caged
    cat's stray mass goes to "cage", a raccoon's to "badger" and "polecat": only the raccoon leans to
    kin, so this asks what the first question cannot when the heads are unsure (a raccoon can keep as
    much owned mass as a caged pet);
  - "does it look like training": the ``knn`` score.

  Each is turned into a conformal p-value against VALIDATION (the share of validation photos scoring
  at least as high), and they are combined by Fisher's rule (the sum of ``-log p``): a photo is
  answered only when together they are not extreme, so a printer is "neither" however much it looks
  like a PetImages photo, and another person's pug (owned mass, an unfamiliar look) is answered. The
  rule, the kin question, its share and its k (:data:`CONCEPTS_KNN_K`) were chosen on a held-out-class
  test on TRAIN/VALIDATION (fit on one class, reject the other's validation photos; also with the
  ImageNet heads blind to the held-out class, as they are to a raccoon), measured in docs/models.md. A
  detector fitted before the kin question (no ``kin`` parameter) asks the other two, as it did. Needs
  ImageNet weights (EfficientNet-Lite models).
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

from catsdogs.models.imagenet import NUM_CLASSES, imagenet_names, imagenet_probabilities
from catsdogs.models.ood_names import AUTO, CONCEPTS, OOD_CHOICES, OOD_METHODS  # noqa: F401 - re-exported
from catsdogs.models.taxonomy import kin_mask, node_mask, owned_node
from catsdogs.shards.feature_shards import StreamedFeatures, chunks_of, take_rows

OWN_SHARE = 0.8
"""Share of a class's training photos whose top-1 ImageNet concept must lie under the node it owns:
"most" of them, so a class owns its whole family (PetImages' dogs own "dog", its cats "domestic cat";
``python -m benchmarks.open_world`` prints each node and its share) rather than the largest branch of
it (at one half, a branch such as "hunting dog" would do, and leave pugs and chihuahuas out)."""
LOOKS_LIKE_TOP = 3
"""Most ImageNet concepts named in an answer's ``looks_like``."""
LOOKS_LIKE_MIN = 0.05
"""Concepts under this ImageNet probability are left out of an unknown answer's ``looks_like`` (the first
one always shows)."""
LOOKS_LIKE_STRONG = 0.25
"""A Cat/Dog answer names a concept its classes do not own only from this ImageNet probability up
("Cat 67 %, looks like: hamster 61 %"): the Lite ensemble's heads are soft, so a lower bound would name
a background object for many ordinary pet photos (``python -m benchmarks.open_world`` prints the share
of validation photos it names one for)."""
KNN_K = 10
"""Neighbour rank of the ``knn`` method's score (k=10: less noisy than k=1, still local), and of every
detector saved before the rank was recorded with it."""
CONCEPTS_KNN_K = 3
"""Neighbour rank of the ``concepts`` method's look: with the kin question beside it, k=3 rejected the most
of the held-out class at the default accept rate on TRAIN/VALIDATION (k in 1, 3, 5, 10, 20; both test
kinds, Lite0 and Lite1+Lite2, ``python -m benchmarks.open_world``)."""
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
_TINY = 1e-12
"""Added to an owned mass before its log: no real photo's mass is 0 in float64, but a test head's may be."""
VAL_WHAT, VAL_LOOK, VAL_KIN = "val_what", "val_look", "val_kin"
"""The concepts method's sorted VALIDATION scores of each question (detector parameters)."""
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
    owned_nodes: tuple[str, ...] = ()
    """Per user class, the WordNet synset of the ImageNet concepts it owns (with ImageNet heads)."""
    knn_k: int = KNN_K
    """Neighbour rank of the kNN look (``knn`` and ``concepts``)."""
    _float_params: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    """float32 copies of float16 parameters per device (not saved: rebuilt from ``params``)."""

    @torch.inference_mode()
    def score(self, features: torch.Tensor, logits: torch.Tensor, leave_out: torch.Tensor | None = None,
              imagenet: torch.Tensor | None = None) -> torch.Tensor:
        """Return the ``(n,)`` OOD score of a batch (higher = less like the training images).

        ``leave_out`` (bool ``(n,)``, knn only) marks rows that may be in the kNN bank themselves (training
        images): for those, a bank row within :data:`SELF_COSINE_GAP` of the query is taken to be the
        image itself and skipped, so the score is out of sample. The other methods ignore it: one image
        moves a class mean over thousands of training rows negligibly. ``imagenet`` is the batch's
        :meth:`imagenet_probabilities` when the caller has them already (no second head pass).
        """
        f = features.float()
        if self.method == CONCEPTS:
            p = self.imagenet_probabilities(f) if imagenet is None else imagenet
            return sum((surprise(self.params[ref], x) for ref, x in self._concept_parts(f, p, leave_out)),
                       torch.zeros(len(f), device=f.device))
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
        k = min(self.knn_k, bank.shape[0])
        if leave_out is None:
            return 1.0 - sims.topk(k, dim=1).values[:, -1]
        top = sims.topk(min(k + 1, bank.shape[0]), dim=1).values
        own = leave_out.to(f.device) & (top[:, 0] >= 1.0 - SELF_COSINE_GAP)
        rank = torch.where(own, min(k, top.shape[1] - 1), k - 1)
        return 1.0 - top.gather(1, rank[:, None]).squeeze(1)

    def _concept_parts(self, f: torch.Tensor, p: torch.Tensor, leave_out: torch.Tensor | None
                       ) -> list[tuple[str, torch.Tensor]]:
        """The concepts method's component scores, each with the name of its VALIDATION reference."""
        what, kin = self._what_and_kin(p)
        parts = [(VAL_WHAT, what), (VAL_LOOK, self._knn(f, leave_out))]
        if kin is not None:  # fitted with the kin question (absent: a detector from before it)
            parts.append((VAL_KIN, kin))
        return parts

    def _what_and_kin(self, imagenet: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`what_score` and :meth:`kin_score` from one pass over the owned mass.

        The kin score is None for a detector fitted without the kin question.
        """
        p = imagenet.double()
        owned = p[:, self.owned_any()].sum(dim=1) + _TINY
        what = -owned.log().float()
        if "kin" not in self.params:
            return what, None
        return what, ((owned + p[:, self.params["kin"]].sum(dim=1)) / owned).log().float()

    def kin_score(self, imagenet: torch.Tensor) -> torch.Tensor:
        """``-log`` of the owned share of the owned-and-kin mass (nats; 0 = nothing of its kind but its own).

        ``log((owned + kin) / owned)``: high when the photo's mass leans to a concept of its classes' kind
        that none of them owns (a badger, a hamster), whatever else the photo holds.
        """
        kin = self._what_and_kin(imagenet)[1]
        if kin is None:
            raise ValueError("this detector was fitted without the kin question")
        return kin

    def what_score(self, imagenet: torch.Tensor) -> torch.Tensor:
        """``-log`` of each photo's ImageNet mass under the nodes its classes own (nats; 0 = all owned)."""
        return self._what_and_kin(imagenet)[0]

    def owned_any(self) -> torch.Tensor:
        """Bool ``(1000,)``: the ImageNet classes any user class owns (all False when none are recorded)."""
        owned = self.params.get("owned")
        return owned.any(dim=0) if owned is not None else torch.zeros(NUM_CLASSES, dtype=torch.bool)

    def calibrate(self, val_features: torch.Tensor, val_logits: torch.Tensor, accept_rate: float) -> Detector:
        """Fit what comes from VALIDATION, then the threshold that accepts ``accept_rate`` of it.

        For ``concepts`` that is first the component scores' reference distributions (sorted, for their
        conformal p-values); every method then takes its threshold as the
        ``accept_rate`` quantile of its own validation scores (:func:`calibrate_threshold`).
        """
        f = val_features.float()
        if self.method == CONCEPTS and len(f):
            parts = self._concept_parts(f, self.imagenet_probabilities(f), None)
            for ref, x in parts:
                self.params[ref] = x.sort().values.contiguous()
            scores = sum((surprise(self.params[ref], x, own=True) for ref, x in parts),
                         torch.zeros(len(f), device=f.device))
            return calibrate_threshold(self, scores.cpu().numpy(), accept_rate)
        scores = self.score(f, val_logits).numpy() if len(f) else np.zeros(0)
        return calibrate_threshold(self, scores, accept_rate)

    @property
    def has_concepts(self) -> bool:
        """True when the detector holds the ImageNet heads (it can say what a photo looks like)."""
        return "imagenet_weight" in self.params

    @torch.inference_mode()
    def imagenet_probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """Return ``(n, 1000)`` ImageNet probabilities of pooled features (needs :attr:`has_concepts`)."""
        f = features.float()
        return imagenet_probabilities(f, self._float("imagenet_weight", f.device),
                                      self.params["imagenet_bias"].to(f.device, torch.float32))

    @torch.inference_mode()
    def looks_like(self, features: torch.Tensor, known: np.ndarray | None = None,
                   imagenet: torch.Tensor | None = None) -> list[list[tuple[str, float]]]:
        """Return what each image looks like, ``[(ImageNet concept, probability), ...]``, most likely first.

        For an unknown image (``known`` False, or not given): its top :data:`LOOKS_LIKE_TOP` concepts, those
        under :data:`LOOKS_LIKE_MIN` left out but the first. For an answered one: the concepts its classes
        do not own from :data:`LOOKS_LIKE_STRONG` up ("Cat, looks like: hamster 61 %"), often none. Empty
        lists without ImageNet heads (a model trained from scratch knows no concepts, so it names none).
        ``imagenet`` is the batch's :meth:`imagenet_probabilities` when the caller has them already.
        """
        n = len(features)
        if not self.has_concepts:
            return [[] for _ in range(n)]
        names = imagenet_names()
        p = self.imagenet_probabilities(features) if imagenet is None else imagenet
        answered = np.zeros(n, bool) if known is None else np.asarray(known, bool)
        # Without owned nodes recorded nothing is known to be foreign.
        foreign = p.masked_fill(self.owned_any().to(p.device), 0.0) if "owned" in self.params \
            else torch.zeros_like(p)
        out: list[list[tuple[str, float]]] = []
        for k in range(n):
            source, floor = (foreign[k], LOOKS_LIKE_STRONG) if answered[k] else (p[k], LOOKS_LIKE_MIN)
            values, indices = source.topk(LOOKS_LIKE_TOP)
            out.append([(names[i], float(v)) for r, (v, i) in enumerate(zip(values.tolist(), indices.tolist(),
                                                                             strict=True))
                        if v >= floor or (r == 0 and not answered[k])])
        return out

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
                "accept_rate": float(self.accept_rate), "owned_nodes": list(self.owned_nodes),
                "knn_k": int(self.knn_k)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Detector:
        """Rebuild a detector from its checkpoint entry."""
        return cls(method=str(state["method"]), params=dict(state["params"]),
                   threshold=float(state["threshold"]), accept_rate=float(state["accept_rate"]),
                   owned_nodes=tuple(state.get("owned_nodes", ())), knn_k=int(state.get("knn_k", KNN_K)))


def resolve_method(requested: str, has_imagenet: bool) -> str:
    """The detector method to fit: ``auto`` means concepts for ImageNet models, else knn.

    Raises ValueError for ``concepts`` on a model without ImageNet heads (the caller names the flag).
    """
    if requested == AUTO:
        return CONCEPTS if has_imagenet else "knn"
    if requested == CONCEPTS and not has_imagenet:
        raise ValueError("the concepts detector needs a model with ImageNet weights")
    return requested


def owned_concepts(top1: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   share: float = OWN_SHARE) -> tuple[tuple[str, ...], torch.Tensor]:
    """Per user class, the WordNet node it owns and the ``(C, 1000)`` bool mask of ImageNet classes under it.

    Learnt from TRAINING photos only: the smallest node under which ``share`` of a class's photos' top-1
    concepts fall (:func:`catsdogs.models.taxonomy.owned_node`). A class without training rows owns
    what all rows together own. ``top1`` is each training photo's most likely ImageNet class.
    """
    nodes = []
    for c in range(num_classes):
        members = top1[labels == c]
        nodes.append(owned_node(members if len(members) else top1, share))
    return tuple(nodes), torch.stack([node_mask(n) for n in nodes])


def _knn_bank(features: np.ndarray | StreamedFeatures, seed: int) -> torch.Tensor:
    """A seeded sample of at most KNN_BANK_ROWS training rows, unit length, float16 (one pass if streamed)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(features), generator=g)[:KNN_BANK_ROWS]
    return F.normalize(torch.from_numpy(take_rows(features, keep.numpy())), dim=1).half()


def surprise(reference: torch.Tensor, scores: torch.Tensor, own: bool = False) -> torch.Tensor:
    """``-log`` of each score's conformal p-value against the sorted VALIDATION ``reference`` scores.

    The p-value is ``(1 + #reference >= score) / (n + 1)``: 1 for a score below every validation photo's,
    ``1 / (n + 1)`` above all of them (7.5 nats at n = 1,800), so no score is infinitely surprising.
    ``own``: the scores are the reference's own rows, each left out of its own count (leave-one-out), so
    the threshold set on them holds for photos the reference has never seen.
    """
    ref = reference.to(scores.device, torch.float32)
    at_least = len(ref) - torch.searchsorted(ref, scores.float().contiguous())
    if own:
        return -(at_least.float().clamp_min(1.0) / len(ref)).log()
    return -((1.0 + at_least.float()) / (len(ref) + 1.0)).log()


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


def fit_detector(method: str, features: np.ndarray | StreamedFeatures, labels: np.ndarray | torch.Tensor,
                 num_classes: int, seed: int = 0,
                 imagenet: tuple[torch.Tensor, torch.Tensor] | None = None) -> Detector:
    """Fit ``method`` on TRAINING features ``(n, d)`` and labels ``(n,)``; the threshold is set later.

    ``imagenet`` is the backbone's ImageNet heads (weight ``(m, 1000, 1280)``, bias ``(m, 1000)``,
    :func:`catsdogs.models.imagenet.imagenet_heads`): kept by every method, so answers can say what a
    photo looks like; the ``concepts`` method needs them. Streamed features are read by passes (one
    for the owned concepts, one for the kNN sample); ``mahalanobis`` alone holds them all (a covariance
    of every row).
    """
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    heads: dict[str, torch.Tensor] = {}
    if imagenet is not None:
        # float16 weights: half the checkpoint bytes (5 MB for Lite1 + Lite2); logits move by < 1e-2.
        heads = {"imagenet_weight": imagenet[0].half(), "imagenet_bias": imagenet[1].float()}
    nodes: tuple[str, ...] = ()
    if heads:
        reader = Detector(method, heads)
        top1 = torch.cat([reader.imagenet_probabilities(torch.from_numpy(chunk)).argmax(dim=1)
                          for chunk in chunks_of(features, _FIT_CHUNK)])
        nodes, heads["owned"] = owned_concepts(top1, y, num_classes)
    if method == CONCEPTS:
        if not heads:
            raise ValueError("the concepts detector needs the model's ImageNet heads")
        return Detector(method, {**heads, "kin": kin_mask(nodes), "bank": _knn_bank(features, seed)},
                        owned_nodes=nodes, knn_k=CONCEPTS_KNN_K)
    if method == "mahalanobis":
        f = torch.from_numpy(np.concatenate(list(chunks_of(features)))).double()
        means = torch.stack([f[y == c].mean(0) if (y == c).any() else f.mean(0) for c in range(num_classes)])
        cov, _shrink = ledoit_wolf(f - means[y])
        evals, evecs = torch.linalg.eigh(cov)
        whiten = evecs / evals.clamp_min(_EPS).sqrt()  # x @ whiten: unit covariance
        return Detector(method, {"whiten": whiten.float(), "means": (means @ whiten).float(), **heads},
                        owned_nodes=nodes)
    if method == "knn":
        return Detector(method, {"bank": _knn_bank(features, seed), **heads}, owned_nodes=nodes)
    if method == "energy":
        return Detector(method, dict(heads), owned_nodes=nodes)
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
