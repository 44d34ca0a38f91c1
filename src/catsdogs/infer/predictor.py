"""A loaded model that turns images into class probabilities; shared by evaluate, predict and serve.

It applies exactly the transforms used for training (:mod:`catsdogs.models.transforms`) with the resize
policy, size and normalisation recorded in the checkpoint, so every entry point agrees. It also applies
the run's recorded inference settings (:data:`catsdogs.checkpoint.CKPT_INFERENCE`: flip TTA, the
out-of-distribution detector, the temperature) unless the caller overrides them, so evaluate, predict
and serve give one answer.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from catsdogs import checkpoint as ckpt
from catsdogs.checkpoint import build_from_checkpoint, load_checkpoint
from catsdogs.devices import AUTO
from catsdogs.engines.base import Engine
from catsdogs.engines.eager import TorchEngine
from catsdogs.engines.names import MAX_DROP_PT, engine_for
from catsdogs.infer.engine import load_engine, recorded_engine
from catsdogs.models.effnet import fold_for_inference
from catsdogs.models.feature_model import FeatureModel
from catsdogs.models.heads import probabilities
from catsdogs.models.ood import MIN_SIDE, Detector, flat_images
from catsdogs.models.transforms import DEFAULT_MAX_PIXELS, hflip, load_image, normalize
from catsdogs.rundir import BEST_CKPT, resolve_checkpoint
from catsdogs.runtime import select_device

UNKNOWN = "unknown"
"""The label of an image the detector rejects: it looks like none of the trained classes."""


def format_looks_like(concepts: list[tuple[str, float]]) -> str:
    """One line for people: ``badger 41 %, lesser panda 12 %`` (empty when nothing is named)."""
    return ", ".join(f"{name} {100 * p:.0f} %" for name, p in concepts)


@dataclass
class Settings:
    """Inference settings: flip TTA, "unknown" for rejected images, temperature scaling."""

    tta: bool = False
    reject: bool = False
    calibrate: bool = False


def resolve_settings(state: dict[str, Any], tta: bool | None = None, reject: bool | None = None,
                     calibrate: bool | None = None) -> Settings:
    """The run's recorded settings (none recorded: all off, as before) with explicit values overriding."""
    recorded = state.get(ckpt.CKPT_INFERENCE, {})
    return Settings(tta=bool(recorded.get("tta", False)) if tta is None else tta,
                    reject=bool(recorded.get("reject", False)) if reject is None else reject,
                    calibrate=bool(recorded.get("calibrate", False)) if calibrate is None else calibrate)


