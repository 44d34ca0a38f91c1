"""The ``--device`` choices, light on purpose: :mod:`catsdogs.runtime` resolves them but imports torch."""

from __future__ import annotations

AUTO = "auto"
CPU = "cpu"
CUDA = "cuda"
DEVICES: tuple[str, ...] = (AUTO, CPU, CUDA)
"""Values of ``--device``: auto takes a CUDA GPU when there is one."""
