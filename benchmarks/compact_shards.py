"""Compact shards benchmark: uint8 (npy) against JPEG- and PNG-in-Parquet shards of the same photos.

For each ``--formats`` entry: ``catsdogs preprocess --format F`` of the development copy at the default
preset's 260 px, then the default preset trained on those shards (``catsdogs train --config
effnet_lite12_frozen``) and evaluated on their test split. Reported: shard bytes per photo, the
preprocess wall time, the frozen trainer's feature-pass seconds (the pass decodes JPEG/PNG shards as it
reads them) and test accuracy. Usage (about 10 minutes on 2 cores)::

    .venv/bin/python -m benchmarks.compact_shards [--formats npy jpeg png]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import REAL_DATA, heavy_lock, machine, write_fragment
from catsdogs.rundir import EVAL_METRICS_NAME
from catsdogs.shards.manifest import load_manifest

PRESET = "effnet_lite12_frozen"
SIZE = 260
"""The default preset's image side."""
FEATURE_PASS = re.compile(r"feature pass ([\d.]+) s")


def catsdogs(*args: str) -> tuple[str, float]:
    """Run one catsdogs command; return its stderr and wall seconds (its output on failure)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "catsdogs.cli", *args], capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        raise SystemExit(f"catsdogs {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stderr, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", nargs="+", default=["npy", "jpeg", "png"])
    args = parser.parse_args(argv)
    if not REAL_DATA.is_dir():
        print(f"real data not found at {REAL_DATA}; skipping", file=sys.stderr)
        return 0
    rows = []
    with heavy_lock(), tempfile.TemporaryDirectory(prefix="catsdogs-bench-compact-") as tmp:
        for fmt in args.formats:
            shards, run, out = (Path(tmp) / f"{name}-{fmt}" for name in ("shards", "run", "eval"))
            _, prep_s = catsdogs("preprocess", "--input", str(REAL_DATA), "--output", str(shards), "--size",
                                 str(SIZE), "--format", fmt)
            photos = sum(info.rows for info in load_manifest(shards).shards)
            data_bytes = sum(p.stat().st_size for p in shards.rglob("*") if p.is_file() and p.suffix in
                             (".npy", ".parquet"))
            log, _ = catsdogs("train", "--config", PRESET, "--data", str(shards), "--output", str(run))
            found = FEATURE_PASS.search(log)
            catsdogs("evaluate", "--run", str(run), "--output", str(out))
            accuracy = json.loads((out / EVAL_METRICS_NAME).read_text())["accuracy"]
            feature_s = float(found.group(1)) if found else float("nan")
            rows.append((fmt, data_bytes / photos / 1024, prep_s, feature_s, accuracy))
            print(rows[-1], flush=True)
    base = rows[0]
    lines = [
        "## Compact shards: uint8 against JPEG/PNG in Parquet",
        "",
        f"`.venv/bin/python -m benchmarks.compact_shards --formats {' '.join(args.formats)}` ({machine()}); "
        f"the 18,000-photo development copy at {SIZE} px, the default preset (`{PRESET}`) trained and "
        "evaluated on each format's shards.",
        "",
        "| format | KB per photo | x uint8 | preprocess s | feature pass s | test accuracy |",
        "|---|---|---|---|---|---|",
        *(f"| `{f}` | {kb:.1f} | {kb / base[1]:.2f} | {p:.0f} | {fp:.1f} | {acc:.2%} |"
          for f, kb, p, fp, acc in rows),
    ]
    print("\n".join(lines))
    write_fragment("compact_shards", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
