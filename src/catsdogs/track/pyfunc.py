"""catsdogs' model as an MLflow pyfunc: image bytes in, the answers of ``catsdogs predict`` out.

A thin wrapper of the Python API (:func:`catsdogs.load` on the model's artifacts folder, which is an
ordinary run folder), so loading the model by URI (``mlflow.pyfunc.load_model("models:/NAME/1")``) or
serving it (``mlflow models serve -m models:/NAME/1 --env-manager local``) answers raw JPEG/PNG bytes
exactly like ``catsdogs predict``: the same decoding, the run's recorded settings ("unknown" included)
and the run's engine, whose graphs and int8 check travel in the artifact (``engine/``).

Input: a DataFrame with an ``image`` column of bytes (over HTTP: base64 strings, which the signature's
``binary`` type tells MLflow's scoring server to decode). Output: one row per image with ``label`` (a
class or ``unknown``, as ``catsdogs predict`` answers), ``probability``, one ``p_<class>`` column per
class, ``ood_score``, ``looks_like`` (what the image looks like, as predict's CSV says it) and
``error`` (the reason an image could not be decoded; its other columns are then empty).

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
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema

from catsdogs.api import Model, load
from catsdogs.errors import ImageDecodeError
from catsdogs.infer.prediction import Prediction
from catsdogs.infer.predictor import format_looks_like
from catsdogs.rundir import RunDir

IMAGE_COLUMN = "image"
"""Input column holding each image's encoded bytes."""
CHECKPOINT_ARTIFACT = "checkpoint"
CONFIG_ARTIFACT = "config"
ENGINE_ARTIFACT = "engine"
"""Artifact keys: the run's checkpoint, config.json and engine/ (graphs and the int8 check), copied into
the model's ``artifacts/`` folder under their own names, so that folder is an ordinary run folder (see
:mod:`catsdogs.track.registry`)."""
REQUIREMENTS: tuple[str, ...] = ("torch", "numpy", "pillow", "pandas", "mlflow-skinny")
"""Packages the model needs besides catsdogs itself, pinned at save time to the versions installed."""
ENTRY = Path(__file__).with_name("_pyfunc_entry.py")
"""The model-from-code file MLflow copies into the model and runs to build it."""


class CatsdogsModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper around :func:`catsdogs.load` of the model's artifacts folder (a run folder)."""

    model: Model

    def load_context(self, context: Any) -> None:
        # The artifacts folder holds the checkpoint, config.json and engine/: an ordinary run folder, so
        # the run's recorded settings and engine apply, as for catsdogs predict.
        self.model = load(Path(context.artifacts[CHECKPOINT_ARTIFACT]).parent)

    # pd.DataFrame is the one hint MLflow passes through untouched (no schema inferred from it): the
    # signature saved with the model states the contract.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        return classify(self.model, images_of(model_input))


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


def classify(model: Model, images: Sequence[Any]) -> pd.DataFrame:
    """One output row per input, as :meth:`Model.predict` answers it; failures carry ``error``.

    Columns: ``label`` (a class or ``unknown``), ``probability``, ``p_<class>``, ``ood_score``,
    ``looks_like`` (predict's CSV text), ``error``, then any further field of the predictor's answer.
    """
    rows: list[Prediction] = []
    encoded: list[bytes] = []
    where: list[int] = []
    for i, value in enumerate(images):
        try:
            encoded.append(_as_bytes(value))
            where.append(i)
            rows.append(Prediction(path=""))
        except ImageDecodeError as exc:
            rows.append(Prediction(path="", error=exc.reason))
    answered = model.predict(encoded) if encoded else []
    for i, prediction in zip(where, answered, strict=True):  # type: ignore[arg-type]
        rows[i] = prediction
    out = pd.DataFrame({"label": [r.label for r in rows],
                        "probability": [np.nan if r.probability is None else r.probability for r in rows]})
    for name in model.classes:
        out[f"p_{name}"] = [np.nan if r.probabilities is None else r.probabilities[name] for r in rows]
    out["ood_score"] = [np.nan if r.ood_score is None else r.ood_score for r in rows]
    out["looks_like"] = [format_looks_like(r.looks_like) for r in rows]
    out["error"] = [r.error for r in rows]
    extra = [r.extras() for r in rows]
    for key in dict.fromkeys(k for e in extra for k in e):
        out[key] = [e.get(key) for e in extra]
    return out


def signature(classes: Sequence[str]) -> ModelSignature:
    """The model's input/output schema; ``binary`` makes the scoring server base64-decode the input."""
    outputs = [ColSpec("string", "label"), ColSpec("double", "probability"),
               *(ColSpec("double", f"p_{c}") for c in classes), ColSpec("double", "ood_score"),
               ColSpec("string", "looks_like"),
               ColSpec("string", "error")]
    return ModelSignature(inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]), outputs=Schema(outputs))


def requirements() -> list[str]:
    """Pinned requirements of the model (the installed versions)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def save_pyfunc(run_folder: Path, checkpoint: Path, dest: Path) -> Path:
    """Save the run's model as an MLflow pyfunc folder at ``dest``; return it.

    The run's engine is built first (graphs exported, an int8 one calibrated and checked on the run's
    validation split, while its shards are at hand), so the model carries ``engine/`` and a models:/
    download answers like the run folder, on the same engine.
    """
    model = load(checkpoint)
    classes = model.classes
    print(f"catsdogs: the logged model runs on the {model.engine} engine", file=sys.stderr, flush=True)
    artifacts = {CHECKPOINT_ARTIFACT: str(checkpoint)}
    run = RunDir(run_folder)
    if run.config.is_file():
        artifacts[CONFIG_ARTIFACT] = str(run.config)
    if run.engine_dir.is_dir():
        artifacts[ENGINE_ARTIFACT] = str(run.engine_dir)
    with warnings.catch_warnings():
        # "no input example" and similar advice: the signature above states the contract.
        warnings.simplefilter("ignore", UserWarning)
        mlflow.pyfunc.save_model(str(dest), python_model=str(ENTRY), artifacts=artifacts,
                                 signature=signature(classes), pip_requirements=requirements())
    return dest
