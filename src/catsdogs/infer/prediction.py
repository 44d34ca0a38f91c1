"""One input's answer as every entry point gives it: predict's rows, serve's JSON, the Python API, the pyfunc.

A :class:`Prediction` wraps the predictor's own per-image :class:`~catsdogs.infer.predictor.Answer`
instead of copying its numbers into a parallel structure, so whatever the answer holds (the label,
probabilities and out-of-distribution score today, any field the predictor adds later) reaches every
entry point the same way: :meth:`Prediction.to_dict` adds each further answer field under its own name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from catsdogs.infer.predictor import Answer
from catsdogs.io.jsonable import jsonable

CORE_FIELDS: frozenset[str] = frozenset({"probs", "score", "known", "looks_like"})
"""Answer fields read through the properties below (label, probability, probabilities, ood_score,
looks_like)."""


@dataclass
class Prediction:
    """What catsdogs says about one input: its label (a class or ``unknown``), or why it could not say."""

    path: str
    """The input as given: a file's path, or ``<bytes k>`` / ``<image k>`` / ``<array k>`` for the k-th
    in-memory input of a Python call."""
    error: str = ""
    """Why the input could not be classified (``empty_file``, ``not_an_image``, ``corrupt``, ...); empty
    when it was."""
    answer: Answer | None = None
    """The predictor's own answer for the image (None with an error)."""
    classes: Sequence[str] = ()
    """The run's class names, in the order of the answer's probabilities."""

    @property
    def label(self) -> str:
        """The most likely class, ``unknown`` when the run's detector rejects the image, '' on error."""
        return self.answer.label(list(self.classes)) if self.answer is not None else ""

    @property
    def probability(self) -> float | None:
        """Probability of the most likely class (also when the label is ``unknown``)."""
        return float(np.max(self.answer.probs)) if self.answer is not None else None

    @property
    def probabilities(self) -> dict[str, float] | None:
        """Every class's probability."""
        if self.answer is None:
            return None
        return {c: float(p) for c, p in zip(self.classes, self.answer.probs, strict=True)}

    @property
    def ood_score(self) -> float | None:
        """The detector's out-of-distribution score (higher = less like training); None without one."""
        if self.answer is None or np.isnan(self.answer.score):
            return None
        return float(self.answer.score)

    @property
    def looks_like(self) -> list[tuple[str, float]]:
        """The ImageNet concepts the image looks like: ``(name, probability)``, most likely first.

        For ``unknown``, what it shows instead; for a class, any strong concept no class owns ("Cat,
        looks like: hamster 61 %"); empty for runs without ImageNet weights.
        """
        found = getattr(self.answer, "looks_like", None) if self.answer is not None else None
        return [(str(c), float(p)) for c, p in found or []]

    def extras(self) -> dict[str, Any]:
        """The answer's further fields (beyond label, probabilities and score), JSON-ready."""
        if self.answer is None:
            return {}
        found = ({f.name: getattr(self.answer, f.name) for f in dataclasses.fields(self.answer)}
                 if dataclasses.is_dataclass(self.answer) else dict(vars(self.answer)))
        return {k: jsonable(v) for k, v in found.items() if k not in CORE_FIELDS and not k.startswith("_")}

    def fields(self) -> dict[str, Any]:
        """The answer as JSON-ready fields: label, probability, probabilities, ood_score and the extras."""
        return {"label": self.label, "probability": self.probability, "probabilities": self.probabilities,
                "ood_score": self.ood_score,
                "looks_like": [{"concept": c, "probability": p} for c, p in self.looks_like],
                **self.extras()}

    def to_dict(self) -> dict[str, Any]:
        """One JSON record, as ``catsdogs predict --output x.json`` writes it."""
        out = self.fields()
        return {"path": self.path, "label": out.pop("label"), "probability": out.pop("probability"),
                "error": self.error, **out}
