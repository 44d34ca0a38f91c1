"""``catsdogs serve``: a FastAPI app that classifies uploaded photos, with a web page at ``/``.

Endpoints: ``POST /predict`` (multipart field ``file``), ``POST /predict/batch`` (field ``files``),
``GET /healthz``, ``GET /model``, ``GET /stats``, ``GET /metrics`` (Prometheus), ``GET /report`` (the
run's evaluation report) and the OpenAPI docs at ``/docs`` and ``/redoc`` (served offline). Every refusal
is JSON ``{"error": code, "detail": message}``:

* 413 ``payload_too_large``: body over ``--max-bytes`` (declared or actually sent); a body of at most
  ``--drain-bytes`` is read to its end first, so clients that send it all before reading see the 413;
* 415 ``unsupported_media_type``: body not multipart/form-data, or a part that is not an image type;
* 400 for an upload that is not a usable image: ``missing_file``, ``empty_file``, ``not_an_image``,
  ``corrupt``, ``decompression_bomb`` (pixel count over ``--max-pixels``, refused from the header
  before any pixel is allocated), ``bad_request`` (malformed multipart).

Decoding runs in a thread pool, never on the event loop; forward passes go through the
:class:`~catsdogs.serve.batcher.MicroBatcher`, so concurrent requests share one pass.
``POST /predict?explain=true`` also returns a Grad-CAM overlay (:mod:`catsdogs.infer.explain`), made by
its own forward + backward pass in a one-thread pool.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import errno
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from catsdogs import __version__
from catsdogs.config import ServeConfig, check_required, need
from catsdogs.errors import ConfigError, ImageDecodeError
from catsdogs.infer.explain import Explainer, explain_upload
from catsdogs.infer.prediction import Prediction
from catsdogs.infer.predictor import UNKNOWN, Answer
from catsdogs.rundir import RunDir
from catsdogs.runtime import cores, lower_thread_priority
from catsdogs.serve.auth import check_exposure, load_api_key
from catsdogs.serve.backends import Backend, load_backend, on_cuda, plan_workers
from catsdogs.serve.batcher import MicroBatcher
from catsdogs.serve.connections import uvicorn_config
from catsdogs.serve.disclosure import public, public_report
from catsdogs.serve.docs import create_documented_app
from catsdogs.serve.metrics import CONTENT_TYPE, METRICS_PATH, MetricsMiddleware, ServeMetrics
from catsdogs.serve.schemas import ERROR_RESPONSES, BatchItemOut, ErrorBody, PredictionOut, multipart_body
from catsdogs.serve.security import install_security
from catsdogs.serve.uploads import ApiError, Part, parse_multipart, read_body
from catsdogs.track.registry import local_run

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Decode threads: Pillow releases the GIL while decoding, so a few threads use the cores; more than
# 4 only adds contention with the forward pass on small machines.
_MAX_DECODE_THREADS = 4
DECODE_NICENESS = 10
"""Nice value added to the decode threads: under load the next batch's decodes can wait while the
forward pass runs (a preempted forward thread stalls the other at every layer) and fill its idle
moments; a lone request's decode finds the cores free, so c=1 is unchanged. Measured on 2 cores,
openvino-int8, c=16 req/s over the engine alone, runs interleaved with and without it: 0.83x mean of 8
runs (0.72-0.96x) against 0.78x mean of 6 (0.73-0.81x); the run-to-run spread is as large as the gain
(``python -m benchmarks.serve --run RUN --requests 600 --seconds 15 --threads 0 --backends
openvino-int8 --component-samples 40``)."""
EXPLAIN_SIDE = 640
"""Longest side of the overlay returned by ``/predict?explain=true``, in pixels: the page shows it at most
~600 px wide, and a full-size overlay of a 12 MP photo would be a ~20 MB base64 string."""


@dataclass
class Serving:
    """Everything the request handlers share, created in the lifespan."""

    cfg: ServeConfig
    backend: Backend
    batcher: MicroBatcher
    decode_pool: ThreadPoolExecutor
    model_info: dict[str, Any]
    explainer: Explainer | None = None
    """Grad-CAM on the backend's PyTorch model; None when the backend has none."""
    explain_pool: ThreadPoolExecutor | None = None
    """One thread: explanations run one at a time, off the event loop and outside the batcher."""
    metrics: ServeMetrics | None = None
    """Counts each answer by label for /metrics."""

    async def explain(self, part: Part, probs: dict[str, float]) -> dict[str, Any]:
        """Return the ``explanation`` field for an already classified part (its most probable class)."""
        if self.explainer is None or self.explain_pool is None:
            raise ApiError(501, "explain_unavailable", f"backend {self.backend.name} has no PyTorch model "
                                                       f"to explain; drop explain=true")
        label = max(probs, key=probs.__getitem__)
        target = self.backend.classes.index(label)
        loop = asyncio.get_running_loop()
        png, width, height = await loop.run_in_executor(
            self.explain_pool, explain_upload, self.explainer, part.data, target, self.cfg.max_pixels,
            EXPLAIN_SIDE)
        return {"label": label, "overlay_png": base64.b64encode(png).decode("ascii"),
                "width": width, "height": height}

    async def decode(self, data: bytes) -> np.ndarray:
        """Decode upload bytes in the thread pool; a bad image becomes a 400 ApiError."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.decode_pool, self.backend.decode, data,
                                              self.cfg.max_pixels)
        except ImageDecodeError as exc:
            raise ApiError(400, exc.reason, exc.detail or exc.reason) from None

    def result(self, answer: Answer) -> dict[str, Any]:
        """One image's response fields (label ``unknown`` when rejected), as predict and the API give them."""
        fields = Prediction(path="", answer=answer, classes=self.backend.classes).fields()
        if self.metrics is not None:
            self.metrics.answered(fields["label"])
        return fields

    async def classify(self, part: Part, timing: dict[str, float] | None = None) -> dict[str, Any]:
        """Check, decode and classify one uploaded part; add the seconds spent to ``timing``."""
        with self.batcher.expecting(1) as ticket:
            part.check_image_type()
            t0 = time.perf_counter()
            image = await self.decode(part.data)
            t1 = time.perf_counter()
            answer = await self.batcher.submit(image, ticket)
            if timing is not None:
                timing["decode"] = timing.get("decode", 0.0) + t1 - t0
                timing["infer"] = timing.get("infer", 0.0) + time.perf_counter() - t1
            return self.result(answer)


