"""Every ``--backend`` engine side by side on a trained run: feature pass, predict, accuracy, GFLOP/s.

For each engine (torch, onnx, openvino, onnx-int8, openvino-int8) on the same run and shards:

* feature pass: images/s of the test split through ``train.features.extract_features`` (shard read,
  normalise, forward; batch 64) -- the pass that dominates frozen-backbone training;
* test accuracy: the run's head on those features (argmax over every test image; "unknown" ignored);
* predict: images/s of ``catsdogs predict``'s path (``infer.predict.predict_files``: JPEG decode in
  threads, resize, forward, head, detector) on the first ``--predict-images`` test files;
* achieved GFLOP/s (int8: GOP/s): the feature graph's operations per image (torch's FLOP counter,
  2 per multiply-add) times images/s, against the machine's measured peak: the best of fp32
  ``torch.matmul`` and int8 ``torch._int_mm`` (oneDNN: AVX-512 VNNI / AMX) on 2048..4096 squares.

int8 engines run only behind their accuracy guard; a refused one is reported as refused (what the
product would run instead is its fp32 runtime). Usage::

    .venv/bin/python -m benchmarks.engines --run runs/effnet_lite12_frozen
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import DEFAULT_RUN, REAL_DATA, heavy_lock, machine, write_fragment
from catsdogs.engines.batches import split_batches
from catsdogs.engines.names import ENGINES
from catsdogs.infer.predict import predict_files
from catsdogs.infer.predictor import Predictor
from catsdogs.models.heads import predictions
from catsdogs.runtime import setup
from catsdogs.schema import FILES_CSV_NAME
from catsdogs.shards.manifest import load_manifest
from catsdogs.train.features import extract_features

PEAK_SIDES = (2048, 4096)
"""Matrix sides of the peak measurement: large enough that both kernels run at their steady rate."""
PEAK_REPEATS = 5
BATCH_SIZES = (1, 16)
"""Bare-forward batch sizes compared: a lone request, and what 16 concurrent clients can be batched to."""
BATCH_REPEATS = 8


def peak_gops() -> dict[str, float]:
    """Best measured fp32 GFLOP/s (torch.matmul) and int8 GOP/s (torch._int_mm) on this machine."""
    out = {"fp32": 0.0, "int8": 0.0}
    for n in PEAK_SIDES:
        a, b = torch.randn(n, n), torch.randn(n, n)
        qa = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        qb = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        for key, fn in (("fp32", lambda a=a, b=b: a @ b),
                        ("int8", lambda qa=qa, qb=qb: torch._int_mm(qa, qb))):
            fn()
            t0 = time.perf_counter()
            for _ in range(PEAK_REPEATS):
                fn()
            out[key] = max(out[key], 2 * n**3 * PEAK_REPEATS / (time.perf_counter() - t0) / 1e9)
    return out


def gflop_per_image(predictor: Predictor) -> float:
    """Operations (2 per multiply-add) of one image through ``model.features``, in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    model: Any = predictor.model
    x = torch.zeros(1, 3, predictor.size, predictor.size)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.features(x)
    return counter.get_total_flops() / 1e9


def test_files(shards: Path, n: int) -> list[Path]:
    """The first ``n`` test files of the shards, as paths under the real data."""
    with open(shards / FILES_CSV_NAME, newline="") as fh:
        rel = [row["path"] for row in csv.DictReader(fh) if row["split"] == "test"]
    return [REAL_DATA / p for p in rel[:n]]


def bench_engine(run: Path, shards: Path, name: str, files: list[Path]) -> dict[str, Any]:
    t0 = time.perf_counter()
    pred = Predictor.from_run(run, "cpu", backend=name)
    load_s = time.perf_counter() - t0
    engine = pred.feature_engine
    row: dict[str, Any] = {"engine": name, "ran": engine.name, "load_s": load_s,
                           "check": engine.describe().get("int8_check")}
    manifest = load_manifest(shards)
    model: Any = pred.model
    t0 = time.perf_counter()
    feats, labels = extract_features(model, shards, manifest, "test", pred.mean, pred.std, 64,
                                      engine=engine, desc=name)
    row["feature_ips"] = len(labels) / (time.perf_counter() - t0)
    with torch.inference_mode():
        guess = predictions(model.classify(torch.from_numpy(feats))).numpy()
    row["test_acc"] = float((guess == labels).mean())
    row["test_rows"] = len(labels)
    x = next(split_batches(shards, manifest, "test", pred.mean, pred.std, max(BATCH_SIZES)))[0]
    for b in BATCH_SIZES:
        engine.run(x[:b])
        t0 = time.perf_counter()
        for _ in range(BATCH_REPEATS):
            engine.run(x[:b])
        row[f"ms_per_image_b{b}"] = 1000 * (time.perf_counter() - t0) / BATCH_REPEATS / b
    if files:
        t0 = time.perf_counter()
        rows = predict_files(pred, files, batch_size=64, workers=2, progress=False)
        row["predict_ips"] = len(rows) / (time.perf_counter() - t0)
    return row


