"""The int8 accuracy guard: a quantised engine is used only within ``max_drop_pt`` points of fp32.

The measure is the head's validation accuracy on the engine's features against the same head on fp32
features.

One rule for training and inference: the same weights (backbone and head) are run through the fp32 and
the int8 engine on the validation split and the two accuracies compared. For a frozen-backbone run the
head was fitted on int8 features; passing the guard then also proves the fp32 checkpoint serves it
within the bound. The result is recorded beside the int8 graph, keyed by the checkpoint's SHA-256 and
the graph's, so evaluate, predict and serve reuse it instead of running the validation split again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catsdogs.engines.names import MAX_DROP_PT, MAX_UNKNOWN_RISE_PT
from catsdogs.io.atomic import atomic_write_text
from catsdogs.models.heads import predictions


@dataclass
class GuardResult:
    """One check of an int8 engine against fp32 on the validation split."""

    engine: str
    fp32_acc: float
    """Validation accuracy (0..1) of the head on fp32 features."""
    int8_acc: float
    """Validation accuracy (0..1) of the same head on the int8 engine's features."""
    rows: int
    """Validation images compared."""
    max_drop_pt: float
    checkpoint_sha256: str = ""
    graph_sha256: str = ""
    fp32_accepted: float = float("nan")
    """Share (0..1) of validation images the run's detector accepts on fp32 features (NaN: not checked)."""
    int8_accepted: float = float("nan")
    """The same on the int8 engine's features."""
    max_unknown_rise_pt: float = MAX_UNKNOWN_RISE_PT

    @property
    def drop_pt(self) -> float:
        """Accuracy lost to int8, in percentage points (negative: int8 scored higher)."""
        return 100.0 * (self.fp32_acc - self.int8_acc)

    @property
    def unknown_rise_pt(self) -> float:
        """Validation images newly answered "unknown" on int8, in percentage points (0 when unchecked)."""
        rise = 100.0 * (self.fp32_accepted - self.int8_accepted)
        return 0.0 if math.isnan(rise) else rise

    @property
    def passed(self) -> bool:
        return (self.rows > 0 and self.drop_pt <= self.max_drop_pt + 1e-9
                and self.unknown_rise_pt <= self.max_unknown_rise_pt + 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drop_pt": round(self.drop_pt, 4), "passed": self.passed}

    def refusal(self) -> str:
        """The one-line explanation printed when the guard refuses the engine."""
        if self.drop_pt <= self.max_drop_pt + 1e-9:
            return (f"catsdogs: {self.engine} refused: the run's detector accepts "
                    f"{100 * self.int8_accepted:.1f} % of validation on its features vs "
                    f"{100 * self.fp32_accepted:.1f} % in fp32 on {self.rows} images, "
                    f"{self.unknown_rise_pt:.2f} points more 'unknown' > the {self.max_unknown_rise_pt:g} "
                    f"allowed; using fp32")
        return (f"catsdogs: {self.engine} refused: validation accuracy {100 * self.int8_acc:.2f} % vs "
                f"{100 * self.fp32_acc:.2f} % in fp32 on {self.rows} images, a drop of {self.drop_pt:.2f} "
                f"points > the {self.max_drop_pt:g} allowed (--int8-max-drop); using fp32")


def accuracy(classify: Callable[[torch.Tensor], torch.Tensor], feats: np.ndarray,
             labels: np.ndarray) -> float:
    """Accuracy (0..1) of ``classify`` (features -> head outputs) on ``feats``."""
    if len(labels) == 0:
        return float("nan")
    with torch.inference_mode():
        pred = predictions(classify(torch.from_numpy(np.asarray(feats, np.float32)))).cpu().numpy()
    return float((pred == labels).mean())


Accepts = Callable[[np.ndarray], np.ndarray]
"""Features -> bool mask of the images the run's detector answers with a class (not "unknown")."""


def check(engine: str, classify: Callable[[torch.Tensor], torch.Tensor], fp32_feats: np.ndarray,
          int8_feats: np.ndarray, labels: np.ndarray, max_drop_pt: float = MAX_DROP_PT,
          accepts: Accepts | None = None) -> GuardResult:
    """Compare the head (and, given ``accepts``, the detector) on fp32 and int8 features of validation."""
    result = GuardResult(engine=engine, fp32_acc=accuracy(classify, fp32_feats, labels),
                         int8_acc=accuracy(classify, int8_feats, labels), rows=len(labels),
                         max_drop_pt=max_drop_pt)
    if accepts is not None and len(labels):
        result.fp32_accepted = float(np.mean(accepts(fp32_feats)))
        result.int8_accepted = float(np.mean(accepts(int8_feats)))
    return result


def _records(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_record(path: Path, engine: str, checkpoint_sha256: str, graph_sha256: str) -> GuardResult | None:
    """The recorded check of ``engine`` for this checkpoint and int8 graph, or None (absent or stale).

    Records are per engine: onnxruntime and OpenVINO run the same int8 graph with different kernels.
    """
    data = _records(path).get(engine)
    if not isinstance(data, dict):
        return None
    if data.get("checkpoint_sha256") != checkpoint_sha256 or data.get("graph_sha256") != graph_sha256:
        return None
    fields = {k: data[k] for k in GuardResult.__dataclass_fields__ if k in data}
    try:
        return GuardResult(**fields)
    except TypeError:
        return None


def save_record(path: Path, result: GuardResult) -> None:
    """Write the check beside the int8 graph (atomically), keeping the other engine's record."""
    records = _records(path)
    records[result.engine] = result.to_dict()
    atomic_write_text(path, json.dumps(records, indent=2, sort_keys=True) + "\n")