def server_timing(timing: dict[str, float], start: float) -> str:
    """Format a ``Server-Timing`` header (milliseconds): decode, infer (queue + forward), app total."""
    items = {**timing, "app": time.perf_counter() - start}
    return ", ".join(f"{k};dur={1000 * v:.3f}" for k, v in items.items())


def run_folder(cfg: ServeConfig) -> RunDir:
    """The run folder of --run (the folder itself, or the folder holding a .pt file)."""
    return RunDir.from_arg(need(cfg, "run"))


def eval_metrics(cfg: ServeConfig) -> dict[str, Any] | None:
    """Read RUN/eval/metrics.json written by ``catsdogs evaluate`` (None if absent or unreadable)."""
    path = run_folder(cfg).eval_metrics
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    data.pop("model", None)  # the same facts are in the response's own model section
    return data


def _error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


def create_app(cfg: ServeConfig, predictor: Backend | None = None) -> FastAPI:
    """Build the app; the model is ``predictor`` or loaded once from ``cfg.run`` in the lifespan."""
    metrics = ServeMetrics()
    app = create_documented_app(
        title="catsdogs", version=__version__, lifespan=_lifespan(cfg, predictor, metrics),
        description="Classify photos with a trained catsdogs run. Upload an image as multipart "
                    "form field `file` (or several as `files` for /predict/batch).")
    _add_error_handlers(app)
    install_security(app, cfg)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.router.routes)  # outermost
    _prediction_routes(app, cfg)
    _info_routes(app, cfg, metrics)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/index.html", include_in_schema=False)
    async def index_html() -> RedirectResponse:
        return RedirectResponse("/")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _lifespan(cfg: ServeConfig, predictor: Backend | None, metrics: ServeMetrics
              ) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifespan: load and warm the model, start the batcher and pools; stop them at the end."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backend = predictor if predictor is not None else load_backend(cfg)
        # Warm up once so the first request does not pay lazy initialisation.
        backend.predict_arrays(np.zeros((1, backend.size, backend.size, 3), dtype=np.uint8))
        workers, _threads = plan_workers(cfg, backend.name, on_cuda(backend))
        batcher = MicroBatcher(backend.answer, cfg.max_batch, cfg.batch_wait_ms, workers)
        pool = ThreadPoolExecutor(max_workers=min(_MAX_DECODE_THREADS, cores() + 1),
                                  thread_name_prefix="decode", initializer=lower_thread_priority,
                                  initargs=(DECODE_NICENESS,))
        desc = backend.describe()
        info = {k: desc.get(k) for k in ("name", "backend", "size", "epoch")}
        explainer = Explainer(backend.predictor) if backend.predictor is not None else None
        explain_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explain")
        await batcher.start()
        metrics.model_loaded(desc, backend.name, backend.classes, UNKNOWN)
        metrics.watch(batcher)
        app.state.serving = Serving(cfg=cfg, backend=backend, batcher=batcher, decode_pool=pool,
                                    model_info=info, explainer=explainer, explain_pool=explain_pool,
                                    metrics=metrics)
        try:
            yield
        finally:
            metrics.watch(None)
            await batcher.stop()
            pool.shutdown(wait=False, cancel_futures=True)
            explain_pool.shutdown(wait=False, cancel_futures=True)

    return lifespan


