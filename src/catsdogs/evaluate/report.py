"""The evaluation report: one self-contained HTML page (inline CSS, PNGs as base64 data URIs).

A single file can be mailed, archived or opened offline; it references nothing outside itself.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catsdogs.io.atomic import atomic_write_text
from catsdogs.schema import SPLITS

MAX_SKIPPED_ROWS = 1000
"""Skipped files listed in the page; the rest are counted (the full list is in manifest.json)."""

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;
 background:#f5f6f8;color:#1d2430;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.7em;margin:0 0 4px}
h2{font-size:1.25em;margin:34px 0 12px;padding-bottom:6px;border-bottom:2px solid #dfe3ea}
h3{font-size:1.02em;margin:18px 0 8px}
.sub{color:#5b6575;margin:0 0 20px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:14px}
.card{background:#fff;border:1px solid #dfe3ea;border-radius:10px;padding:14px 18px;
 box-shadow:0 1px 2px rgba(0,0,0,.04)}
.card .v{font-size:1.7em;font-weight:700}
.card .k{color:#5b6575;font-size:.88em}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(440px,1fr));gap:18px;align-items:start}
figure{background:#fff;border:1px solid #dfe3ea;border-radius:10px;margin:0;padding:10px;text-align:center}
figure img{max-width:100%;height:auto}
figure.wide{grid-column:1/-1}
figure.wide img{max-width:min(100%,960px)}
figcaption{color:#5b6575;font-size:.88em;margin-top:4px}
pre{background:#fff;border:1px solid #dfe3ea;border-radius:10px;padding:12px 16px;overflow-x:auto;
 font-size:.9em}
table{border-collapse:collapse;background:#fff;font-size:.9em;margin-bottom:8px}
th,td{border:1px solid #dfe3ea;padding:5px 10px;text-align:left;vertical-align:top}
th{background:#eef1f5}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td code{word-break:break-all}
.scroll{max-height:420px;overflow:auto;display:inline-block;max-width:100%}
.cols{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.note{color:#5b6575;font-size:.9em}
footer{margin-top:40px;color:#8a93a3;font-size:.82em}
"""


@dataclass
class ReportData:
    """Everything the page shows; every field is plain data so the page can be rebuilt from files."""

    title: str
    metrics: dict[str, Any]
    """metrics.json content: accuracy, per_class, roc_auc, confusion_matrix, n, model, ..."""
    classification_report: str
    images: dict[str, Path] = field(default_factory=dict)
    """Caption -> PNG path, shown in this order."""
    wide: set[str] = field(default_factory=set)
    """Captions of images that span the whole page width (e.g. the mistakes grid)."""
    train_config: dict[str, Any] = field(default_factory=dict)
    preprocess_config: dict[str, Any] = field(default_factory=dict)
    eval_config: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """Kept images per split per class (from the manifest)."""
    classes: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    ignored: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    """Preprocessing facts from the manifest (candidates, kept, wall time...)."""
    created: str = ""


def data_uri(path: str | Path) -> str:
    """Return a PNG file as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _e(value: Any) -> str:
    """Escape any value for HTML text or attributes."""
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    """Format a config/metric value compactly: floats to 4 significant places, containers as JSON."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str)
    if value == "":
        return "\u2014"
    return str(value)


def _kv_table(d: Mapping[str, Any]) -> str:
    """Render a flat mapping as a two-column table."""
    if not d:
        return '<p class="note">Not available.</p>'
    rows = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(_fmt(v))}</code></td></tr>"
                   for k, v in sorted(d.items()))
    return f"<table>{rows}</table>"


def _cards(m: Mapping[str, Any]) -> str:
    """Render the headline metrics as cards."""
    auc = m.get("roc_auc")
    macro = m.get("per_class", {}).get("macro avg", {})
    items = [
        ("Accuracy", f"{m['accuracy'] * 100:.2f}%"),
        ("ROC AUC" + (" (macro OvR)" if len(m.get("classes", [])) > 2 else ""),
         "n/a" if auc is None else f"{auc:.4f}"),
        ("Macro F1", f"{macro.get('f1-score', float('nan')):.4f}"),
        ("Log loss", "n/a" if m.get("log_loss") is None else f"{m['log_loss']:.4f}"),
        ("Images", f"{m['n']:,}"),
        ("Errors", f"{m.get('errors', 0):,}"),
    ]
    if "ece" in m:
        items += [
            (f"ECE, calibrated (before: {_pct(m['ece_uncalibrated'])})", _pct(m["ece"])),
            ("Answered \u201cunknown\u201d" + ("" if m.get("reject") else " (rejection off)"),
             _pct(m["unknown_share"])),
            ("Accuracy among accepted", _pct(m["accuracy_accepted"])),
        ]
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
        for k, v in items) + "</div>"


