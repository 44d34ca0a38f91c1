"""catsdogs' model as an MLflow pyfunc: image bytes in, class probabilities out.

It applies catsdogs' own preprocessing through :class:`catsdogs.infer.predictor.Predictor` (decode with
the checkpoint's size, resize policy and normalisation, then the forward pass), so loading the model
by URI (``mlflow.pyfunc.load_model("models:/NAME/1")``) or serving it (``mlflow models serve -m
models:/NAME/1 --env-manager local``) classifies raw JPEG/PNG bytes exactly like ``catsdogs predict``.

Input: a DataFrame with an ``image`` column of bytes (over HTTP: base64 strings, which the signature's
``binary`` type tells MLflow's scoring server to decode). Output: one row per image with ``label`` (a
class or ``unknown``, as ``catsdogs predict`` answers), ``probability``, one ``p_<class>`` column per
class, ``looks_like`` (what an unknown image looks like) and ``error`` (the reason an image could not
be decoded; its other columns are then empty).

The model is saved as MLflow "model from code" (:mod:`catsdogs.track._pyfunc_entry`), not a pickle:
loading it runs catsdogs' code from the installed package, never unpickles an object. The
catsdogs package must therefore be importable where the model is loaded (``--env-manager local``).

Imports mlflow and torch at the top: only :mod:`catsdogs.track.mlflow_run` (tracking on) and loading a
model import this module.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema

from catsdogs import checkpoint as ckpt
from catsdogs import schema
from catsdogs.checkpoint import load_checkpoint
from catsdogs.errors import ImageDecodeError
from catsdogs.infer.predictor import Predictor, format_looks_like

IMAGE_COLUMN = "image"
"""Input column holding each image's encoded bytes."""
CHECKPOINT_ARTIFACT = "checkpoint"
CONFIG_ARTIFACT = "config"
"""Artifact keys: the run's checkpoint and config.json, copied into the model's ``artifacts/`` folder
under their own names, so that folder is an ordinary run folder (see :mod:`catsdogs.track.registry`)."""
PREDICT_BATCH = 64
"""Images per forward pass, as ``catsdogs predict --batch-size`` defaults to."""
REQUIREMENTS: tuple[str, ...] = ("torch", "numpy", "pillow", "pandas", "mlflow-skinny")
"""Packages the model needs besides catsdogs itself, pinned at save time to the versions installed."""
ENTRY = Path(__file__).with_name("_pyfunc_entry.py")
"""The model-from-code file MLflow copies into the model and runs to build it."""


class CatsdogsModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper around a :class:`Predictor` loaded from the model's checkpoint artifact."""

    predictor: Predictor

    def load_context(self, context: Any) -> None:
        # The run's detector, temperature and inference settings, as predict and serve load it.
        self.predictor = Predictor.from_run(Path(context.artifacts[CHECKPOINT_ARTIFACT]), "cpu")

    # pd.DataFrame is the one hint MLflow passes through untouched (no schema inferred from it): the
    # signature saved with the model states the contract.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        return classify(self.predictor, images_of(model_input))


def images_of(model_input: Any) -> list[Any]:
    """Return the encoded images of a DataFrame (``image`` column), a Series, or a list."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise ValueError(f"expected a column {IMAGE_COLUMN!r} of image bytes, got "
                             f"{list(model_input.columns)}")
        return list(model_input[IMAGE_COLUMN])
    if isinstance(model_input, pd.Series | list | tuple):
        return list(model_input)
    raise ValueError(f"expected a DataFrame with an {IMAGE_COLUMN!r} column, "
                     f"got {type(model_input).__name__}")


def _as_bytes(value: Any) -> bytes:
    """Raw bytes of one input: bytes as is, a str as base64 (JSON cannot carry bytes)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ImageDecodeError("not_base64", "a str input must be base64 of the image file") from None
    raise ImageDecodeError("not_bytes", f"expected image bytes, got {type(value).__name__}")


def classify(predictor: Predictor, images: Sequence[Any]) -> pd.DataFrame:
    """Decode, resize and answer encoded images exactly as ``catsdogs predict`` does (``unknown`` included).

    One output row per input; failures carry ``error``. ``looks_like`` names, for an unknown image, the
    ImageNet concepts it looks like (empty otherwise, and for runs trained without ImageNet weights).
    """
    classes = predictor.classes
    arrays: list[np.ndarray] = []
    ok: list[int] = []
    errors = [""] * len(images)
    for i, value in enumerate(images):
        try:
            arrays.append(predictor.decode(_as_bytes(value)))
            ok.append(i)
        except ImageDecodeError as exc:
            errors[i] = exc.reason
    probs = np.full((len(images), len(classes)), np.nan, dtype=np.float64)
    labels = [""] * len(images)
    looks_like = [""] * len(images)
    for start in range(0, len(arrays), PREDICT_BATCH):
        answers = predictor.answer(np.stack(arrays[start:start + PREDICT_BATCH]))
        for k, i in enumerate(ok[start:start + PREDICT_BATCH]):
            probs[i] = answers.probs[k]
            labels[i] = answers[k].label(classes)
            looks_like[i] = format_looks_like(answers[k].looks_like)
    best = np.nan_to_num(probs, nan=-1.0).argmax(axis=1)
    out = pd.DataFrame({"label": labels, "probability": [probs[i, k] for i, k in enumerate(best)]})
    for k, name in enumerate(classes):
        out[f"p_{name}"] = probs[:, k]
    out["looks_like"] = looks_like
    out["error"] = errors
    return out


def signature(classes: Sequence[str]) -> ModelSignature:
    """The model's input/output schema; ``binary`` makes the scoring server base64-decode the input."""
    outputs = [ColSpec("string", "label"), ColSpec("double", "probability"),
               *(ColSpec("double", f"p_{c}") for c in classes), ColSpec("string", "looks_like"),
               ColSpec("string", "error")]
    return ModelSignature(inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]), outputs=Schema(outputs))


def requirements() -> list[str]:
    """Pinned requirements of the model (the installed versions)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def save_pyfunc(run_folder: Path, checkpoint: Path, dest: Path) -> Path:
    """Save the run's model as an MLflow pyfunc folder at ``dest``; return it."""
    classes = list(load_checkpoint(checkpoint)[ckpt.CKPT_CLASSES])
    artifacts = {CHECKPOINT_ARTIFACT: str(checkpoint)}
    config = run_folder / schema.CONFIG_NAME
    if config.is_file():
        artifacts[CONFIG_ARTIFACT] = str(config)
    with warnings.catch_warnings():
        # "no input example" and similar advice: the signature above states the contract.
        warnings.simplefilter("ignore", UserWarning)
        mlflow.pyfunc.save_model(str(dest), python_model=str(ENTRY), artifacts=artifacts,
                                 signature=signature(classes), pip_requirements=requirements())
    return dest
