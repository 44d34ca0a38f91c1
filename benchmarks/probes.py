"""Small measurements behind comments and docs of issues 23 and 26, each against what it replaced.

``pinning``: two processes, each running one single-thread OpenVINO engine, with the CPU plugin's
default thread pinning and without it, against one alone. ``pixels``: the flat-image check
(``models.ood.pixel_spread``) and the preprocess pixel sums (``preprocess.task.pixel_sums``) on real
PetImages photos decoded at 260 px, each against the implementation it replaced (kept here as the
reference and checked equal). ``openvino --graph G``: one int8 (or fp32) feature graph under the stream
and request-size settings that were tried (``G``: a run's ``engine/features-int8.onnx``).
``layers --graph G``: where the int8 graph's time goes, by kind of layer (OpenVINO's per-layer
counters), each kind's GOP/s against the machine's measured int8 peaks (``benchmarks.engines``).
``predict-steps PREDICT-ARGS``: the time of each step of ``catsdogs predict ... --master M``.

    .venv/bin/python -m benchmarks.probes [pinning] [pixels]
    .venv/bin/python -m benchmarks.probes openvino layers --graph RUN/engine/features-int8.onnx
    .venv/bin/python -m benchmarks.probes predict-steps PHOTOS --run RUN --output OUT.csv --master 'local[2]'
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks._common import REAL_DATA, heavy_lock, machine

PIN_SECONDS = 6.0
"""Seconds each process of the pinning probe runs its loop."""
PHOTOS = 256
"""Real photos decoded for the pixel probes (half cats, half dogs)."""
SIZE = 260
"""The default preset's image size."""


def _pin_worker(pin: str) -> None:
    """One process of the pinning probe: a conv stack on one OpenVINO thread, iterations/s printed."""
    import openvino as ov
    import torch

    torch.manual_seed(0)
    layers = [torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU()) for _ in range(8)]
    x = torch.randn(8, 64, 56, 56)
    model = ov.convert_model(torch.nn.Sequential(*layers).eval(), example_input=x)
    props: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 1}
    if pin != "default":
        props["ENABLE_CPU_PINNING"] = pin == "on"
    request = ov.Core().compile_model(model, "CPU", props).create_infer_request()
    xn = x.numpy()
    request.infer({0: xn})
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < PIN_SECONDS:
        request.infer({0: xn})
        n += 1
    print(f"{n / (time.perf_counter() - t0):.1f}", flush=True)


def pinning() -> list[str]:
    """it/s of one-thread engines: alone, and two processes at once, pinned (OpenVINO's default) or not."""
    cmd = [sys.executable, "-m", "benchmarks.probes", "_pin"]
    rows = []
    for pin in ("on", "off"):
        alone = subprocess.run([*cmd, pin], capture_output=True, text=True, check=True).stdout.split()[-1]
        procs = [subprocess.Popen([*cmd, pin], stdout=subprocess.PIPE, text=True) for _ in range(2)]
        pair = [p.communicate()[0].split()[-1] for p in procs]
        rows.append(f"| {pin} | {alone} | {' / '.join(pair)} |")
    return ["| ENABLE_CPU_PINNING | it/s alone | it/s each, two processes at once |", "|---|---|---|", *rows]


def _spread_before(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32).reshape(len(images), -1, images.shape[-1])
    return x.std(axis=1).max(axis=1).astype(np.float64)


