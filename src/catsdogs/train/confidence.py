"""Fit what makes a run's answers trustworthy once training is done.

That is the out-of-distribution detector (on TRAIN features), its threshold and the temperature (on
VAL), and the run's inference settings.

Both trainers end here: the frozen-backbone head passes the features it already computed; the loop
makes one bounded feature pass with the best weights (:func:`feature_pass`). The result is the
checkpoint entries of :func:`catsdogs.checkpoint.confidence_entries`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from catsdogs.checkpoint import confidence_entries
from catsdogs.config import TrainConfig
from catsdogs.errors import ConfigError
from catsdogs.models.calibration import fit_temperature
from catsdogs.models.imagenet import heads_of_model
from catsdogs.models.ood import fit_detector, resolve_method
from catsdogs.shards.manifest import Manifest
from catsdogs.train.features import extract_features

log = logging.getLogger(__name__)

TRAIN_FEATURE_ROWS = 20_000
"""Most training rows the loop's feature pass reads for the detector (the first shards, in order):
enough for a d x d covariance at d <= 1280, and it bounds the pass to ~1 epoch of forward passes."""


@torch.inference_mode()
def feature_pass(model: nn.Module, root: str | Path, manifest: Manifest, split: str, mean: tuple[float, ...],
                 std: tuple[float, ...], batch_size: int, device: torch.device,
                 max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return features ``(n, d)``, logits ``(n, k)`` and labels ``(n,)`` of a split (``max_rows`` at most).

    The features come from :func:`~catsdogs.train.features.extract_features`; the logits are the
    model's own head applied to them (``forward`` is ``classify`` of ``features``).
    """
    feats, labels = extract_features(model, root, manifest, split, mean, std, batch_size, device=device,
                                     max_rows=max_rows, desc="confidence")
    if not len(feats):
        return feats, np.zeros((0, 0), np.float32), labels
    net: Any = model
    net.eval()
    logits = net.classify(torch.from_numpy(feats).to(device)).float().cpu().numpy()
    return feats, logits, labels


def fit_confidence(cfg: TrainConfig, num_classes: int, train_feats: np.ndarray, train_labels: np.ndarray,
                   val_feats: np.ndarray, val_logits: np.ndarray, val_labels: np.ndarray
                   ) -> tuple[dict[str, Any], dict[str, float]]:
    """Fit detector (train), threshold and temperature (val); return checkpoint entries and metrics.

    The backbone's ImageNet heads (EfficientNet-Lite models) go into the detector whatever its method,
    so answers can name what a rejected photo looks like; a model trained from scratch has none.
    """
    heads = heads_of_model(cfg.model)
    try:
        method = resolve_method(cfg.ood_method, heads is not None)
    except ValueError:
        raise ConfigError(f"--ood-method {cfg.ood_method} needs a model with ImageNet weights; --model "
                          f"{cfg.model} has none (use --ood-method knn, or auto)") from None
    detector = fit_detector(method, train_feats, train_labels, num_classes, cfg.seed, imagenet=heads)
    vf = torch.from_numpy(np.ascontiguousarray(val_feats, dtype=np.float32))
    vl = torch.from_numpy(np.ascontiguousarray(val_logits, dtype=np.float32))
    detector.calibrate(vf, vl, cfg.accept_rate)
    val_scores = detector.score(vf, vl).numpy() if len(val_labels) else np.zeros(0)
    temperature = fit_temperature(val_logits, val_labels)
    accepted = float(detector.known(val_scores).mean()) if len(val_scores) else float("nan")
    metrics = {"temperature": temperature, "ood_threshold": detector.threshold,
               "val_accepted": accepted}
    log.info("confidence: %s detector, threshold %.4g accepts %.4f of val; temperature %.3f",
             method, detector.threshold, accepted, temperature)
    entries = confidence_entries(detector.to_state(), temperature,
                                 {"tta": cfg.tta, "reject": cfg.reject, "calibrate": True})
    return entries, metrics