def _pct(value: Any) -> str:
    """A share as a percentage with two decimals, or n/a."""
    return "n/a" if value is None or value != value else f"{float(value) * 100:.2f}%"


def _counts_table(counts: Mapping[str, Mapping[str, int]], classes: Sequence[str]) -> str:
    """Render images per split (rows) and class (columns) with totals."""
    if not counts:
        return '<p class="note">Not available.</p>'
    classes = list(classes) or sorted({c for v in counts.values() for c in v})
    head = "".join(f'<th class="num">{_e(c)}</th>' for c in classes)
    body = []
    totals = [0] * len(classes)
    order = {s: i for i, s in enumerate(SPLITS)}  # train, val, test whatever order the manifest has
    for split, per in sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])):
        vals = [int(per.get(c, 0)) for c in classes]
        totals = [t + v for t, v in zip(totals, vals, strict=True)]
        cells = "".join(f'<td class="num">{v:,}</td>' for v in vals)
        body.append(f'<tr><th>{_e(split)}</th>{cells}<td class="num"><b>{sum(vals):,}</b></td></tr>')
    cells = "".join(f'<td class="num"><b>{t:,}</b></td>' for t in totals)
    body.append(f'<tr><th>total</th>{cells}<td class="num"><b>{sum(totals):,}</b></td></tr>')
    return (f'<table><tr><th>split</th>{head}<th class="num">total</th></tr>{"".join(body)}</table>')


