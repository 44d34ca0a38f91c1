"""The Python API: load a trained run, ask it about photos, see why it answered.

::

    import catsdogs

    model = catsdogs.load("runs/quick")            # a run folder, a .pt file, models:/NAME/1, runs:/ID/model
    p = model.predict("cat.jpg")                    # a path, bytes, a PIL image or an HxWx3 uint8 array
    p.label, p.probability, p.probabilities, p.ood_score   # label "unknown": like none of the classes
    many = model.predict(["a.jpg", b"...", pil_image])     # a list in, a list out
    why = model.explain("cat.jpg")                  # Grad-CAM heatmap on the photo, and its overlay

The answers are the :class:`~catsdogs.infer.prediction.Prediction` objects ``catsdogs predict`` writes
and ``catsdogs serve`` returns, made by the same predictor under the same settings
(:class:`catsdogs.config.InferenceConfig`: the run's recorded TTA, "unknown" and temperature, and its
engine, unless a keyword of :func:`load` overrides them).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from catsdogs.config import InferenceConfig, PredictConfig, build_config
from catsdogs.errors import ImageDecodeError, InputError
from catsdogs.infer.explain import Explainer, overlay, to_original
from catsdogs.infer.load import load_predictor
from catsdogs.infer.predict import Item, NamedImage, expand_paths, name_of, predict_files, read_item
from catsdogs.infer.prediction import Prediction
from catsdogs.infer.predictor import Predictor
from catsdogs.models.transforms import DEFAULT_MAX_PIXELS, load_rgb
from catsdogs.runtime import cores

Input = str | Path | bytes | Image.Image | np.ndarray
"""One image: a file (or a folder / glob pattern of them, as for ``catsdogs predict``), its encoded
bytes, a PIL image, or a uint8 ``(H, W, 3)`` RGB / ``(H, W)`` grey array."""
PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})
"""PIL modes PNG stores as they are (others, such as CMYK, become RGB first)."""
BATCH: int = PredictConfig.batch_size
"""Images per forward pass: ``catsdogs predict --batch-size``'s default."""


def load(source: str | Path, *, tracking_uri: str | None = None, **settings: Any) -> Model:
    """Load a trained model.

    Args:
        source: a run folder (or a .pt checkpoint in one), or an MLflow model URI (``models:/NAME/1``,
            ``models:/NAME@ALIAS``, ``runs:/RUN_ID/model``; downloaded once into the cache folder).
        tracking_uri: the MLflow server of a models:/ or runs:/ source (default: $MLFLOW_TRACKING_URI).
        **settings: inference settings, as the flags of ``catsdogs predict`` (``tta``, ``reject``,
            ``calibrate``, ``backend``, ``int8_max_drop``, ``device``, ``threads``); unset ones are the
            run's recorded ones.

    Raises:
        catsdogs.errors.CatsdogsError: a bad source or setting, in one line naming it.
    """
    cfg = build_config(InferenceConfig, settings)
    return Model(load_predictor(source, cfg, tracking_uri=tracking_uri), str(source))


@dataclass
class Explanation:
    """Why the model answered as it did for one input: a Grad-CAM heatmap over the photo."""

    path: str
    """The input, named as in its :class:`Prediction`."""
    label: str = ""
    """The class explained (the most likely one unless asked otherwise)."""
    heatmap: np.ndarray | None = None
    """``(H, W)`` float32 in [0, 1] at the photo's own size: where the evidence for ``label`` lies."""
    overlay: np.ndarray | None = None
    """``(H, W, 3)`` uint8: the photo with the heatmap blended over it."""
    error: str = ""
    """Why the input could not be explained (it could not be decoded); empty when it was."""