@dataclass
class Answers:
    """What the predictor says about a batch: probabilities, OOD scores and which images are known."""

    probs: np.ndarray
    """``(n, C)`` float32 class probabilities (temperature-scaled when calibrating)."""
    scores: np.ndarray
    """``(n,)`` float32 OOD score (higher = less like training; NaN without a detector)."""
    known: np.ndarray
    """``(n,)`` bool: False where the image is answered "unknown"."""
    raw: np.ndarray | None = None
    """``(n, C)`` probabilities before temperature scaling (only when asked for, by evaluate)."""
    looks_like: list[list[tuple[str, float]]] = field(default_factory=list)
    """Per image, the ImageNet concepts it looks like, ``[(name, probability), ...]`` (run with ImageNet
    weights): for "unknown", its top concepts; for a class, strong concepts no class owns (often none);
    empty for flat images and runs without ImageNet weights."""

    def __len__(self) -> int:
        return len(self.probs)

    def __getitem__(self, k: int) -> Answer:
        return Answer(self.probs[k], float(self.scores[k]), bool(self.known[k]),
                      self.looks_like[k] if self.looks_like else [])

    def arrays(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        """The answers as named arrays, with the images' true ``labels``: evaluate's rows.

        The same whether a local pass or a Spark task computed them (``Predictions.from_parts``).
        """
        return {"probs": self.probs, "raw": self.raw if self.raw is not None else self.probs,
                "scores": self.scores, "known": self.known, "labels": np.asarray(labels, np.int64)}


@dataclass
class Answer:
    """One image's answer (a row of :class:`Answers`)."""

    probs: np.ndarray
    score: float
    known: bool
    looks_like: list[tuple[str, float]] = field(default_factory=list)
    """What the image looks like (ImageNet concepts and their probabilities), as in :class:`Answers`."""

    def label(self, classes: list[str]) -> str:
        """The predicted class, or ``unknown`` when rejected."""
        return classes[int(np.argmax(self.probs))] if self.known else UNKNOWN


@dataclass
class Predictor:
    """A model plus the metadata needed to feed it: classes, image size, resize policy, mean/std."""

    model: nn.Module
    classes: list[str]
    size: int
    resize: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    checkpoint: dict[str, Any]
    path: Path
    settings: Settings = field(default_factory=Settings)
    detector: Detector | None = None
    temperature: float = 1.0
    note: str = ""
    """Printed once on stderr at the first answer (not at load: a user error found after loading
    stays the only line), e.g. that the run has no detector."""
    engine: Engine | None = None
    """Runs ``model.features`` (``--backend``); None: built at first use by ``make_engine``."""
    make_engine: Callable[[], Engine] | None = None
    """Builds the ``--backend`` engine; None: torch eager on ``model``."""
    backend: str = ""
    """The engine ``--backend`` resolved to (``engines.names.engine_for``), before it is built."""

    @classmethod
    def from_run(cls, run: str | Path, device: torch.device | str = AUTO, name: str = BEST_CKPT,
                 tta: bool | None = None, reject: bool | None = None,
                 calibrate: bool | None = None, backend: str | None = None, threads: int | None = None,
                 int8_max_drop: float = MAX_DROP_PT, shards: str | None = None) -> Predictor:
        """Load the checkpoint of a run folder (or a .pt file) and rebuild its model.

        ``tta``, ``reject`` and ``calibrate`` override the run's recorded inference settings (None: the
        run's). A run without a detector gives every image a class, with a one-line note.
        ``backend`` names the engine of the feature pass (``engines.names.ENGINES``; None: the engine the
        run's answers were fitted on, ``infer.engine.recorded_engine``, as for the CLI); an int8 engine
        runs only behind its accuracy guard, checked on the validation split of ``shards`` (default:
        the shards the run was trained on) when none is recorded.
        """
        path = resolve_checkpoint(run, name)
        state = load_checkpoint(path)
        settings = resolve_settings(state, tta, reject, calibrate)
        detector = Detector.from_state(state[ckpt.CKPT_OOD]) if ckpt.CKPT_OOD in state else None
        note = ""
        if detector is None and reject is not False:
            note = (f"catsdogs: {path} has no out-of-distribution detector; every image gets a class, none "
                    f"is 'unknown'")
        settings.reject = settings.reject and detector is not None
        device = select_device(device) if isinstance(device, str) else device
        model = build_from_checkpoint(state)
        # Inference only: BatchNorm folded into the convolutions (same outputs, one op less per conv).
        model = fold_for_inference(model).to(device).to(memory_format=torch.channels_last)
        image = state[ckpt.CKPT_IMAGE]
        norm = state[ckpt.CKPT_NORM]
        # Keep only small metadata: the weights now live in the model.
        meta = {k: v for k, v in state.items() if k not in (ckpt.CKPT_MODEL_STATE, "optimizer",
                                                              "ema_state", "rng", "progress")}
        meta.pop(ckpt.CKPT_OOD, None)  # held by the detector
        size, mean, std = int(state[ckpt.CKPT_IMAGE]["size"]), tuple(norm["mean"]), tuple(norm["std"])
        # Built at the first answer, not here: a user error found after loading (a wrong --data, say)
        # stays the only line, before any export, calibration or validation check.
        backend = engine_for(backend, recorded_engine(state))
        make_engine = partial(load_engine, backend, model, size, mean, std, path, meta, device,
                              threads=threads, max_drop_pt=int8_max_drop, shards=shards,
                              accepts=None if detector is None else partial(_accepts, detector, model))
        return cls(model=model, classes=list(state[ckpt.CKPT_CLASSES]), size=int(image["size"]),
                   resize=str(image.get("resize", "stretch")), mean=tuple(norm["mean"]),
                   std=tuple(norm["std"]), device=device, checkpoint=meta, path=path, settings=settings,
                   detector=detector, temperature=float(state.get(ckpt.CKPT_TEMPERATURE, 1.0)), note=note,
                   make_engine=make_engine, backend=backend)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return logits and the features feeding the final layer (the engine runs the features)."""
        model: FeatureModel = self.model  # type: ignore[assignment]
        feats = self.feature_engine.features(x).to(self.device)
        return model.classify(feats), feats

    @property
    def feature_engine(self) -> Engine:
        """The engine of the feature pass, built on first use."""
        if self.engine is None:
            self.engine = self.make_engine() if self.make_engine else TorchEngine(self.model, self.device)
        return self.engine

    @torch.inference_mode()
    def answer(self, images: np.ndarray | torch.Tensor, tta: bool | None = None,
               temperature: float | None = None, with_raw: bool = False) -> Answers:
        """Answer a uint8 NHWC batch of already-resized images under the predictor's settings.

        ``tta`` overrides the flip setting, ``temperature`` the fitted one (1.0: raw probabilities);
        ``with_raw`` also returns the probabilities before temperature scaling. The OOD score is that
        of the unflipped image; flat (blank, one-colour) images are unknown.
        """
        if self.note:
            note, self.note = self.note, ""
            print(note, file=sys.stderr)
        tta = self.settings.tta if tta is None else tta
        t = (self.temperature if self.settings.calibrate else 1.0) if temperature is None else temperature
        arr = np.asarray(images)
        if not arr.flags.writeable:
            arr = arr.copy()  # torch wants writable memory (a decoded PIL image is read-only)
        n = arr.shape[0]
        if n == 0:
            c = len(self.classes)
            empty = np.zeros((0, c), np.float32)
            return Answers(empty, np.zeros(0, np.float32), np.zeros(0, bool), empty if with_raw else None)
        x = normalize(torch.as_tensor(arr), self.mean, self.std).to(self.device)
        logits, feats = self._forward(x)
        probs = probabilities(logits.float() / t)
        raw = probabilities(logits.float()) if with_raw else None
        if tta:
            flipped = self._forward(hflip(x))[0].float()
            probs = (probs + probabilities(flipped / t)) / 2
            raw = (raw + probabilities(flipped)) / 2 if raw is not None else None
        scores = np.full(n, np.nan, dtype=np.float32)
        known = np.ones(n, dtype=bool)
        det = self.detector
        # One ImageNet head pass serves both the score and "looks like" (no second forward).
        concepts = det.imagenet_probabilities(feats) if det is not None and det.has_concepts else None
        if det is not None:
            scores = det.score(feats, logits, imagenet=concepts).cpu().numpy().astype(np.float32)
            if self.settings.reject:
                known = det.known(scores)
        flat = flat_images(arr) if self.settings.reject else np.zeros(n, bool)
        known &= ~flat
        looks_like: list[list[tuple[str, float]]] = [[] for _ in range(n)]
        # A flat image shows nothing: naming the concept ImageNet's head guesses for it would mislead.
        named = np.nonzero(~flat)[0]
        if det is not None and concepts is not None and len(named):
            rows = torch.as_tensor(named)
            for i, said in zip(named, det.looks_like(feats[rows], known[named], imagenet=concepts[rows]),
                               strict=True):
                looks_like[i] = said
        return Answers(probs.cpu().numpy().astype(np.float32), scores, known,
                       None if raw is None else raw.cpu().numpy().astype(np.float32), looks_like)

    def predict_arrays(self, images: np.ndarray | torch.Tensor, tta: bool | None = None) -> np.ndarray:
        """Return probabilities ``(n, C)`` for a uint8 NHWC batch of already-resized images."""
        return self.answer(images, tta=tta).probs

    def decode(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Decode and resize image bytes the way training data was; raises ImageDecodeError.

        With rejection on, an image under MIN_SIDE pixels a side is decoded as its mean colour: it holds
        no recognisable subject, and the flat-image rule then answers it "unknown".
        """
        arr = load_image(data, self.size, self.resize, max_pixels)
        if self.settings.reject and min(_image_size(data)) < MIN_SIDE:
            return np.broadcast_to(arr.mean(axis=(0, 1)).astype(np.uint8), arr.shape).copy()
        return arr

    def describe(self) -> dict[str, Any]:
        """Return JSON-ready model facts (name, classes, size, epoch, metrics) for APIs and reports."""
        mc = self.checkpoint.get(ckpt.CKPT_MODEL_CONFIG, {})
        return {
            "name": mc.get("name"),
            "classes": self.classes,
            "size": self.size,
            "resize": self.resize,
            "checkpoint": str(self.path),
            "epoch": self.checkpoint.get(ckpt.CKPT_EPOCH),
            "metrics": self.checkpoint.get(ckpt.CKPT_METRICS, {}),
            "engine": self.feature_engine.describe(),
            "inference": {"tta": self.settings.tta, "reject": self.settings.reject,
                          "calibrate": self.settings.calibrate, "temperature": self.temperature,
                          "detector": self.detector.method if self.detector is not None else None,
                          "looks_like": bool(self.detector is not None and self.detector.has_concepts)},
        }


@torch.inference_mode()
def _accepts(detector: Detector, model: nn.Module, features: np.ndarray) -> np.ndarray:
    """The images of ``features`` the detector answers with a class (for the int8 guard)."""
    net: Any = model
    f = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    return detector.known(detector.score(f, net.classify(f)).numpy())


def _image_size(data: bytes) -> tuple[int, int]:
    """Width and height from the image header (the pixels were already decoded once)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.size
