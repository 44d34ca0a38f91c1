"""Training's choice lists (``--optimizer``, ``--freeze``), light on purpose: the config takes them from here.

The modules that act on them (``train/loop.py``, ``train/launch.py``) import torch, which ``catsdogs --help``
must not pay for.
"""

from __future__ import annotations

OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd")
"""Values of ``--optimizer`` (built by :func:`catsdogs.train.loop.make_optimizer`)."""
FREEZE_NONE = "none"
FREEZE_BACKBONE = "backbone"
FREEZE_MODES: tuple[str, ...] = (FREEZE_NONE, FREEZE_BACKBONE)
"""Values of ``--freeze``: fine-tune everything, or fit only the head on frozen backbone features."""