class Model:
    """A trained run, ready to answer: what :func:`load` returns."""

    def __init__(self, predictor: Predictor, source: str) -> None:
        self.predictor = predictor
        self.source = source
        self._explainer: Explainer | None = None

    def __repr__(self) -> str:
        return f"catsdogs.Model({self.source!r}, classes={self.classes}, size={self.size})"

    @property
    def classes(self) -> list[str]:
        """The class names, in the order of every answer's probabilities."""
        return list(self.predictor.classes)

    @property
    def size(self) -> int:
        """The side in pixels every image is resized to (with the run's resize policy)."""
        return self.predictor.size

    @property
    def engine(self) -> str:
        """The engine that runs the forward pass (built on first use; int8 only behind its guard)."""
        return self.predictor.feature_engine.name

    def describe(self) -> dict[str, Any]:
        """The model's facts: name, classes, size, epoch, metrics, engine and inference settings."""
        return self.predictor.describe()

    def predict(self, images: Input | Sequence[Input], *, batch_size: int = BATCH,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Prediction | list[Prediction]:
        """Classify one image, or each of a list (a folder or glob pattern is a list of its images).

        Returns one :class:`Prediction` per image (a list for a list, a folder or a pattern), as
        ``catsdogs predict`` makes it: ``label`` is a class or ``unknown``; an image that cannot be
        decoded gets an ``error`` instead of raising.
        """
        items, many = self._items(images)
        rows = predict_files(self.predictor, items, batch_size=batch_size, max_pixels=max_pixels,
                             workers=min(4, cores()), progress=False)
        return rows if many else rows[0]

    def explain(self, images: Input | Sequence[Input], *, label: str | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Explanation | list[Explanation]:
        """Explain the answer for one image, or each of a list: where in the photo its evidence lies.

        ``label`` picks the class to explain (default: each image's most likely class).
        """
        if label is not None and label not in self.classes:
            raise InputError(f"label {label!r} is not a class of this model ({', '.join(self.classes)})")
        if self._explainer is None:
            self._explainer = Explainer(self.predictor)
        items, many = self._items(images)
        out = [self._explain_one(item, label, max_pixels) for item in items]
        return out if many else out[0]

    def _explain_one(self, item: Item, label: str | None, max_pixels: int) -> Explanation:
        name = name_of(item)
        data = read_item(item)
        try:
            if isinstance(data, str):
                raise ImageDecodeError(data, data)
            image = self.predictor.decode(data, max_pixels)
            photo = load_rgb(data, max_pixels)
        except ImageDecodeError as exc:
            return Explanation(path=name, error=exc.reason)
        target = None if label is None else np.array([self.classes.index(label)])
        assert self._explainer is not None  # nosec B101 # type narrowing: set by explain()
        found = self._explainer.explain_arrays(image[None], target)[0]
        heat = to_original(found.heatmap, self.predictor.resize, photo.shape[0], photo.shape[1])
        return Explanation(path=name, label=self.classes[found.target], heatmap=heat,
                           overlay=overlay(photo, heat))

    def _items(self, images: Input | Sequence[Input]) -> tuple[list[Item], bool]:
        """The inputs as files and named encoded images; whether several were asked for."""
        if isinstance(images, list | tuple):
            return [item for k, image in enumerate(images) for item in _as_items(image, k)], True
        if isinstance(images, np.ndarray) and images.ndim == 4:  # a batch of images
            return [_encoded(f"<array {k}>", Image.fromarray(a)) for k, a in enumerate(images)], True
        return _as_items(images, 0), isinstance(images, str | Path) and not Path(images).is_file()


def _as_items(image: Input, k: int) -> list[Item]:
    """One input as predict's items: files (a folder or pattern expands), or a named encoded image."""
    if isinstance(image, str | Path):
        return list(expand_paths([str(image)]))
    if isinstance(image, bytes | bytearray | memoryview):
        return [NamedImage(f"<bytes {k}>", content=bytes(image))]
    if isinstance(image, Image.Image):
        return [_encoded(f"<image {k}>", image)]
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise InputError(f"image {k}: expected a uint8 (H, W, 3) or (H, W) array, got {image.dtype} "
                             f"{image.shape}")
        return [_encoded(f"<array {k}>", Image.fromarray(image))]
    raise InputError(f"image {k}: expected a path, bytes, a PIL image or a uint8 array, got "
                     f"{type(image).__name__}")


def _encoded(name: str, image: Image.Image) -> NamedImage:
    """A PIL image as lossless PNG bytes (its EXIF orientation kept), decoded then exactly like a file."""
    buf = io.BytesIO()
    if image.mode not in PNG_MODES:
        image = image.convert("RGB")
    exif = image.getexif()
    image.save(buf, format="PNG", compress_level=1, **({"exif": exif} if exif else {}))
    return NamedImage(name, content=buf.getvalue())