def _prediction_routes(app: FastAPI, cfg: ServeConfig) -> None:
    """``POST /predict`` and ``POST /predict/batch``."""

    async def read_parts(request: Request) -> list[Part]:
        body = await read_body(request, cfg.max_bytes, cfg.body_timeout_s, cfg.drain_bytes)
        return parse_multipart(body, request.headers.get("content-type", ""))

    @app.post("/predict", response_model=PredictionOut, responses=ERROR_RESPONSES,
              openapi_extra=multipart_body("file", many=False))
    async def predict(request: Request, explain: bool = False) -> JSONResponse:
        """Classify one image sent as multipart field ``file``; ``explain=true`` adds a heatmap overlay."""
        start = time.perf_counter()
        serving: Serving = request.app.state.serving
        parts = [p for p in await read_parts(request) if p.name == "file"]
        if not parts:
            raise ApiError(400, "missing_file", "send the image as multipart form field 'file'")
        timing: dict[str, float] = {}
        out = await serving.classify(parts[0], timing)
        out["model"] = serving.model_info
        if explain:
            t0 = time.perf_counter()
            out["explanation"] = await serving.explain(parts[0], out["probabilities"])
            timing["explain"] = time.perf_counter() - t0
        return JSONResponse(out, headers={"Server-Timing": server_timing(timing, start)})

    @app.post("/predict/batch", response_model=list[BatchItemOut], responses=ERROR_RESPONSES,
              openapi_extra=multipart_body("files", many=True))
    async def predict_batch(request: Request) -> JSONResponse:
        """Classify several images (multipart field ``files``); a bad file gets an error entry."""
        serving: Serving = request.app.state.serving
        parts = [p for p in await read_parts(request) if p.name in ("files", "file")]
        if not parts:
            raise ApiError(400, "missing_file", "send the images as multipart form field 'files'")
        if len(parts) > cfg.max_files:
            raise ApiError(413, "too_many_files", f"{len(parts)} files exceed --max-files={cfg.max_files}")

        async def one(part: Part) -> dict[str, Any]:
            try:
                return {"filename": part.filename, **await serving.classify(part)}
            except ApiError as exc:
                return {"filename": part.filename, "error": exc.error, "detail": exc.detail}

        return JSONResponse(list(await asyncio.gather(*(one(p) for p in parts))))


