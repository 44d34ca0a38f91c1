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

import numpy as np
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

PEAK_SIDES = (1024, 2048, 4096)
"""Matrix sides of the peak measurement: large enough that every kernel runs at its steady rate."""
PEAK_REPEATS = 5
PEAK_CALL_LIMIT_S = 2.0
"""A kernel whose single call at a side takes longer is not tried at larger sides (torch._int_mm has no
AVX2 int8 kernel: ~1 GOP/s here, a 4096 square would take minutes)."""
CONV_SHAPE = (16, 256, 64, 64)
"""Input of the 1x1 convolution peak (batch, channels, height, width): a pointwise convolution like the
ones that hold most of EfficientNet-Lite's operations, 256 -> 256 channels."""
BATCH_SIZES = (1, 16)
"""Bare-forward batch sizes compared: a lone request, and what 16 concurrent clients can be batched to."""
BATCH_REPEATS = 8
SERIAL_ROWS = 256
"""Test images run one batch at a time through ``Engine.run``, for the before/after of the streamed pass."""
INT8_TARGET = 0.5
"""Target: the int8 feature pass reaches at least half the measured int8 peak."""


def _rate(fn: Any, ops: float) -> tuple[float, float]:
    """(GOP/s over PEAK_REPEATS calls after a warm-up, seconds of the warm-up call)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(PEAK_REPEATS):
        fn()
    return ops * PEAK_REPEATS / (time.perf_counter() - t0) / 1e9, first


def _matmul_kernels() -> dict[str, tuple[str, Any]]:
    """name -> (precision, side -> callable) of the square matrix-multiply kernels measured."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from catsdogs.runtime import cores

    def ort_int8(n: int) -> Any:
        a = helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])
        y = helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])
        b = numpy_helper.from_array(np.random.randint(-128, 127, (n, n)).astype(np.int8), "B")
        g = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "g", [a], [y], [b])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cores()
        sess = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
                                    .SerializeToString(), opts, providers=["CPUExecutionProvider"])
        x = np.random.randint(0, 255, (n, n)).astype(np.uint8)
        return lambda: sess.run(None, {"A": x})

    def torch_fp32(n: int) -> Any:
        a, b = torch.randn(n, n), torch.randn(n, n)
        return lambda: a @ b

    def torch_int8(n: int) -> Any:
        qa = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        qb = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        return lambda: torch._int_mm(qa, qb)

    return {"torch.matmul": ("fp32", torch_fp32), "torch._int_mm": ("int8", torch_int8),
            "onnxruntime MatMulInteger (u8 x s8)": ("int8", ort_int8)}


def _openvino_conv(int8: bool) -> Any:
    """OpenVINO's 1x1 convolution on CONV_SHAPE: fp32, or int8 (the QDQ form the int8 graph uses)."""
    import tempfile

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from catsdogs.engines.openvino_runtime import PRECISION_FP32, shared_core
    from catsdogs.runtime import cores

    n, c, h, w = CONV_SHAPE
    weight = np.random.randn(c, c, 1, 1).astype(np.float32) * 0.05
    inits = [numpy_helper.from_array(np.zeros(c, np.float32), "bias")]
    nodes = []
    source = "x"
    if int8:
        inits += [numpy_helper.from_array(np.array(0.02, np.float32), "s"),
                  numpy_helper.from_array(np.array(0, np.uint8), "z"),
                  numpy_helper.from_array(np.clip(np.round(weight / 0.001), -127, 127).astype(np.int8), "wq"),
                  numpy_helper.from_array(np.full(c, 0.001, np.float32), "ws"),
                  numpy_helper.from_array(np.zeros(c, np.int8), "wz")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                  helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["W"], axis=0)]
        source = "xd"
    else:
        inits.append(numpy_helper.from_array(weight, "W"))
    nodes.append(helper.make_node("Conv", [source, "W", "bias"], ["y"]))
    shape = list(CONV_SHAPE)
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/conv.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
        core = shared_core()
        compiled = core.compile_model(core.read_model(path), "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": cores(),
            "INFERENCE_PRECISION_HINT": PRECISION_FP32})
    request = compiled.create_infer_request()
    x = np.abs(np.random.randn(*CONV_SHAPE)).astype(np.float32)
    return lambda: request.infer({0: x}, share_inputs=True)


