"""The out-of-distribution detector names (``train --ood-method``), light on purpose.

:mod:`catsdogs.models.ood` fits and scores them but imports torch; the config takes the choices from here.
"""

from __future__ import annotations

OOD_METHODS: tuple[str, ...] = ("mahalanobis", "knn", "energy")
"""Values of ``train --ood-method`` (its default, chosen by measurement, is in config.py)."""
