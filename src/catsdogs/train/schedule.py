"""Learning-rate schedules as pure functions of the step.

A schedule that is a function of the global step has no hidden state: resuming only needs the step
number, and the rate of any step can be computed (and tested) directly.
"""

from __future__ import annotations

import math

SCHEDULES: tuple[str, ...] = ("constant", "cosine", "onecycle")
"""Values of ``--schedule``."""
ONECYCLE_DEFAULT_WARMUP = 0.3
"""Fraction of the steps spent rising when ``onecycle`` gets no explicit warm-up (as torch's OneCycleLR)."""
ONECYCLE_START_DIV = 25.0
"""onecycle starts at ``lr / 25`` ..."""
ONECYCLE_END_DIV = 1e4
"""... and ends at ``lr / 1e4`` (torch's OneCycleLR defaults)."""


def lr_at(step: int, *, kind: str, base_lr: float, total_steps: int, warmup_steps: int = 0) -> float:
    """Return the learning rate for optimiser step ``step`` (0-based).

    constant: linear warm-up from ~0 then flat; cosine: linear warm-up then cosine decay to 0;
    onecycle: rise from lr/25 to lr (30% of the steps unless a warm-up is given), then cosine down to
    lr/1e4. Steps past ``total_steps`` keep the final rate.
    """
    total = max(1, total_steps)
    step = min(max(step, 0), total - 1)
    if kind == "onecycle":
        up = warmup_steps or max(1, round(ONECYCLE_DEFAULT_WARMUP * total))
        start, end = base_lr / ONECYCLE_START_DIV, base_lr / ONECYCLE_END_DIV
        if step < up:
            return start + (base_lr - start) * step / up
        frac = (step - up) / max(1, total - 1 - up)
        return end + (base_lr - end) * 0.5 * (1 + math.cos(math.pi * frac))
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return base_lr
    if kind == "cosine":
        frac = (step - warmup_steps) / max(1, total - warmup_steps)
        return base_lr * 0.5 * (1 + math.cos(math.pi * frac))
    raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")
