"""Run every benchmark module, then index docs/benchmarks/*.md in docs/benchmarks.md.

Usage: ``.venv/bin/python -m benchmarks.run_all [name ...]`` (names default to every module in
benchmarks/ except helpers; ``--collect-only`` just rebuilds docs/benchmarks.md from the fragments).
Holds the heavy-job lock for the whole run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks._common import DOCS_DIR, LOCK_HELD_ENV, PROJECT_ROOT, heavy_lock

SKIP = {"__init__", "_common", "run_all"}
INDEX = PROJECT_ROOT / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Headline:
    """One figure of the index, read from its fragment each time the index is built."""

    fragment: str
    """The fragment's file stem in docs/benchmarks/."""
    what: str
    row: str = ""
    """A regex matched against a table row's text; with ``column``, the figure is that row's cell."""
    column: str = ""
    pattern: str = ""
    """Otherwise: a regex whose first group is the figure."""
    percent: bool = False
    """The figure is a fraction (0.9933) to show as a percentage."""
    unit: str = ""


CONCEPTS = r"\*\*concepts\*\*.*\| 99\.5% \|"
HEADLINES = (
    Headline("make_run", "`make run`, default preset, wall clock (preprocess included)",
             pattern=r"\*\*Wall: (\d+ s)\*\*"),
    Headline("make_run", "test accuracy of that run (1,800 photos)", pattern=r"accuracy (0\.\d+)",
             percent=True),
    Headline("open_world_effnet_lite12", "default preset: test photos answered (the rest: \"unknown\")",
             row=CONCEPTS, column="test answered"),
    Headline("open_world_effnet_lite12", "default preset: everyday photos answered \"unknown\"",
             row=CONCEPTS, column="everyday unknown"),
    Headline("open_world_effnet_lite12", "default preset: raccoons answered \"unknown\"",
             row=CONCEPTS, column="raccoon unknown"),
    Headline("engines", "int8 feature pass (`openvino-int8`), images/s",
             row=r"openvino-int8 \| openvino-int8", column="feature pass img/s"),
    Headline("calibration", "int8 validation accuracy with 64 calibration images", row=r"64 \|",
             column="val accuracy"),
    Headline("preprocess", "Spark preprocess at 64 px, images/s (without Spark's start)",
             row=r"\*\*Spark, excluding", column="Images/s"),
    Headline("serve_engines", "`catsdogs serve`, default model, `openvino-int8`, p50 ms at 1 client",
             row=r"openvino-int8 \| 0 \| 1 \|", column="p50 ms"),
    Headline("serve_engines", "the same, requests/s at 16 clients", row=r"openvino-int8 \| 0 \| 16 \|",
             column="req/s"),
    Headline("soak", "soak: server errors (5xx) under mixed hostile uploads", pattern=r"5xx: \*\*(\d+)\*\*"),
    Headline("cluster", "feature pass on 2 one-core workers against 1 (warm)",
             row=r"standalone cluster, 2 workers x 1 core, warm", column="x 1 worker"),
    Headline("cluster_predict", "`predict --master local[2]` against local predict at 20,000 photos",
             row=r"20,000", column="Spark vs local"),
    Headline("head_memory", "driver peak memory fitting the head from 2,000,000 feature rows, MB",
             row=r"2,000,000 \| streamed", column="peak RSS MB"),
    Headline("compact_shards", "JPEG shards' bytes per photo against uint8 (260 px)", row=r"`jpeg`",
             column="x uint8"),
    Headline("full_size", "`make run` on the real download (25,000 full-size photos), estimated",
             row=r"\*\*`make run`", column="value"),
    Headline("scale", "Spark preprocess job at 4x the data, images/s", row=r"4x \|",
             column="img/s Spark job"),
    Headline("remote_storage", "preprocess from and to S3 with 20 ms per request, 16 read threads, wall",
             row=r"s3a:// -> s3a://, \+20 ms per request, `--read-threads 16`", column="wall s", unit=" s"),
    Headline("train", "training loader overhead (streaming against in-memory)", row=r"streaming overhead",
             column="value"),
)


READS_OTHERS = ("head_memory", "full_size")
"""Benchmarks that read what others leave (open_world's feature cache, make_run's fragment): run last."""


def modules() -> list[str]:
    """Every benchmark module, alphabetically, with :data:`READS_OTHERS` after the rest."""
    names = sorted(p.stem for p in (PROJECT_ROOT / "benchmarks").glob("*.py")
                   if p.stem not in SKIP and not p.stem.startswith("_"))
    return sorted(names, key=lambda n: n in READS_OTHERS)


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table_cell(text: str, row: str, column: str) -> str | None:
    """The cell under ``column`` of the first table row matching ``row`` (the row's own table's header)."""
    lines = text.splitlines()
    header: list[str] = []
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            header = []
            continue
        if i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip()):
            header = cells(line)
        elif header and re.search(row, line) and column in header:
            found = cells(line)
            index = header.index(column)
            return found[index] if index < len(found) else None
    return None


def figure(headline: Headline) -> str | None:
    """The headline's figure as its fragment states it now (None when the fragment no longer has it)."""
    path = DOCS_DIR / f"{headline.fragment}.md"
    if not path.is_file():
        return None
    text = path.read_text()
    if headline.pattern:
        m = re.search(headline.pattern, text)
        value = m.group(1) if m else None
    else:
        value = table_cell(text, headline.row, headline.column)
    if value is None:
        return None
    value = value.strip("* ")
    if headline.percent:
        value = f"{float(value) * 100:.2f} %"
    return value + headline.unit


def title(path: Path) -> str:
    """The fragment's heading, without the history a hand-written one may carry ("(#17)")."""
    first = next((line for line in path.read_text().splitlines() if line.startswith("#")), path.stem)
    return re.sub(r"\s*\(#\d+\)", "", first.lstrip("# ").strip())


def index_text() -> str:
    """docs/benchmarks.md: the headline figures, each read from its fragment, and a line per fragment."""
    out = ["# Benchmarks", "",
           "Every measured figure of the docs comes from a fragment in `docs/benchmarks/`, which records the "
           "command, the machine and the data that produced it. `.venv/bin/python -m benchmarks.run_all` "
           "runs the benchmarks and writes this page; `--collect-only` only rewrites it.", "",
           "## Headline figures", "", "| figure | value | fragment |", "|---|---|---|"]
    for h in HEADLINES:
        value = figure(h)
        out.append(f"| {h.what} | {value if value is not None else 'missing from the fragment'} | "
                   f"[{h.fragment}](benchmarks/{h.fragment}.md) |")
    out += ["", "## Fragments", ""]
    out += [f"- [{frag.stem}](benchmarks/{frag.name}): {title(frag)}"
            for frag in sorted(DOCS_DIR.glob("*.md"))]
    return "\n".join(out) + "\n"


def collect() -> Path:
    """Write the index of the fragments to docs/benchmarks.md."""
    INDEX.write_text(index_text())
    return INDEX


def main(argv: list[str]) -> int:
    if argv == ["--collect-only"]:
        print(f"wrote {collect()}")
        return 0
    names = argv or modules()
    failed = []
    with heavy_lock():
        env = dict(os.environ, **{LOCK_HELD_ENV: "1"})
        for name in names:
            print(f"== benchmarks.{name}", flush=True)
            rc = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"], cwd=PROJECT_ROOT, env=env)
            if rc:
                failed.append(f"{name} (exit {rc})")
    print(f"wrote {collect()}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