def table(rows: list[dict[str, Any]], gflop: float, peak: dict[str, float]) -> str:
    base = next(r for r in rows if r["engine"] == "torch")
    lines = ["| engine | ran as | feature pass img/s | x torch | predict img/s | x torch | achieved GFLOP/s "
             "(int8: GOP/s) | % of peak | test accuracy | int8 check on val (fp32 -> int8) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kind = "int8" if r["ran"].endswith("int8") else "fp32"
        achieved = gflop * r["feature_ips"]
        chk = r["check"]
        check = (f"{100 * chk['fp32_acc']:.2f} -> {100 * chk['int8_acc']:.2f} % ({chk['drop_pt']:+.2f} pt, "
                 "passed)") if chk else ("refused (see ran as)" if r["ran"] != r["engine"] else "")
        pred_ips = r.get("predict_ips", float("nan"))
        lines.append(f"| {r['engine']} | {r['ran']} | {r['feature_ips']:.1f} | "
                     f"{r['feature_ips'] / base['feature_ips']:.2f} | {pred_ips:.1f} | "
                     f"{pred_ips / base.get('predict_ips', float('nan')):.2f} | {achieved:.0f} | "
                     f"{100 * achieved / peak[kind]:.0f} % of {kind} | {100 * r['test_acc']:.2f} % "
                     f"({r['test_rows']}) | {check} |")
    lines += ["", "Bare forward per image (features only, all cores), a lone image vs a batch of 16: the "
              "ratio bounds what micro-batching 16 concurrent requests can add to a server whose lone "
              "request already keeps every core busy.", "",
              "| engine | ran as | ms/image at batch 1 | ms/image at batch 16 | batch-16 gain |",
              "|---|---|---|---|---|"]
    for r in rows:
        b1, b16 = r["ms_per_image_b1"], r["ms_per_image_b16"]
        lines.append(f"| {r['engine']} | {r['ran']} | {b1:.1f} | {b16:.1f} | {b1 / b16:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=str(DEFAULT_RUN), help="trained run folder (default: make run's)")
    parser.add_argument("--shards", default="", help="shards folder (default: RUN/shards)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--predict-images", type=int, default=512)
    args = parser.parse_args()
    run = Path(args.run)
    shards = Path(args.shards) if args.shards else run / "shards"
    if not (run / "best.pt").is_file() or not shards.is_dir():
        print(f"skipped: no trained run with shards at {run} (make run, or give --run/--shards)")
        return
    files = test_files(shards, args.predict_images) if REAL_DATA.is_dir() else []
    with heavy_lock():
        setup(0, "cpu")  # allocator tuning + threads, as every command does (torch is 1.7x slower without)
        rows = []
        for name in args.engines.split(","):
            rows.append(bench_engine(run, shards, name, files))
            print(rows[-1], flush=True)
        gflop = gflop_per_image(Predictor.from_run(run, "cpu", backend="torch"))
        # Last: AMX/AVX-512 matrix kernels can leave the cores clocked down for a while afterwards.
        peak = peak_gops()
        print(f"peak: fp32 {peak['fp32']:.0f} GFLOP/s, int8 {peak['int8']:.0f} GOP/s", flush=True)
    md = "\n".join([
        "## Engines (`--backend`): feature pass, predict, accuracy, GFLOP/s",
        "",
        f"`.venv/bin/python -m benchmarks.engines --run {run}` on {machine()}; the run's model "
        f"({gflop:.2f} GFLOP per image through the features at its size), its test split "
        f"({rows[0]['test_rows']} images) and the first {len(files)} test JPEGs for predict. "
        f"Measured peak: fp32 {peak['fp32']:.0f} GFLOP/s (torch.matmul), int8 {peak['int8']:.0f} GOP/s "
        "(torch._int_mm).",
        "",
        table(rows, gflop, peak),
        "",
        "\"ran as\" differs from the engine when its int8 check refused it (then its fp32 runtime ran). "
        "Test accuracy is the run's head on that engine's features, every test image counted.",
    ])
    print(md)
    write_fragment("engines", md)


if __name__ == "__main__":
    main()