def _info_routes(app: FastAPI, cfg: ServeConfig, metrics: ServeMetrics) -> None:
    """``/healthz``, ``/model``, ``/stats``, ``/metrics`` and ``/report``."""

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        """Liveness and readiness: the model is loaded and the batcher runs."""
        serving: Serving = request.app.state.serving
        return {"status": "ok", "backend": serving.backend.name}

    @app.get("/model")
    async def model(request: Request) -> dict[str, Any]:
        """Model facts: classes, input size, checkpoint metrics and RUN/eval/metrics.json if present."""
        serving: Serving = request.app.state.serving
        desc = serving.backend.describe()
        report = run_folder(cfg).report
        return public({**desc, "tta": desc.get("inference", {}).get("tta"), "eval_metrics": eval_metrics(cfg),
                       "report": report.is_file(),
                       "batching": {"max_batch": cfg.max_batch, "batch_wait_ms": cfg.batch_wait_ms},
                       "limits": {"max_bytes": cfg.max_bytes, "max_pixels": cfg.max_pixels,
                                  "max_files": cfg.max_files}})

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, Any]:
        """Micro-batching counters: number of forward passes and their batch sizes, forward workers."""
        batcher = request.app.state.serving.batcher
        return {**batcher.stats.as_dict(), "workers": batcher.workers, "threads": torch.get_num_threads()}

    @app.get(METRICS_PATH, response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def prometheus_metrics() -> Response:
        """Prometheus metrics: requests and latency per route and status, answers per label, batches."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/report", include_in_schema=True, response_model=None,
             responses={200: {"content": {"text/html": {}}, "description": "The HTML report"},
                        404: {"model": ErrorBody, "description": "No report yet (no_report)"}})
    async def report() -> HTMLResponse | JSONResponse:
        """The run's HTML evaluation report (RUN/eval/report.html), or 404 if not evaluated yet."""
        path = run_folder(cfg).report
        try:
            page = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return _error(404, "no_report", "this run has no evaluation report yet; run 'catsdogs evaluate' "
                                            "on it to write one")
        return HTMLResponse(public_report(page))  # the paths it records, as names


def _add_error_handlers(app: FastAPI) -> None:
    """Make every error a JSON ``{"error", "detail"}`` body."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        response = _error(exc.status, exc.error, exc.detail)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        names = {404: "not_found", 405: "method_not_allowed"}
        response = _error(exc.status_code, names.get(exc.status_code, "http_error"), str(exc.detail))
        response.headers.update(exc.headers or {})  # e.g. Allow on 405, as RFC 9110 requires
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid_request", str(exc.errors()))


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` now (uvicorn then serves on this socket); a busy port is a ConfigError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve --host {host!r}: {exc}") from None
    family, kind, proto, _, addr = infos[0]
    # proto must be IPPROTO_TCP (not 0): asyncio only sets TCP_NODELAY on such sockets, and without
    # it a response written in two parts waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does; still refuses a live one
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is already in use; choose another with --port"
                              ) from None
        raise ConfigError(f"cannot bind {host}:{port} ({exc.strerror}); fix --host or --port") from None
    return sock


@contextmanager
def _clean_sigterm() -> Iterator[None]:
    """Make SIGTERM end the server with exit 0 once uvicorn has let requests in flight finish.

    uvicorn answers SIGTERM with its graceful shutdown, then raises the signal again under the handler
    it found. The default one killed the process (status -15, no "stopped" line) outside a container and
    is ignored by PID 1 inside one; a handler that does nothing makes both a clean exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only; uvicorn installs no handler here either
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(cfg: ServeConfig) -> int:
    """Run ``catsdogs serve``: bind the port, load the model, serve until interrupted or SIGTERM."""
    check_required(cfg)
    check_exposure(cfg, load_api_key(cfg))  # an open API on a public address stops here, before binding
    # models:/ or runs:/ -> a downloaded run folder, once: the report and metrics routes read it too.
    cfg = dataclasses.replace(cfg, run=local_run(need(cfg, "run"), cfg.tracking_uri))
    sock = bind_socket(cfg.host, cfg.port)
    try:
        backend = load_backend(cfg)  # a bad --run fails here with one line, before serving
        app = create_app(cfg, backend)
        server = uvicorn.Server(uvicorn_config(app, cfg))
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        print(f"catsdogs serve: http://{host}:{cfg.port}/ (model {backend.describe().get('name')}, "
              f"backend {backend.name}, API docs at /docs)", file=sys.stderr, flush=True)
        try:
            with _clean_sigterm():
                server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
            pass
    finally:
        sock.close()
    print("catsdogs serve: stopped", file=sys.stderr)
    return 0 if server.started else 1
