"""The HTTP API's request and response shapes (OpenAPI at ``/docs``): one place for what the server says."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorBody(BaseModel):
    """A refused request."""

    error: str
    detail: str


class ExplanationOut(BaseModel):
    """A Grad-CAM heatmap of what drove the answer, overlaid on the photo."""

    label: str
    """The class explained (the most probable one)."""
    overlay_png: str
    """The photo with the heatmap overlaid: a base64 PNG, longest side at most 640 px."""
    width: int
    height: int


class ConceptOut(BaseModel):
    """An ImageNet concept an "unknown" photo looks like."""

    concept: str
    """ImageNet class name, e.g. ``badger``."""
    probability: float
    """Its ImageNet probability (0..1)."""


class PredictionOut(BaseModel):
    """The prediction for one image."""

    label: str
    """A class name, or ``unknown`` when the run's detector finds the photo unlike every class."""
    probability: float
    """Probability of the most likely class (also for ``unknown``)."""
    probabilities: dict[str, float]
    ood_score: float | None = None
    """Out-of-distribution score (higher = less like the training photos); null without a detector."""
    looks_like: list[ConceptOut] = []
    """The ImageNet concepts the photo looks like, most likely first: for ``unknown``, what it shows
    instead; for a class, a strong concept no class owns ("hamster"), usually none. Empty for runs
    trained without ImageNet weights."""
    model: dict[str, Any]
    explanation: ExplanationOut | None = None


class BatchItemOut(BaseModel):
    """One file of a batch: a prediction, or the error that file got."""

    filename: str | None = None
    label: str | None = None
    probability: float | None = None
    probabilities: dict[str, float] | None = None
    ood_score: float | None = None
    looks_like: list[ConceptOut] | None = None
    error: str | None = None
    detail: str | None = None


def multipart_body(field: str, many: bool) -> dict[str, Any]:
    """OpenAPI requestBody for hand-parsed multipart uploads (shown as a file picker in /docs)."""
    binary: dict[str, Any] = {"type": "string", "format": "binary"}
    prop = {"type": "array", "items": binary} if many else binary
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [field], "properties": {field: prop}}}}}}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in (
        (400, "Not a usable image (empty_file, not_an_image, corrupt, decompression_bomb, missing_file)"),
        (413, "Body larger than --max-bytes, or too many files"),
        (415, "Body is not multipart/form-data, or the part is not an image type"),
        # FastAPI would document its own 422 body; every refusal here is {"error", "detail"}.
        (422, "A query parameter is invalid (invalid_request), e.g. explain=maybe"),
    )
}