def _sums_before(images: list[np.ndarray], chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    counts = np.zeros((3, 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        x = np.stack(images[start:start + chunk]).reshape(-1, 3)
        for c in range(3):
            counts[c] += np.bincount(x[:, c], minlength=256)
    values = np.arange(256, dtype=np.int64)
    return counts @ values, counts @ (values * values)


def _best_of(fn: Callable[[], object], rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def pixels() -> list[str]:
    """ms per image of the flat-image check and the pixel sums, before and after, on real photos."""
    from catsdogs.models.ood import pixel_spread
    from catsdogs.models.transforms import load_image
    from catsdogs.preprocess.task import pixel_sums

    files = [p for cls in ("Cat", "Dog") for p in sorted((REAL_DATA / cls).glob("*.jpg"))[: PHOTOS // 2]]
    images = [load_image(p.read_bytes(), SIZE, "stretch") for p in files]
    stack = np.stack(images)
    # Both sum in float32, in another order: each stays within 0.1 % of the float64 value.
    exact = stack.reshape(len(stack), -1, 3).astype(np.float64).std(axis=1).max(axis=1)
    for spread in (pixel_spread(stack), _spread_before(stack)):
        np.testing.assert_allclose(spread, exact, rtol=1e-3)
    assert all(np.array_equal(a, b) for a, b in zip(pixel_sums(images), _sums_before(images), strict=True))
    per = 1000 / len(images)
    return [
        f"| step ({len(images)} real photos at {SIZE} px) | before, ms/image | after, ms/image |",
        "|---|---|---|",
        f"| flat-image check (`pixel_spread`) | {per * _best_of(lambda: _spread_before(stack)):.2f} | "
        f"{per * _best_of(lambda: pixel_spread(stack)):.2f} |",
        f"| pixel sums (`pixel_sums`) | {per * _best_of(lambda: _sums_before(images)):.2f} | "
        f"{per * _best_of(lambda: pixel_sums(images)):.2f} |",
    ]


def openvino(graph: Path) -> list[str]:
    """images/s of ``graph`` under each tried setting (streams, threads, images per request)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(graph))
    x = np.random.default_rng(0).standard_normal((64, 3, SIZE, SIZE)).astype(np.float32)
    rows = ["| streams | threads | images per request | precision hint | images/s |", "|---|---|---|---|---|"]
    for streams, chunk, precision in ((2, 4, "f32"), (2, 8, "f32"), (2, 16, "f32"), (2, 32, "f32"),
                                      (1, 8, "f32"), (1, 32, "f32"), (2, 8, "bf16")):
        compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": streams,
                                                     "INFERENCE_NUM_THREADS": 2,
                                                     "INFERENCE_PRECISION_HINT": precision})
        queue = ov.AsyncInferQueue(compiled, streams)
        chunks = [np.ascontiguousarray(x[i:i + chunk]) for i in range(0, len(x), chunk)]
        for c in chunks:
            queue.start_async({0: c}, share_inputs=True)
        queue.wait_all()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < PIN_SECONDS:
            for c in chunks:
                queue.start_async({0: c}, share_inputs=True)
                n += len(c)
        queue.wait_all()
        rows.append(f"| {streams} | 2 | {chunk} | {precision} | {n / (time.perf_counter() - t0):.1f} |")
    return rows


LAYER_BATCH = 16
"""Images per request of the layers probe (the feature pass's two 8-image streams, as one request)."""
LAYER_REPEATS = 5


def _conv_ops(graph: Path) -> dict[str, float]:
    """Operations (2 per multiply-add) of one image in the convolutions of ``graph``, by kind."""
    from catsdogs.engines.openvino_runtime import shared_core

    model = shared_core().read_model(str(graph))
    model.reshape([1, 3, SIZE, SIZE])
    ops: dict[str, float] = {}
    for node in model.get_ordered_ops():
        kind = node.get_type_name()
        if kind not in ("Convolution", "GroupConvolution"):
            continue
        w = list(node.input(1).get_shape())  # [out, in, kh, kw]; grouped: [groups, out, in, kh, kw]
        h, wd = list(node.output(0).get_shape())[2:]
        per_output = int(np.prod(w[-3:]))  # multiply-adds of one output value
        outputs = (w[0] * w[1] if kind == "GroupConvolution" else w[0]) * h * wd
        name = "depthwise" if kind == "GroupConvolution" else ("1x1" if w[-2:] == [1, 1] else "stem (3x3)")
        ops[name] = ops.get(name, 0.0) + 2.0 * per_output * outputs
    return ops


def layers(graph: Path) -> list[str]:
    """Time and GOP/s of each kind of layer of ``graph`` (one all-core request of LAYER_BATCH images)."""
    from benchmarks.engines import peak_gops
    from catsdogs.engines.openvino_runtime import compile_config, shared_core
    from catsdogs.runtime import cores

    ops = _conv_ops(graph)
    core = shared_core()
    compiled = core.compile_model(core.read_model(str(graph)), "CPU",
                                  compile_config("LATENCY", cores(), PERF_COUNT=True))
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal((LAYER_BATCH, 3, SIZE, SIZE)).astype(np.float32)
    request.infer({0: x})
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    for _ in range(LAYER_REPEATS):
        request.infer({0: x}, share_inputs=True)
        for p in request.profiling_info:
            kind = ("1x1" if "1x1" in p.exec_type else "depthwise" if "_dw_" in p.exec_type else "stem (3x3)"
                    if p.node_type == "Convolution" else f"other ({p.node_type})")
            seconds[kind] = seconds.get(kind, 0.0) + p.real_time.total_seconds() / LAYER_REPEATS
    wall = (time.perf_counter() - t0) / LAYER_REPEATS
    peak = peak_gops()
    conv_peak = peak["kernels"]["OpenVINO 1x1 conv int8 (QDQ)"]
    total = sum(seconds.values())
    rows = [f"{LAYER_BATCH} images per request, {cores()} threads: {LAYER_BATCH / wall:.1f} images/s "
            f"({sum(ops.values()) / 1e9:.2f} GOP per image); int8 peak {peak['int8']:.0f} GOP/s "
            f"({peak['best']['int8']}), OpenVINO int8 1x1 conv {conv_peak:.0f} GOP/s.", "",
            "| layers | share of time | GOP per image | GOP/s | % of the int8 peak |",
            "|---|---|---|---|---|"]
    for kind, sec in sorted(seconds.items(), key=lambda kv: -kv[1]):
        if sec / total < 0.005:
            continue
        gop = ops.get(kind, 0.0) / 1e9
        rate = gop * LAYER_BATCH / sec if gop else 0.0
        rows.append(f"| {kind} | {100 * sec / total:.1f} % | {gop:.2f} | "
                    + (f"{rate:.0f} | {100 * rate / peak['int8']:.0f} % |" if gop else "- | - |"))
    return rows


def predict_steps(args: list[str]) -> list[str]:
    """Seconds of each step of ``catsdogs predict ARGS --master ...`` (cluster/predict.main), timestamped."""
    from contextlib import contextmanager

    import catsdogs.cluster.predict as cp
    from catsdogs.cli import build_parser, resolve

    t0 = time.perf_counter()
    marks: list[tuple[str, float]] = []

    def mark(what: str) -> None:
        marks.append((what, time.perf_counter() - t0))

    def timed(name: str, fn: Callable) -> Callable:
        def run(*a: object, **k: object) -> object:
            mark(f"{name} start")
            out = fn(*a, **k)
            mark(f"{name} done")
            return out
        return run

    session = cp.spark_session

    @contextmanager
    def timed_session(*a: object, **k: object):  # noqa: ANN202 - a context manager
        mark("session start")
        with session(*a, **k) as spark:
            mark("session up (JVM, executor import check)")
            yield spark
        mark("session stopped")

    cp.spark_session = timed_session
    cp.load_predictor = timed("load predictor", cp.load_predictor)
    cp.run_job = timed("job", cp.run_job)
    cp.parts.merge = timed("merge the parts", cp.parts.merge)
    ship = cp.Shipment.predictor
    cp.Shipment.predictor = timed("ship (driver engine build)", ship)  # type: ignore[method-assign]
    cp.main(resolve("predict", build_parser().parse_args(["predict", *args])))
    return ["| step | at s |", "|---|---|", *(f"| {what} | {at:.2f} |" for what, at in marks)]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["_pin"]:
        _pin_worker(args[1])
        return 0
    if args[:1] == ["predict-steps"]:  # the rest are catsdogs predict's own arguments
        with heavy_lock():
            print("\n".join(predict_steps(args[1:])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("probes", nargs="*", choices=["pinning", "pixels", "openvino", "layers"], default=[])
    parser.add_argument("--graph", default="", help="feature graph for the openvino probe")
    opts = parser.parse_args(args)
    chosen = opts.probes or ["pinning", "pixels"] + (["openvino"] if opts.graph else [])
    with heavy_lock():
        print(f"`.venv/bin/python -m benchmarks.probes {' '.join(args)}` ({machine()})\n")
        for name in chosen:
            if name == "pixels" and not REAL_DATA.is_dir():
                print(f"real data not found at {REAL_DATA}; skipping pixels", file=sys.stderr)
                continue
            if name in ("openvino", "layers") and not opts.graph:
                parser.error(f"{name} needs --graph RUN/engine/features-int8.onnx")
            lines = {"pinning": pinning, "pixels": pixels, "openvino": openvino, "layers": layers}[name](
                *((Path(opts.graph),) if name in ("openvino", "layers") else ()))
            print("\n".join(lines) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
