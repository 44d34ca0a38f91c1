"""What the service may show of the server's files: their names, never where they are.

``RUN/eval/metrics.json`` and ``report.html`` record the absolute paths of the shards, the run and the
checkpoint they were made from (useful on the machine that made them); a client sees each as its last
part (``best.pt``, ``shards``). docs/security.md promises that no answer holds a server path.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import PurePath
from typing import Any

_CODE = re.compile(r"<code>([^<]*)</code>")
_PATH = re.compile(r"(?<![\w.:/])(?:file://)?(/[^\s\"',\]}]+)")
"""An absolute path (or file:// URI) inside a text, up to a quote, comma, bracket or space."""


def public(value: Any) -> Any:
    """``value`` (JSON-ready) with every absolute path, or file:// URI, replaced by its last part."""
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [public(v) for v in value]
    if isinstance(value, str) and (value.startswith("file:/") or os.path.isabs(value)):
        return PurePath(value.removeprefix("file://")).name
    return value


def public_text(text: str) -> str:
    """``text`` with every absolute path in it replaced by its last part."""
    return _PATH.sub(lambda m: PurePath(m.group(1)).name, text)


def public_report(page: str) -> str:
    """The evaluation report with the paths in its ``<code>`` cells (configs, checkpoint, data) as names.

    Only the code cells: the report's images are base64 data URIs, in which "/" is an ordinary letter.
    """
    return _CODE.sub(lambda m: f"<code>{html.escape(public_text(html.unescape(m.group(1))))}</code>", page)
