"""Inference cost per image vs batch size and threads, torch and onnxruntime, for a trained run.

Explains what micro-batching can buy on this machine: if a batch of 8 costs as much per image as a
batch of 1, throughput under load can only grow by the cores a lone request leaves idle.

Usage: ``.venv/bin/python -m benchmarks.batch_scaling [--run RUN ...]`` (default: every trained run under
runs/); writes docs/benchmarks/batch_scaling.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks._common import PROJECT_ROOT, heavy_lock, machine, write_fragment

BATCHES = (1, 4, 8, 16)
THREADS = (2, 1)


def median_ms(fn: Callable[[], object], reps: int) -> float:
    """Return the median wall time of ``fn`` in ms after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def measure(run: Path) -> list[tuple[str, int, int, float]]:
    """Return ``(backend, threads, batch, ms per batch)`` rows for one run."""
    import onnxruntime as ort
    import torch

    from catsdogs.infer.export import ensure_onnx, run_folder
    from catsdogs.infer.predictor import Predictor
    from catsdogs.runtime import setup

    setup(0, "cpu")
    pred = Predictor.from_run(run, backend="torch")
    onnx_path, _ = ensure_onnx(pred, run_folder(run))
    rng = np.random.default_rng(0)
    rows = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for b in BATCHES:
            x = rng.integers(0, 256, (b, pred.size, pred.size, 3), dtype=np.uint8)
            reps = 20 if b == 1 else 6
            rows.append(("torch", threads, b, median_ms(lambda x=x: pred.predict_arrays(x), reps)))
            run_onnx = lambda x=x, s=sess, n=name: s.run(None, {n: x})  # noqa: E731
            rows.append(("onnx", threads, b, median_ms(run_onnx, reps)))
            print(f"{run.name} threads={threads} batch={b}: torch {rows[-2][3]:.1f} ms, "
                  f"onnx {rows[-1][3]:.1f} ms", flush=True)
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", default=[], help="trained run folder (repeatable)")
    args = ap.parse_args(argv)
    runs = [Path(r) for r in args.run] or sorted(p.parent for p in (PROJECT_ROOT / "runs").glob("*/best.pt"))
    if not runs:
        sys.exit("no trained run given (--run) or found under runs/; run 'make run' first")
    lines = ["## Inference cost per image vs batch size and threads", "",
             f"Command: `.venv/bin/python -m benchmarks.batch_scaling "
             f"{' '.join('--run ' + str(r) for r in args.run)}`".rstrip() + "  ",
             f"Machine: {machine()}. Median of 20 (batch 1) or 6 timed calls after 2 warm-ups; torch through "
             "`Predictor.predict_arrays` (BatchNorm folded, channels_last), onnxruntime on the run's "
             "`model.onnx`; uint8 NHWC input of the model's size.", "",
             "| run | backend | threads | " + " | ".join(f"batch {b} ms/img" for b in BATCHES) + " |",
             "|---|---|---:|" + "---:|" * len(BATCHES)]
    with heavy_lock():
        for run in runs:
            rows = measure(run)
            for backend in ("torch", "onnx"):
                for threads in THREADS:
                    cells = [next(ms / b for be, t, bb, ms in rows if (be, t, bb) == (backend, threads, b))
                             for b in BATCHES]
                    lines.append(f"| {run.name} | {backend} | {threads} | "
                                 + " | ".join(f"{c:.1f}" for c in cells) + " |")
    print(f"wrote {write_fragment('batch_scaling', chr(10).join(lines))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
