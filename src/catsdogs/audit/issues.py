"""The audit's findings as rows of ``issues.csv``: one row per image and issue (per pair for duplicates).

Columns: ``path, split, label, issue, score, suggested_label, other_path``. ``score`` ranks rows within
one issue kind (higher = more certainly a problem); its meaning per kind is in :data:`SCORE_MEANING`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from catsdogs import schema
from catsdogs.io.atomic import atomic_write_text

ISSUES_CSV_NAME = "issues.csv"
AUDIT_HTML_NAME = "audit.html"

COLUMNS: tuple[str, ...] = ("path", "split", "label", "issue", "score", "suggested_label", "other_path")
"""Columns of issues.csv, in order (``preprocess --exclude`` reads its ``path`` column)."""

LABEL_ERROR = "label_error"
LEAKAGE = "leakage"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
OUTLIER = "outlier"
NEAR_BLANK = "near_blank"
UNDERSIZED = "undersized"
EXTREME_ASPECT = "extreme_aspect"

KINDS: tuple[str, ...] = (LABEL_ERROR, LEAKAGE, EXACT_DUPLICATE, NEAR_DUPLICATE, OUTLIER, NEAR_BLANK,
                          UNDERSIZED, EXTREME_ASPECT)
"""Issue kinds in the order the CSV and the gallery list them."""

SCORE_MEANING: dict[str, str] = {
    LABEL_ERROR: "1 - out-of-sample probability of the given label",
    LEAKAGE: "cosine similarity of the 8x8 tiny-image descriptors (1.0: identical pixels)",
    EXACT_DUPLICATE: "1.0 (identical pixels at the shards' size)",
    NEAR_DUPLICATE: "cosine similarity of the 8x8 tiny-image descriptors",
    OUTLIER: "the out-of-distribution detector's score (knn: 1 - cosine to the k-th nearest train image)",
    NEAR_BLANK: "1 - largest per-channel pixel std / --blank-std (1: one flat colour)",
    UNDERSIZED: "--min-side / shorter side of the original",
    EXTREME_ASPECT: "long side / short side of the original",
}


@dataclass
class Issue:
    """One finding about one image (and its partner, for duplicates)."""

    path: str
    split: str
    label: str
    issue: str
    score: float
    suggested_label: str = ""
    other_path: str = ""
    index: int = -1
    """Row of the image in the audit's arrays (for the gallery; not written to the CSV)."""
    other_index: int = -1
    reason: str = ""
    """A sentence for the gallery."""

    def csv_row(self) -> tuple[str, ...]:
        return (self.path, self.split, self.label, self.issue, f"{self.score:.6g}", self.suggested_label,
                self.other_path)


def ranked(issues: list[Issue]) -> list[Issue]:
    """Return issues grouped by kind (in :data:`KINDS` order), best score first, then by path."""
    order = {k: i for i, k in enumerate(KINDS)}
    split_order = {s: i for i, s in enumerate(schema.SPLITS)}
    return sorted(issues, key=lambda x: (order[x.issue], -x.score, split_order.get(x.split, 0), x.path))


def write_csv(path: str, issues: list[Issue]) -> None:
    """Write issues.csv atomically, in :func:`ranked` order."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows(i.csv_row() for i in ranked(issues))
    atomic_write_text(path, buf.getvalue())