def _skipped_section(skipped: Sequence[Mapping[str, str]], ignored: Mapping[str, Any]) -> str:
    """Render skipped files (path, reason) with per-reason counts, and the ignored-file counts."""
    parts = []
    if skipped:
        reasons: dict[str, int] = {}
        for s in skipped:
            reasons[str(s.get("reason", "?"))] = reasons.get(str(s.get("reason", "?")), 0) + 1
        summary = "".join(f'<tr><td>{_e(r)}</td><td class="num">{n:,}</td></tr>'
                          for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        parts.append(f'<div class="cols"><div><h3>By reason</h3><table><tr><th>reason</th>'
                     f'<th class="num">files</th></tr>{summary}</table></div>')
        rows = "".join(
            f"<tr><td><code>{_e(s.get('path', ''))}</code></td><td>{_e(s.get('reason', ''))}</td>"
            f"<td>{_e(s.get('detail', ''))}</td></tr>" for s in skipped[:MAX_SKIPPED_ROWS])
        more = (f'<p class="note">{len(skipped) - MAX_SKIPPED_ROWS:,} more are listed in the manifest.</p>'
                if len(skipped) > MAX_SKIPPED_ROWS else "")
        parts.append(f'<div><h3>Files ({len(skipped):,})</h3><div class="scroll"><table><tr><th>path</th>'
                     f'<th>reason</th><th>detail</th></tr>{rows}</table></div>{more}</div></div>')
    else:
        parts.append('<p class="note">No files were skipped.</p>')
    parts.append("<h3>Ignored (not image files)</h3>")
    if isinstance(ignored.get("by_reason"), dict):
        parts.append(_ignored_listing(ignored))
    elif ignored:
        # Values may be counts, lists of paths or nested counts: show a count plus a short sample.
        rows = []
        for key, value in sorted(ignored.items()):
            if isinstance(value, list | tuple):
                sample = ", ".join(str(v) for v in value[:5]) + (" \u2026" if len(value) > 5 else "")
                rows.append(f'<tr><td>{_e(key)}</td><td class="num">{len(value):,}</td>'
                            f"<td><code>{_e(sample)}</code></td></tr>")
            elif isinstance(value, dict):
                rows.append(f'<tr><td>{_e(key)}</td><td class="num">{sum_counts(value):,}</td>'
                            f"<td><code>{_e(_fmt(value))}</code></td></tr>")
            else:
                rows.append(f'<tr><td>{_e(key)}</td><td class="num">{_e(_fmt(value))}</td><td></td></tr>')
        parts.append(f"<table><tr><th>kind</th><th class=\"num\">count</th><th>examples</th></tr>"
                     f"{''.join(rows)}</table>")
    else:
        parts.append('<p class="note">Nothing was ignored.</p>')
    return "".join(parts)


def _ignored_listing(ignored: Mapping[str, Any]) -> str:
    """Render the manifest's ``{"count", "by_reason", "paths"}`` ignored section."""
    by_reason = ignored.get("by_reason", {})
    if not by_reason:
        return '<p class="note">Nothing was ignored.</p>'
    rows = "".join(f'<tr><td>{_e(r)}</td><td class="num">{_e(_fmt(n))}</td></tr>'
                   for r, n in by_reason.items())
    total = ignored.get("count", sum_counts(by_reason))
    paths = list(ignored.get("paths", []))
    listed = "".join(f"<tr><td><code>{_e(p)}</code></td></tr>" for p in paths[:MAX_SKIPPED_ROWS])
    more = (f'<p class="note">{len(paths) - MAX_SKIPPED_ROWS:,} more are listed in the manifest.</p>'
            if len(paths) > MAX_SKIPPED_ROWS else "")
    return (f'<div class="cols"><div><table><tr><th>reason</th><th class="num">entries</th></tr>{rows}'
            f'<tr><th>total</th><td class="num"><b>{_e(_fmt(total))}</b></td></tr></table></div>'
            + (f'<div><div class="scroll"><table><tr><th>path</th></tr>{listed}</table></div>{more}</div>'
               if paths else "") + "</div>")


def sum_counts(value: Any) -> int:
    """Return the total of a count, a list (its length) or a nested dict of counts."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, list | tuple):
        return len(value)
    if isinstance(value, dict):
        return sum(sum_counts(v) for v in value.values())
    return 0


def render(data: ReportData) -> str:
    """Return the complete HTML page for ``data``."""
    m = data.metrics
    model = m.get("model", {})
    figures = "".join(
        f'<figure class="{"wide" if caption in data.wide else ""}"><img alt="{_e(caption)}" '
        f'src="{data_uri(path)}"><figcaption>{_e(caption)}</figcaption></figure>'
        for caption, path in data.images.items())
    subtitle = (f"model <b>{_e(model.get('name', '?'))}</b> &middot; checkpoint <code>"
                f"{_e(m.get('checkpoint', ''))}</code> (epoch {_e(model.get('epoch', '?'))}) &middot; "
                f"split <b>{_e(m.get('split', ''))}</b> of <code>{_e(m.get('data', ''))}</code>"
                f"{' &middot; TTA' if m.get('tta') else ''}")
    stats = {k: v for k, v in data.stats.items() if not isinstance(v, dict | list)}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(data.title)}</title><style>{_CSS}</style></head>
<body><main>
<h1>{_e(data.title)}</h1>
<p class="sub">{subtitle}</p>
{_cards(m)}
<h2>Classification report</h2>
<pre>{_e(data.classification_report)}</pre>
<h2>Plots</h2>
<div class="grid">{figures}</div>
<h2>Data</h2>
<div class="cols"><div><h3>Images per split and class</h3>{_counts_table(data.counts, data.classes)}</div>
<div><h3>Preprocessing facts</h3>{_kv_table(stats)}</div></div>
<h2>Skipped files</h2>
{_skipped_section(data.skipped, data.ignored)}
<h2>Configuration</h2>
<div class="cols">
<div><h3>Training (config.json of the run)</h3>{_kv_table(data.train_config)}</div>
<div><h3>Preprocessing (manifest of the shards)</h3>{_kv_table(data.preprocess_config)}</div>
<div><h3>Evaluation</h3>{_kv_table(data.eval_config)}</div>
</div>
<footer>Generated by catsdogs evaluate{(' on ' + _e(data.created)) if data.created else ''}.</footer>
</main></body></html>
"""


def write_report(path: str | Path, data: ReportData) -> Path:
    """Render the page and write it atomically to ``path``; return the path."""
    path = Path(path)
    atomic_write_text(path, render(data))
    return path
