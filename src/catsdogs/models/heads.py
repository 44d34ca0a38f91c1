"""What the head's outputs mean: logit count, loss, probabilities and predicted classes.

Two classes use one logit (sigmoid + BCE), N > 2 use N logits (softmax + cross-entropy); every
consumer (the loop, the predictor, export) goes through these functions, so they agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def num_logits(num_classes: int) -> int:
    """Return the head width: 1 for binary (sigmoid output), N for N classes (softmax)."""
    return 1 if num_classes == 2 else num_classes


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Turn head outputs ``(n, 1)`` or ``(n, C)`` into class probabilities ``(n, C)``."""
    if logits.shape[1] == 1:
        p1 = torch.sigmoid(logits[:, 0].float())
        return torch.stack([1.0 - p1, p1], dim=1)
    return torch.softmax(logits.float(), dim=1)


def loss_fn(logits: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Mean training loss: BCE-with-logits on one logit (binary) or cross-entropy on N logits."""
    logits = logits.float()
    if logits.shape[1] == 1:
        target = y.float()
        if smoothing:
            target = target * (1.0 - smoothing) + 0.5 * smoothing
        return F.binary_cross_entropy_with_logits(logits[:, 0], target)
    return F.cross_entropy(logits, y, label_smoothing=smoothing)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Class log-probabilities ``(n, C)`` from head outputs ``(n, 1)`` or ``(n, C)``, computed stably."""
    logits = logits.float()
    if logits.shape[1] == 1:
        z = logits[:, 0]
        return torch.stack([F.logsigmoid(-z), F.logsigmoid(z)], dim=1)
    return F.log_softmax(logits, dim=1)


def predictions(logits: torch.Tensor) -> torch.Tensor:
    """Predicted class indices from head outputs."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)
