"""The int8 accuracy guard: a quantised engine is used only within ``max_drop_pt`` points of fp32.

The measure is the head's validation accuracy on the engine's features against the same head on fp32
features.

The fp32 side is not a second full pass over validation (on 2 AVX2 cores that pass cost more than the
int8 one). The two accuracies differ only on images whose prediction flips between fp32 and int8, and
an image can flip only if quantisation moves its logit by more than its int8 margin (the distance of
its logit to the decision boundary). So (:func:`screened_check`):

1. a seeded random sample of ``SAMPLE_ROWS`` validation images runs in fp32: it measures the logit
   error ``d = |z_fp32 - z_int8|`` (``2 max_c |dz_c|`` for N logits), its RMS and its largest value;
2. the screen ``tau`` is the larger of ``SIGMA_FACTOR`` x a 99.9 % upper confidence bound of the error's
   standard deviation (chi-square on the sample) and ``MAX_FACTOR`` x the largest error seen;
3. every validation image whose int8 margin is below ``tau`` runs in fp32 too;
4. the fp32 accuracy counts the fp32 predictions of the images run in fp32 and the int8 prediction of
   every other image (which cannot flip unless its error exceeds ``tau``).

The bound (docs/engines.md): treating the logit error as Gaussian (it is a sum over 2,560 feature
errors through a linear head), an image outside the screen flips with probability at most
``2 Q(SIGMA_FACTOR) = 2e-9``; without that model, at most ``1/(SAMPLE_ROWS + 1)`` of the images outside
the screen can have an error above the sample's largest, and those still need ``MAX_FACTOR`` times it.
The recorded ``flip_bound`` is the Gaussian figure summed over the unscreened images.

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
    fp32_rows: int = 0
    """Validation images run in fp32 (the sample plus the screened ones); 0: all of them (full check)."""
    screen: float = 0.0
    """The int8 margin (logit units) below which an image was run in fp32; 0: full check."""
    error_rms: float = 0.0
    """RMS of the logit error on the random sample."""
    error_max: float = 0.0
    """Largest logit error on the random sample."""
    flip_bound: float = 0.0
    """Expected number of unscreened images whose prediction flips, under the Gaussian error model."""
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


SAMPLE_ROWS = 128
"""Random validation images run in fp32 to measure the logit error (~5 s for Lite1 + Lite2 here)."""
SIGMA_FACTOR = 6.0
"""Screen width in upper-bounded standard deviations of the logit error (Gaussian tail 2e-9)."""
MAX_FACTOR = 2.0
"""Screen width in multiples of the largest logit error seen in the sample (a distribution-free floor)."""
CONFIDENCE = 0.999
"""Confidence of the chi-square upper bound on the error's standard deviation."""


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


def _logits(classify: Callable[[torch.Tensor], torch.Tensor], feats: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return classify(torch.from_numpy(np.asarray(feats, np.float32))).float().cpu().numpy()


def _predict(z: np.ndarray) -> np.ndarray:
    return predictions(torch.from_numpy(z)).numpy()


def margins(z: np.ndarray) -> np.ndarray:
    """Distance of each row's logits to the decision boundary: |z| (1 logit), top-1 minus top-2 (N)."""
    if z.shape[1] == 1:
        return np.abs(z[:, 0])
    top = np.sort(z, axis=1)
    return top[:, -1] - top[:, -2]


def logit_error(z32: np.ndarray, z8: np.ndarray) -> np.ndarray:
    """How far quantisation can have moved each row's margin: |dz| (1 logit), 2 max_c |dz_c| (N)."""
    d = np.abs(z32 - z8)
    return d[:, 0] if d.shape[1] == 1 else 2.0 * d.max(axis=1)


def sigma_upper(errors: np.ndarray, confidence: float = CONFIDENCE) -> float:
    """Upper confidence bound of the error's standard deviation from its RMS (chi-square, m dof)."""
    from scipy.stats import chi2  # lazy: scipy comes with scikit-learn

    m = len(errors)
    rms = float(np.sqrt(np.mean(np.square(errors)))) if m else 0.0
    return rms * math.sqrt(m / float(chi2.ppf(1.0 - confidence, m))) if m else 0.0


def screened_check(engine: str, classify: Callable[[torch.Tensor], torch.Tensor], int8_feats: np.ndarray,
                   labels: np.ndarray, fp32_features: Callable[[np.ndarray], np.ndarray],
                   max_drop_pt: float = MAX_DROP_PT, sample: int = SAMPLE_ROWS, seed: int = 0,
                   accepts: Accepts | None = None) -> GuardResult:
    """The guard with fp32 features of only the images that could flip (see the module docstring).

    ``fp32_features(index)`` returns the fp32 features of the validation rows ``index`` (split order).
    A split no larger than ``sample`` is checked in full, and so is every split when ``accepts`` (the
    run's detector) is given: the screen bounds flips of the head's prediction, not of the detector's
    answer, so the rise of "unknown" is measured on fp32 features of every image.
    """
    n = len(labels)
    if n <= sample or accepts is not None:
        everything = np.arange(n)
        return check(engine, classify, fp32_features(everything), int8_feats, labels, max_drop_pt, accepts)
    z8 = _logits(classify, int8_feats)
    drawn = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
    z32_drawn = _logits(classify, fp32_features(drawn))
    errors = logit_error(z32_drawn, z8[drawn])
    sigma = sigma_upper(errors)
    tau = max(SIGMA_FACTOR * sigma, MAX_FACTOR * float(errors.max()))
    screened = np.setdiff1d(np.flatnonzero(margins(z8) < tau), drawn)
    pred8 = _predict(z8)
    pred32 = pred8.copy()
    pred32[drawn] = _predict(z32_drawn)
    if len(screened):
        pred32[screened] = _predict(_logits(classify, fp32_features(screened)))
    outside = n - len(drawn) - len(screened)
    from scipy.stats import norm  # lazy, as in sigma_upper

    tail = 2.0 * float(norm.sf(tau / sigma)) if sigma > 0 else 0.0
    return GuardResult(engine=engine, fp32_acc=float((pred32 == labels).mean()),
                       int8_acc=float((pred8 == labels).mean()), rows=n, max_drop_pt=max_drop_pt,
                       fp32_rows=len(drawn) + len(screened), screen=tau,
                       error_rms=float(np.sqrt(np.mean(np.square(errors)))), error_max=float(errors.max()),
                       flip_bound=outside * tail)


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
