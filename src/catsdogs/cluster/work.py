"""The per-batch work a shard task runs on an executor: features (train, audit) or answers (evaluate).

Each is a small frozen dataclass, pickled into the task once; the heavy state (the engine, the
predictor) is built from its spec on first use in each executor process (:mod:`catsdogs.cluster.ship`).
The computation is the local one, called the same way: :func:`catsdogs.train.features.batch_features`
and :meth:`catsdogs.infer.predictor.Predictor.answer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from catsdogs.cluster.shardjob import in_shard_order
from catsdogs.cluster.ship import EngineSpec, PredictorSpec
from catsdogs.train.features import batch_features

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Ready:
    """A spec whose object is built already: the caller's own engine or predictor.

    The work then runs on this machine (``shardjob.run_local``) as a Spark task runs it with the object
    its spec builds.
    """

    built: Any

    def build(self) -> Any:
        return self.built


@dataclass(frozen=True)
class FeatureWork:
    """Pooled features of each image (and of its mirror image with ``flip``), with its label."""

    engine: EngineSpec
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: tuple[str, ...] = ()
    """Splits whose mirror images are also passed (train with ``--augment``)."""
    size: int | None = None
    """Resize the shard pixels to this side in torch first (the audit's backbone side)."""

    @property
    def spec(self) -> EngineSpec:
        return self.engine

    def __call__(self, x: np.ndarray, y: np.ndarray, split: str) -> Arrays:
        f, flipped = batch_features(self.engine.build(), x, self.mean, self.std, flip=split in self.flip,
                                    size=self.size)
        out = {"features": f, "labels": np.asarray(y, np.int64)}
        if flipped is not None:
            out["flipped"] = flipped
        return out


@dataclass(frozen=True)
class AnswerWork:
    """The predictor's answer for each image (evaluate).

    Probabilities after and before temperature scaling, the OOD score and whether it is known.
    """

    predictor: PredictorSpec | Ready
    tta: bool | None = None

    @property
    def spec(self) -> PredictorSpec | Ready:
        return self.predictor

    def __call__(self, x: np.ndarray, y: np.ndarray, split: str) -> Arrays:
        return self.predictor.build().answer(x, tta=self.tta, with_raw=True).arrays(y)


def split_features(results: dict[tuple[str, int], Arrays], n_shards: int, split: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a split in shard order, mirrored rows appended (as ``extract_features``)."""
    parts = in_shard_order(results, split, n_shards)
    if not parts:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    f = np.concatenate([p["features"] for p in parts]).astype(np.float32)
    y = np.concatenate([p["labels"] for p in parts]).astype(np.int64)
    if "flipped" in parts[0]:
        f = np.concatenate([f, np.concatenate([p["flipped"] for p in parts]).astype(np.float32)])
        y = np.concatenate([y, y])
    return f, y