def peak_gops() -> dict[str, Any]:
    """Best measured fp32 GFLOP/s and int8 GOP/s on this machine, over every kernel tried.

    The int8 peak is the best of torch._int_mm (oneDNN), onnxruntime's MatMulInteger (MLAS) and
    OpenVINO's int8 1x1 convolution: on a CPU without VNNI not every library has a fast int8 kernel,
    and the hardware's rate is what its best kernel reaches.
    """
    kernels: dict[str, float] = {}
    out: dict[str, Any] = {"fp32": 0.0, "int8": 0.0, "kernels": kernels}
    for name, (kind, make) in _matmul_kernels().items():
        for n in PEAK_SIDES:
            rate, first = _rate(make(n), 2 * n**3)
            kernels[name] = max(kernels.get(name, 0.0), rate)
            if first > PEAK_CALL_LIMIT_S:
                break
        out[kind] = max(out[kind], kernels[name])
    n, c, h, w = CONV_SHAPE
    for int8, name in ((False, "OpenVINO 1x1 conv fp32"), (True, "OpenVINO 1x1 conv int8 (QDQ)")):
        kernels[name], _ = _rate(_openvino_conv(int8), 2.0 * n * c * c * h * w)
        kind = "int8" if int8 else "fp32"
        out[kind] = max(out[kind], kernels[name])
    out["best"] = {kind: max((k for k in kernels if _kind(k) == kind), key=lambda k: kernels[k])
                   for kind in ("fp32", "int8")}
    return out


def _kind(kernel: str) -> str:
    return "int8" if ("int8" in kernel or "Integer" in kernel or "_int_mm" in kernel) else "fp32"


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
    # The same engine one batch at a time (Engine.run, no streams, no prefetch): the plain one-batch pass.
    xs = [x for x, _y in split_batches(shards, manifest, "test", pred.mean, pred.std, 64, SERIAL_ROWS)]
    one_request = getattr(engine, "request", engine.run)  # OpenVINO: the single all-threads request
    t0 = time.perf_counter()
    for x in xs:
        one_request(x)
    row["serial_ips"] = sum(len(x) for x in xs) / (time.perf_counter() - t0)
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
    lines += ["", "Streamed feature pass (`Engine.stream`: OpenVINO with 2 inference streams + prefetch) vs "
              "the same engine one batch of 64 at a time (one request, the plain one-batch pass; first "
              f"{SERIAL_ROWS} test images):", "",
              "| engine | one batch at a time img/s | streamed img/s | gain |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['serial_ips']:.1f} | {r['feature_ips']:.1f} | "
                     f"{r['feature_ips'] / r['serial_ips']:.2f}x |")
    for r in rows:
        if r["ran"].endswith("int8"):
            share = gflop * r["feature_ips"] / peak["int8"]
            lines.append(f"\nTarget: {r['engine']}'s feature pass at >= "
                         f"{100 * INT8_TARGET:.0f} % of the int8 peak: {100 * share:.0f} % "
                         f"({gflop * r['feature_ips']:.0f} of "
                         f"{peak['int8']:.0f} GOP/s): {'met' if share >= INT8_TARGET else 'NOT met'}.")
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
        print(f"peak: fp32 {peak['fp32']:.0f} GFLOP/s, int8 {peak['int8']:.0f} GOP/s; "
              + ", ".join(f"{k} {v:.0f}" for k, v in peak["kernels"].items()), flush=True)
    md = "\n".join([
        "## Engines (`--backend`): feature pass, predict, accuracy, GFLOP/s",
        "",
        f"`.venv/bin/python -m benchmarks.engines --run {run}` on {machine()}; the run's model "
        f"({gflop:.2f} GFLOP per image through the features at its size), its test split "
        f"({rows[0]['test_rows']} images) and the first {len(files)} test JPEGs for predict. "
        f"Measured peak: fp32 {peak['fp32']:.0f} GFLOP/s ({peak['best']['fp32']}), int8 {peak['int8']:.0f} "
        f"GOP/s ({peak['best']['int8']}); every kernel measured (GOP/s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in peak["kernels"].items()) + ".",
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
