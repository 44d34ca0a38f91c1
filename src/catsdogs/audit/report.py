"""``audit.html``: one self-contained page (inline CSS, thumbnails as base64 PNG data URIs).

One section per issue kind, ranked by score; each card shows the image (and its partner, for
duplicates and leakage), its path, split, label and the reason it was flagged. The page references
nothing outside itself, so it can be mailed or archived with the CSV.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image

from catsdogs.audit.issues import KINDS, SCORE_MEANING, Issue, ranked
from catsdogs.io.atomic import atomic_write_text

THUMB_PX = 128
"""Side of a thumbnail in the page (the stored pixels are upscaled, nearest-neighbour, to at least this)."""

TITLES: dict[str, str] = {
    "label_error": "Suspected label errors",
    "leakage": "Leakage: the same photo in two splits",
    "exact_duplicate": "Exact duplicates within a split",
    "near_duplicate": "Near duplicates within a split",
    "outlier": "Outliers: probably neither class",
    "near_blank": "Near-blank images",
    "undersized": "Undersized originals",
    "extreme_aspect": "Extreme aspect ratio",
}

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:0;background:#f5f6f8;color:#1d2430}
main{max-width:1200px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.6em;margin:0 0 6px}
h2{font-size:1.2em;margin:30px 0 8px;padding-bottom:6px;border-bottom:2px solid #dfe3ea}
.sub,.note{color:#5b6575;font-size:.9em}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(290px,1fr));gap:12px}
.card{background:#fff;border:1px solid #dfe3ea;border-radius:10px;padding:10px;font-size:.85em}
.card img{width:128px;height:128px;image-rendering:pixelated;border-radius:4px;background:#ddd}
.pics{display:flex;gap:6px}
.card code{word-break:break-all}
.rank{color:#8a93a3}
table{border-collapse:collapse;background:#fff;font-size:.9em}
th,td{border:1px solid #dfe3ea;padding:4px 10px;text-align:left}
td.num{text-align:right}
"""


def png_uri(pixels: np.ndarray) -> str:
    """Return a uint8 HWC image as a PNG data URI, upscaled (nearest) to at least :data:`THUMB_PX`."""
    img = Image.fromarray(pixels)
    factor = max(1, -(-THUMB_PX // max(img.size)))
    if factor > 1:
        img = img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _card(rank: int, issue: Issue, thumbs: Mapping[int, str]) -> str:
    pics = [f'<img alt="{_e(issue.path)}" src="{thumbs[issue.index]}">']
    if issue.other_index >= 0:
        pics.append(f'<img alt="{_e(issue.other_path)}" src="{thumbs[issue.other_index]}">')
    other = f"<br>and <code>{_e(issue.other_path)}</code>" if issue.other_path else ""
    return (f'<div class="card"><div class="pics">{"".join(pics)}</div>'
            f'<div><span class="rank">#{rank}</span> <code>{_e(issue.path)}</code>{other}</div>'
            f"<div>{_e(issue.split)} &middot; labelled <b>{_e(issue.label)}</b> &middot; "
            f"score {issue.score:.3f}</div><div>{_e(issue.reason)}</div></div>")


def _summary_table(counts: Counter[str]) -> str:
    rows = "".join(f'<tr><td>{_e(TITLES[k])}</td><td><code>{_e(k)}</code></td><td class="num">'
                   f"{counts.get(k, 0):,}</td><td>{_e(SCORE_MEANING[k])}</td></tr>" for k in KINDS)
    return f"<table><tr><th>issue</th><th>CSV name</th><th>rows</th><th>score</th></tr>{rows}</table>"


def write_report(path: str, issues: list[Issue], pixels: Callable[[np.ndarray], np.ndarray], per_kind: int,
                 summary: str, notes: list[str]) -> None:
    """Write audit.html: the summary, a count table and the top ``per_kind`` issues of each kind.

    ``pixels(indices)`` returns the stored images of those rows (only the shown ones are read).
    """
    shown: dict[str, list[Issue]] = {}
    for issue in ranked(issues):
        if len(shown.setdefault(issue.issue, [])) < per_kind:
            shown[issue.issue].append(issue)
    wanted = sorted({i for group in shown.values() for x in group for i in (x.index, x.other_index)
                     if i >= 0})
    idx = np.array(wanted, dtype=np.int64)
    thumbs = dict(zip(wanted, (png_uri(p) for p in pixels(idx)), strict=True)) if wanted else {}
    counts = Counter(i.issue for i in issues)
    sections = []
    for kind in KINDS:
        group = shown.get(kind, [])
        if not group:
            continue
        more = counts[kind] - len(group)
        tail = f" ({more:,} more in issues.csv)" if more > 0 else ""
        cards = "".join(_card(r + 1, x, thumbs) for r, x in enumerate(group))
        sections.append(f'<h2 id="{kind}">{_e(TITLES[kind])}: {counts[kind]:,}{_e(tail)}</h2>'
                        f'<p class="note">Ranked by {_e(SCORE_MEANING[kind])}.</p>'
                        f'<div class="cards">{cards}</div>')
    note_html = "".join(f'<p class="note">{_e(n)}</p>' for n in notes)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>catsdogs audit</title>'
            f"<style>{_CSS}</style></head><body><main><h1>Data audit</h1><p class=\"sub\">{_e(summary)}</p>"
            f"{note_html}{_summary_table(counts)}{''.join(sections) or '<p>No issues found.</p>'}"
            f"</main></body></html>\n")
    atomic_write_text(path, page)
