"""The HTTP API: predictions, every refusal as a JSON error, micro-batching, and the CLI's port check."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import sys
import threading
import tracemalloc
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.requests import Request

from catsdogs.cli import main as cli_main
from catsdogs.config import ServeConfig
from catsdogs.engines.names import DEFAULT_ENGINE, runtime_of
from catsdogs.infer.predictor import Answers, Predictor
from catsdogs.rundir import RunDir
from catsdogs.serve.app import create_app
from catsdogs.serve.backends import PredictorBackend
from catsdogs.serve.batcher import MicroBatcher
from catsdogs.serve.uploads import ApiError, read_body
from tests.fixtures import bomb_png, jpeg_bytes, synthetic_image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's notice about httpx in its TestClient
    from fastapi.testclient import TestClient

JPEG = jpeg_bytes(synthetic_image(0, 48, seed=1))


@pytest.fixture
def client(run_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(ServeConfig(run=str(run_dir)))) as c:
        yield c


def upload(data: bytes, name: str = "a.jpg", ctype: str = "image/jpeg") -> dict[str, Any]:
    return {"files": {"file": (name, data, ctype)}}


def assert_error(r: httpx.Response, status: int, error: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == error
    assert body["detail"]


def test_predict_good_jpeg(client: TestClient) -> None:
    r = client.post("/predict", **upload(JPEG))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] in ("Cat", "Dog")
    assert set(body["probabilities"]) == {"Cat", "Dog"}
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert body["probability"] == max(body["probabilities"].values())
    assert body["probabilities"][body["label"]] == body["probability"]
    # No --backend: the run's engine, the default one (int8 behind its guard, else its fp32 runtime).
    assert body["model"]["name"] == "seed" and body["model"]["backend"] in (DEFAULT_ENGINE,
                                                                            runtime_of(DEFAULT_ENGINE))
    timing = dict(item.split(";dur=") for item in r.headers["server-timing"].split(", "))
    assert set(timing) == {"decode", "infer", "app"}
    assert 0 < float(timing["decode"]) + float(timing["infer"]) <= float(timing["app"])


def test_prediction_matches_the_predictor(run_dir: Path) -> None:
    # The same engine on both sides (engines agree with each other in tests/test_engines.py).
    predictor = Predictor.from_run(run_dir, backend="torch")
    expected = predictor.predict_arrays(np.stack([predictor.decode(JPEG)]))[0]
    with TestClient(create_app(ServeConfig(run=str(run_dir), backend="torch"))) as client:
        got = client.post("/predict", **upload(JPEG)).json()["probabilities"]
    assert [got["Cat"], got["Dog"]] == pytest.approx(expected.tolist(), abs=1e-6)


@pytest.mark.parametrize(("kwargs", "status", "error"), [
    (upload(b""), 400, "empty_file"),
    ({"content": b"", "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400, "missing_file"),
    ({"content": b""}, 415, "unsupported_media_type"),
    (upload(b"<html><body>hello</body></html>", "page.html", "text/html"), 415, "unsupported_media_type"),
    (upload(b"<html><body>hello</body></html>", "page.jpg", "image/jpeg"), 400, "not_an_image"),
    (upload(JPEG[: len(JPEG) // 3]), 400, "corrupt"),
    ({"content": b'{"image": "..."}', "headers": {"content-type": "application/json"}}, 415,
     "unsupported_media_type"),
    ({"content": b"raw bytes"}, 415, "unsupported_media_type"),
    ({"data": {"other": "x"}, "files": {"not_file": ("a.jpg", JPEG, "image/jpeg")}}, 400, "missing_file"),
    ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data"}}, 400, "bad_request"),
])
def test_bad_uploads_get_json_errors_and_the_app_keeps_serving(
        client: TestClient, kwargs: dict[str, Any], status: int, error: str) -> None:
    assert_error(client.post("/predict", **kwargs), status, error)
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.post("/predict", **upload(JPEG)).status_code == 200


def test_decompression_bomb_is_refused_without_allocating_it(client: TestClient) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    r = client.post("/predict", **upload(bomb_png(30000), "bomb.png", "image/png"))
    assert_error(r, 400, "decompression_bomb")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200, f"peak memory grew {grown_mib:.0f} MiB: the 900 MB bomb was decoded"
    assert client.get("/healthz").status_code == 200


def test_max_pixels_setting_is_applied(run_dir: Path) -> None:
    with TestClient(create_app(ServeConfig(run=str(run_dir), max_pixels=48 * 48 - 1))) as c:
        assert_error(c.post("/predict", **upload(JPEG)), 400, "decompression_bomb")  # 48x48 > limit
        small = jpeg_bytes(synthetic_image(0, 40, seed=3))
        assert c.post("/predict", **upload(small)).status_code == 200


def test_body_over_max_bytes_is_413(client: TestClient) -> None:
    big = bytes(50 * 1024 * 1024)  # one 50 MiB object, sent with an honest Content-Length
    assert_error(client.post("/predict", **upload(big)), 413, "payload_too_large")
    assert client.get("/healthz").status_code == 200


def test_lying_or_chunked_bodies_are_cut_off_while_reading(run_dir: Path) -> None:
    app = create_app(ServeConfig(run=str(run_dir), max_bytes=4096))
    sent: list[int] = []

    def chunks() -> Iterator[bytes]:
        for _ in range(100):  # 100 KiB in total, far past the limit
            sent.append(1)
            yield b"\0" * 1024

    with TestClient(app) as c:
        boundary = {"content-type": "multipart/form-data; boundary=xyz"}
        assert_error(c.post("/predict", content=chunks(), headers=boundary), 413, "payload_too_large")
        lying = {**boundary, "content-length": "100"}
        assert_error(c.post("/predict", content=b"\0" * 20_000, headers=lying), 413, "payload_too_large")
        assert c.get("/healthz").status_code == 200
        assert c.post("/predict", **upload(JPEG)).status_code == 200


def streamed_request(chunks: Iterator[bytes], headers: dict[str, str] | None = None,
                     pause_s: float = 0.0) -> tuple[Request, list[int]]:
    """A POST whose body arrives as ``chunks`` (``pause_s`` apart); also the sizes the server took."""
    taken: list[int] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(pause_s)
        chunk = next(chunks, None)
        if chunk is not None:
            taken.append(len(chunk))
        return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

    scope = {"type": "http", "method": "POST", "path": "/predict",
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    return Request(scope, receive), taken


def fresh_chunks(count: int, size: int = 64 * 1024) -> Iterator[bytes]:
    return (bytes(size) for _ in range(count))  # a new object each time, as a socket gives them


def test_an_oversized_body_is_drained_without_being_kept() -> None:
    limit, count, size = 1024 * 1024, 48 * 16, 64 * 1024  # 48 MiB in 64 KiB chunks over a 1 MiB limit
    request, taken = streamed_request(fresh_chunks(count), {"content-length": str(count * size)})
    tracemalloc.start()
    try:
        with pytest.raises(ApiError) as refused:
            asyncio.run(read_body(request, limit, deadline_s=30, drain=count * size))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.status == 413 and refused.value.headers == {"Connection": "close"}
    assert sum(taken) == count * size  # read to its end, so a client still sending can read the 413
    assert peak < 4 * limit, f"{peak / 2**20:.1f} MiB held while draining {count * size / 2**20:.0f} MiB"


def test_draining_stops_at_the_drain_bound_and_the_deadline() -> None:
    limit, drain, size = 1024, 10 * 1024, 1024
    request, taken = streamed_request(fresh_chunks(1000, size))  # chunked: no Content-Length
    with pytest.raises(ApiError) as refused:
        asyncio.run(read_body(request, limit, deadline_s=30, drain=drain))
    assert refused.value.status == 413 and sum(taken) == drain + size  # the first chunk past the bound
    request, taken = streamed_request(fresh_chunks(1000, size), {"content-length": str(1000 * size)})
    with pytest.raises(ApiError) as refused:  # declared over the bound: nothing is read
        asyncio.run(read_body(request, limit, deadline_s=30, drain=drain))
    assert refused.value.status == 413 and not taken
    slow, taken = streamed_request(fresh_chunks(1000, size), pause_s=0.01)  # 10 s in all
    with pytest.raises(ApiError) as refused:
        asyncio.run(read_body(slow, limit, deadline_s=0.3, drain=2000 * size))
    assert refused.value.status == 413 and 1 < len(taken) < 1000  # too large, and cut off by the deadline


def test_batch_endpoint_reports_bad_files_individually(client: TestClient) -> None:
    files = [
        ("files", ("cat.jpg", JPEG, "image/jpeg")),
        ("files", ("empty.jpg", b"", "image/jpeg")),
        ("files", ("page.html", b"<html></html>", "text/html")),
        ("files", ("bomb.png", bomb_png(), "image/png")),
        ("files", ("dog.jpg", jpeg_bytes(synthetic_image(1, 48, seed=2)), "image/jpeg")),
    ]
    r = client.post("/predict/batch", files=files)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [o["filename"] for o in out] == ["cat.jpg", "empty.jpg", "page.html", "bomb.png", "dog.jpg"]
    assert [o.get("error") for o in out] == [None, "empty_file", "unsupported_media_type",
                                             "decompression_bomb", None]
    single = client.post("/predict", **upload(JPEG)).json()
    assert out[0]["label"] == single["label"]
    assert out[0]["probabilities"] == pytest.approx(single["probabilities"], abs=1e-6)
    r = client.post("/predict/batch", data={"x": "1"}, files={"y": ("a", b"1")})
    assert_error(r, 400, "missing_file")


def test_batch_over_max_files_is_413(run_dir: Path) -> None:
    with TestClient(create_app(ServeConfig(run=str(run_dir), max_files=2))) as c:
        files = [("files", (f"{i}.jpg", JPEG, "image/jpeg")) for i in range(3)]
        assert_error(c.post("/predict/batch", files=files), 413, "too_many_files")


def test_model_docs_page_and_report(client: TestClient, run_dir: Path) -> None:
    info = client.get("/model").json()
    assert info["classes"] == ["Cat", "Dog"] and info["size"] == 32
    assert info["metrics"] == {"val_loss": 0.6, "val_acc": 0.6}
    assert info["eval_metrics"] is None and info["report"] is False
    assert_error(client.get("/report"), 404, "no_report")
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "metrics.json").write_text(json.dumps({"accuracy": 0.75, "roc_auc": 0.8}))
    (run_dir / "eval" / "report.html").write_text("<html><body>the report</body></html>")
    info = client.get("/model").json()
    assert info["eval_metrics"] == {"accuracy": 0.75, "roc_auc": 0.8} and info["report"] is True
    r = client.get("/report")
    assert r.status_code == 200 and "the report" in r.text
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="file-input"' in page.text
    assert client.get("/static/app.js").status_code == 200
    assert_error(client.get("/missing"), 404, "not_found")


class SlowFake:
    """A backend whose 'model' sleeps and answers p(Dog) = mean pixel / 255, so answers are checkable."""

    name = "fake"
    classes = ["Cat", "Dog"]
    size = 8
    predictor = None  # no torch model behind it: nothing to explain

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def decode(self, data: bytes, max_pixels: int = 0) -> np.ndarray:
        return np.full((8, 8, 3), data[0], dtype=np.uint8)  # the first byte is the "image"

    def predict_arrays(self, images: np.ndarray, tta: bool = False) -> np.ndarray:
        with self.lock:
            self.calls.append(len(images))
        threading.Event().wait(0.05)  # a slow forward pass, so requests pile up behind it
        p = images.reshape(len(images), -1).mean(axis=1) / 255.0
        return np.stack([1 - p, p], axis=1).astype(np.float32)

    def answer(self, images: np.ndarray) -> Answers:
        probs = self.predict_arrays(images)
        return Answers(probs, np.full(len(probs), np.nan, np.float32), np.ones(len(probs), bool))

    def describe(self) -> dict[str, Any]:
        return {"name": "fake", "classes": self.classes, "size": self.size, "backend": self.name}


def test_concurrent_requests_share_forward_passes_and_get_their_own_answers(run_dir: Path) -> None:
    fake = SlowFake()
    app = create_app(ServeConfig(run=str(run_dir), max_batch=32, batch_wait_ms=5), predictor=fake)
    values = [10 * i + 5 for i in range(20)]

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                rs = await asyncio.gather(*(c.post("/predict", files={"file": ("x", bytes([v]))})
                                            for v in values))
                stats = (await c.get("/stats")).json()
        return [r.json() for r in rs], stats

    answers, stats = asyncio.run(scenario())
    for v, a in zip(values, answers, strict=True):
        assert a["probabilities"]["Dog"] == pytest.approx(v / 255.0, abs=1e-6)
        assert a["label"] == ("Dog" if v > 127.5 else "Cat")
    assert stats["items"] == len(values)
    assert stats["max_batch_seen"] > 1
    assert stats["batches"] < len(values)
    assert sum(fake.calls[1:]) == len(values)  # calls[0] is the warm-up pass


def test_batcher_runs_a_lone_request_at_once_and_propagates_failures() -> None:
    seen: list[int] = []

    def double(x: np.ndarray) -> np.ndarray:
        seen.append(len(x))
        if (x == 255).any():
            raise ValueError("model exploded")
        return x.reshape(len(x), -1)[:, :2].astype(np.float32) * 2

    async def scenario() -> None:
        b = MicroBatcher(double, max_batch=4, batch_wait_ms=10_000)
        await b.start()
        try:
            # Nothing else announced: a 10 s wait budget must not delay a lone request.
            out = await asyncio.wait_for(b.submit(np.full((2, 2, 3), 3, np.uint8)), timeout=5)
            assert out.tolist() == [6.0, 6.0]
            imgs = [np.full((2, 2, 3), i, np.uint8) for i in range(10)]
            outs = await asyncio.gather(*(b.submit(im) for im in imgs))
            assert [o[0] for o in outs] == [2.0 * i for i in range(10)]
            assert max(seen) == 4  # bounded by max_batch
            with pytest.raises(ValueError, match="exploded"):
                await b.submit(np.full((2, 2, 3), 255, np.uint8))
            assert (await b.submit(np.full((2, 2, 3), 1, np.uint8)))[0] == 2.0  # still alive
        finally:
            await b.stop()

    asyncio.run(scenario())


def test_batcher_workers_run_batches_in_parallel_and_share_the_queue() -> None:
    import threading
    import time as _time

    sizes: list[int] = []
    active = {"now": 0, "max": 0}
    lock = threading.Lock()

    def slow(x: np.ndarray) -> np.ndarray:
        with lock:
            active["now"] += 1
            active["max"] = max(active["max"], active["now"])
            sizes.append(len(x))
        _time.sleep(0.2)  # a forward pass long enough for the other worker to start its own
        with lock:
            active["now"] -= 1
        return x.reshape(len(x), -1)[:, :2].astype(np.float32)

    async def scenario() -> None:
        b = MicroBatcher(slow, max_batch=32, batch_wait_ms=0, workers=2)
        await b.start()
        try:
            imgs = [np.full((2, 2, 3), i, np.uint8) for i in range(8)]
            with b.expecting(8) as ticket:
                outs = await asyncio.gather(*(b.submit(im, ticket) for im in imgs))
            assert [int(o[0]) for o in outs] == list(range(8))  # each request gets its own row
        finally:
            await b.stop()

    asyncio.run(scenario())
    assert active["max"] == 2  # two forward passes overlapped
    assert sum(sizes) == 8 and max(sizes) <= 4  # 8 announced images split over 2 idle workers


def test_plan_workers_one_single_threaded_worker_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    from catsdogs.serve import backends

    monkeypatch.setattr(backends, "cores", lambda: 4)
    assert backends.plan_workers(ServeConfig(), "torch", on_cuda=False) == (4, 1)
    assert backends.plan_workers(ServeConfig(), "torch", on_cuda=True) == (1, 4)
    assert backends.plan_workers(ServeConfig(workers=1), "torch", on_cuda=False) == (1, 4)
    assert backends.plan_workers(ServeConfig(workers=2, threads=3), "onnx", on_cuda=False) == (2, 3)
    for name in ("onnx", "openvino", "onnx-int8", "openvino-int8"):  # one worker with every core
        assert backends.plan_workers(ServeConfig(), name, on_cuda=False) == (1, 4)


@pytest.mark.parametrize("name", ["onnx", "openvino"])
def test_engine_backends_export_on_the_fly_and_agree_with_torch(run_dir: Path, name: str) -> None:
    backend = PredictorBackend(Predictor.from_run(run_dir, backend="torch"))
    torch_probs = backend.predict_arrays(np.stack([backend.decode(JPEG)]))[0]
    assert not RunDir(run_dir).features_graph.exists()
    with TestClient(create_app(ServeConfig(run=str(run_dir), backend=name))) as c:
        body = c.post("/predict", **upload(JPEG)).json()
        assert c.get("/model").json()["backend"] == name
    assert RunDir(run_dir).features_graph.is_file()
    assert body["model"]["backend"] == name
    assert [body["probabilities"]["Cat"], body["probabilities"]["Dog"]] == pytest.approx(
        torch_probs.tolist(), abs=1e-4)


def test_port_in_use_exits_2_naming_the_flag(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = cli_main(["serve", "--run", str(run_dir), "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--port" in err and str(port) in err
    assert len(err.strip().splitlines()) == 1


def test_missing_run_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port that is free right now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli_main(["serve", "--run", str(tmp_path / "nope"), "--port", str(port)]) == 2
    assert "--run" in capsys.readouterr().err


def test_decode_threads_yield_the_cores_to_the_forward_pass(client: TestClient) -> None:
    import os

    from catsdogs.serve.app import DECODE_NICENESS

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread nice values are set on Linux only")
    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    pool = client.app.state.serving.decode_pool  # type: ignore[attr-defined]
    nice = pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    assert nice == min(19, main + DECODE_NICENESS)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main  # the caller keeps its own
    r = client.post("/predict", **upload(jpeg_bytes(synthetic_image(0))))
    assert r.status_code == 200, r.text
