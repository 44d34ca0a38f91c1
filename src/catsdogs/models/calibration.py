"""Temperature scaling (Guo et al. 2017): one scalar ``T`` that divides the logits.

The scaled probabilities then match the observed accuracy. Fitted on the VALIDATION split at training
time, stored in the checkpoint, applied by the predictor. Dividing by ``T`` never changes the predicted class.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from catsdogs.models.heads import log_probs

TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)
"""Search interval for ``T``: wider than any temperature seen in practice (0.5..5)."""
_GOLDEN_STEPS = 60
"""Golden-section steps on log T: the interval shrinks 0.618^60 ~ 3e-13 of its width."""


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``logits / temperature``."""
    lp = log_probs(logits.float() / temperature)
    return float(-lp.gather(1, labels.long()[:, None]).mean())


def fit_temperature(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Return the ``T`` that minimises the validation NLL; 1.0 (no change) without validation rows.

    Golden-section search on log T (the NLL is unimodal in T).
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if len(y) == 0:
        return 1.0
    lo, hi = math.log(TEMPERATURE_BOUNDS[0]), math.log(TEMPERATURE_BOUNDS[1])
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(z, y, math.exp(a)), nll(z, y, math.exp(b))
    for _ in range(_GOLDEN_STEPS):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(z, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(z, y, math.exp(b))
    return float(math.exp((lo + hi) / 2.0))
