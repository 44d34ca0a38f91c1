"""The out-of-distribution detector names (``train --ood-method``), light on purpose.

:mod:`catsdogs.models.ood` fits and scores them but imports torch; the config takes the choices from here.
"""

from __future__ import annotations

CONCEPTS = "concepts"
OOD_METHODS: tuple[str, ...] = (CONCEPTS, "knn", "mahalanobis", "energy")
"""Detector methods (``train --ood-method``); ``concepts`` needs ImageNet weights."""
AUTO = "auto"
"""``--ood-method auto``: ``concepts`` with ImageNet heads, else ``knn`` (``models.ood.resolve_method``)."""
OOD_CHOICES: tuple[str, ...] = (AUTO, *OOD_METHODS)
"""Values ``train --ood-method`` accepts (its default, chosen by measurement, is in config.py)."""
