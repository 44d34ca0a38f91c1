"""Head-fit benchmark: the driver's peak memory fitting the head by passes over feature shards, and float16.

1. Peak RSS of a process that fits the head (:func:`catsdogs.train.head.fit_head`) on synthetic float16
   feature shards of ``--rows`` rows (200,000 and 2,000,000 by default, ``--width`` wide, 10,000 rows per
   shard), against the in-memory fit of the smallest count. Memory does not depend on the iteration
   count, so the streamed fits stop after ``--iterations`` L-BFGS iterations of one C (the time column is
   that short fit, not a converged one).
2. What storing features as float16 costs: the head fitted on the default run's real features in
   float32 and rounded to float16 (validation and test accuracy, weights). It reads the features that
   ``benchmarks.open_world`` cached for the run (``--cache``, its default); without them it says so.

Usage (about 10 minutes on 2 cores)::

    .venv/bin/python -m benchmarks.head_memory [--rows 200000 2000000] [--run runs/effnet_lite12_frozen]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import DEFAULT_RUN, heavy_lock, machine, write_fragment

SHARD_ROWS = 10_000
"""Rows per synthetic feature shard (the size of a preprocess shard at its default --shard-rows)."""
OPEN_WORLD_CACHE = "/tmp/catsdogs-bench/open_world"
"""Where benchmarks.open_world caches a run's features (its own --cache default)."""


def write_synthetic(folder: Path, rows: int, width: int, seed: int = 0) -> None:
    """Feature shards of ``rows`` float16 rows whose labels follow a noisy linear rule, plus the labels."""
    from catsdogs.shards.feature_shards import write_feature_shard

    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(width).astype(np.float32)
    labels = []
    for k, start in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - start)
        x = rng.standard_normal((n, width), dtype=np.float32)
        y = (x @ direction + rng.normal(0, width ** 0.5, n) > 0).astype(np.int64)
        write_feature_shard(str(folder / f"part_{k:05d}.parquet"), {"features": x, "labels": y})
        labels.append(y)
    np.save(folder / "labels.npy", np.concatenate(labels))


def child(folder: Path, width: int, iterations: int, in_memory: bool) -> None:
    """Fit the head on ``folder``'s shards (streamed, or read into one array); print peak RSS and seconds."""
    from catsdogs.shards.feature_shards import StreamedFeatures, chunks_of
    from catsdogs.train.head import fit_head

    y = np.load(folder / "labels.npy")
    files = sorted(str(p) for p in folder.glob("part_*.parquet"))
    x = StreamedFeatures(tuple((f, "features") for f in files), len(y), width)
    val_x, val_y = next(iter(chunks_of(x)))[:1000], y[:1000]  # only the C choice reads validation rows
    t0 = time.perf_counter()
    train = np.concatenate(list(chunks_of(x))) if in_memory else x
    _w, _b, metrics = fit_head(train, y, val_x, val_y, 2, c_grid=(0.1,), max_iter=iterations)
    seconds = time.perf_counter() - t0
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"peak_mb": peak / 1024, "seconds": seconds, "train_acc": metrics["train_acc"]}))


def measure(folder: Path, width: int, iterations: int, in_memory: bool) -> dict[str, float]:
    cmd = [sys.executable, "-m", "benchmarks.head_memory", "--child", str(folder), "--width", str(width),
           "--iterations", str(iterations)] + (["--in-memory"] if in_memory else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def float16_effect(run: Path, cache: Path) -> list[str]:
    """Rows of the float16 table from the run's cached real features, or a line saying they are missing."""
    from benchmarks.open_world import _cache_key
    from catsdogs.checkpoint import CKPT_ENGINE
    from catsdogs.engines.names import DEFAULT_ENGINE
    from catsdogs.infer.predictor import Predictor
    from catsdogs.train.head import fit_head

    pred = Predictor.from_run(run, "cpu", backend=DEFAULT_ENGINE)  # as benchmarks.open_world keys its cache
    folder = cache / _cache_key(pred, str(pred.checkpoint.get(CKPT_ENGINE, DEFAULT_ENGINE)))
    if not all((folder / f"{s}.npz").is_file() for s in ("train", "val", "test")):
        return [f"No cached features of `{run}` under `{cache}`: run `benchmarks.open_world` first."]
    split = {s: np.load(folder / f"{s}.npz", allow_pickle=True) for s in ("train", "val", "test")}
    rows = ["| features | C | val acc | test acc | max weight change |", "|---|---|---|---|---|"]
    ref = None
    for name, dtype in (("float32", np.float32), ("float16 (as the feature shards store them)", np.float16)):
        x = {s: split[s]["f"].astype(dtype).astype(np.float32) for s in split}
        w, b, m = fit_head(x["train"], split["train"]["y"], x["val"], split["val"]["y"], len(pred.classes))
        z = x["test"] @ w.numpy().T + b.numpy()
        pred_test = (z[:, 0] > 0).astype(int) if z.shape[1] == 1 else z.argmax(1)
        acc = float((pred_test == split["test"]["y"]).mean())
        moved = float((w - ref).abs().max() / ref.abs().max()) if ref is not None else 0.0
        change = "—" if ref is None else f"{moved:.2%} of the largest weight"
        ref = w if ref is None else ref
        rows.append(f"| {name} | {m['C']:g} | {m['val_acc']:.2%} | {acc:.2%} | {change} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[200_000, 2_000_000])
    parser.add_argument("--width", type=int, default=1280, help="features per row (EfficientNet-Lite0's)")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN)
    parser.add_argument("--cache", type=Path, default=Path(OPEN_WORLD_CACHE))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.width, args.iterations, args.in_memory)
        return 0
    table = ["| rows | fit | peak RSS MB | seconds | vs the smallest streamed |", "|---|---|---|---|---|"]
    with heavy_lock(), tempfile.TemporaryDirectory(prefix="catsdogs-bench-head-") as tmp:
        base = None
        for rows in sorted(args.rows):
            folder = Path(tmp) / str(rows)
            folder.mkdir()
            write_synthetic(folder, rows, args.width)
            fits = [("streamed", False)] + ([("in memory", True)] if rows == min(args.rows) else [])
            for name, in_memory in fits:
                r = measure(folder, args.width, args.iterations, in_memory)
                base = base or r["peak_mb"]
                table.append(f"| {rows:,} | {name} | {r['peak_mb']:.0f} | {r['seconds']:.1f} | "
                             f"{100 * (r['peak_mb'] / base - 1):+.1f} % |")
                print(table[-1], flush=True)
            for p in folder.iterdir():
                p.unlink()  # free the disk before the next count
        effect = float16_effect(args.run, args.cache) if (args.run / "best.pt").is_file() else [
            f"No run at `{args.run}` (make run): float16 effect not measured."]
    lines = [
        "## Head fit: driver memory streamed from feature shards, and float16 features",
        "",
        f"`.venv/bin/python -m benchmarks.head_memory --rows {' '.join(map(str, args.rows))} --width "
        f"{args.width} --iterations {args.iterations} --cache {args.cache}` ({machine()}); synthetic "
        f"float16 feature shards of {SHARD_ROWS:,} rows. Streamed fits stop after {args.iterations} L-BFGS "
        "iterations (memory does not depend on it); the in-memory fit is scikit-learn's, to convergence.",
        "",
        *table,
        "",
        f"float16 against float32 features: the head of `{args.run.name}` refitted on its real "
        "development-copy features (train/val/test splits as preprocess made them).",
        "",
        *effect,
    ]
    print("\n".join(lines))
    write_fragment("head_memory", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
