"""``catsdogs serve``: a FastAPI app that classifies uploaded photos, with a web page at ``/``.

Endpoints: ``POST /predict`` (multipart field ``file``), ``POST /predict/batch`` (field ``files``),
``GET /healthz``, ``GET /model``, ``GET /stats``, ``GET /report`` (the run's evaluation report) and
the OpenAPI docs at ``/docs``. Every refusal is JSON ``{"error": code, "detail": message}``:

* 413 ``payload_too_large``: body over ``--max-bytes`` (declared or actually sent);
* 415 ``unsupported_media_type``: body not multipart/form-data, or a part that is not an image type;
* 400 for an upload that is not a usable image: ``missing_file``, ``empty_file``, ``not_an_image``,
  ``corrupt``, ``decompression_bomb`` (pixel count over ``--max-pixels``, refused from the header
  before any pixel is allocated), ``bad_request`` (malformed multipart).

Decoding runs in a thread pool, never on the event loop; forward passes go through the
:class:`~catsdogs.serve.batcher.MicroBatcher`, so concurrent requests share one pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import socket
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from catsdogs import __version__
from catsdogs.config import ServeConfig, check_required
from catsdogs.errors import ConfigError, ImageDecodeError
from catsdogs.rundir import RunDir
from catsdogs.runtime import cores
from catsdogs.serve.backends import Backend, load_backend, on_cuda, plan_workers
from catsdogs.serve.batcher import MicroBatcher
from catsdogs.serve.uploads import ApiError, Part, parse_multipart, read_body
from catsdogs.track.registry import local_run

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Decode threads: Pillow releases the GIL while decoding, so a few threads use the cores; more than
# 4 only adds contention with the forward pass on small machines.
_MAX_DECODE_THREADS = 4


class ErrorBody(BaseModel):
    """A refused request."""

    error: str
    detail: str


class PredictionOut(BaseModel):
    """The prediction for one image."""

    label: str
    probability: float
    probabilities: dict[str, float]
    model: dict[str, Any]


class BatchItemOut(BaseModel):
    """One file of a batch: a prediction, or the error that file got."""

    filename: str | None = None
    label: str | None = None
    probability: float | None = None
    probabilities: dict[str, float] | None = None
    error: str | None = None
    detail: str | None = None


def _multipart_body(field: str, many: bool) -> dict[str, Any]:
    """OpenAPI requestBody for hand-parsed multipart uploads (shown as a file picker in /docs)."""
    binary: dict[str, Any] = {"type": "string", "format": "binary"}
    prop = {"type": "array", "items": binary} if many else binary
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [field], "properties": {field: prop}}}}}}


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in (
        (400, "Not a usable image (empty_file, not_an_image, corrupt, decompression_bomb, missing_file)"),
        (413, "Body larger than --max-bytes, or too many files"),
        (415, "Body is not multipart/form-data, or the part is not an image type"),
    )
}


@dataclass
class Serving:
    """Everything the request handlers share, created in the lifespan."""

    cfg: ServeConfig
    backend: Backend
    batcher: MicroBatcher
    decode_pool: ThreadPoolExecutor
    model_info: dict[str, Any]

    async def decode(self, data: bytes) -> np.ndarray:
        """Decode upload bytes in the thread pool; a bad image becomes a 400 ApiError."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.decode_pool, self.backend.decode, data,
                                              self.cfg.max_pixels)
        except ImageDecodeError as exc:
            raise ApiError(400, exc.reason, exc.detail or exc.reason) from None

    def result(self, probs: np.ndarray) -> dict[str, Any]:
        """Turn one probability row into the response fields."""
        best = int(np.argmax(probs))
        classes = self.backend.classes
        return {"label": classes[best], "probability": float(probs[best]),
                "probabilities": {c: float(p) for c, p in zip(classes, probs, strict=True)}}

    async def classify(self, part: Part, timing: dict[str, float] | None = None) -> dict[str, Any]:
        """Check, decode and classify one uploaded part; add the seconds spent to ``timing``."""
        with self.batcher.expecting(1) as ticket:
            part.check_image_type()
            t0 = time.perf_counter()
            image = await self.decode(part.data)
            t1 = time.perf_counter()
            probs = await self.batcher.submit(image, ticket)
            if timing is not None:
                timing["decode"] = timing.get("decode", 0.0) + t1 - t0
                timing["infer"] = timing.get("infer", 0.0) + time.perf_counter() - t1
            return self.result(probs)


def server_timing(timing: dict[str, float], start: float) -> str:
    """Format a ``Server-Timing`` header (milliseconds): decode, infer (queue + forward), app total."""
    items = {**timing, "app": time.perf_counter() - start}
    return ", ".join(f"{k};dur={1000 * v:.3f}" for k, v in items.items())


def run_folder(cfg: ServeConfig) -> RunDir:
    """The run folder of --run (the folder itself, or the folder holding a .pt file)."""
    return RunDir.from_arg(cfg.run)


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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backend = predictor if predictor is not None else load_backend(cfg)
        # Warm up once so the first request does not pay lazy initialisation.
        backend.predict_arrays(np.zeros((1, backend.size, backend.size, 3), dtype=np.uint8))
        workers, _threads = plan_workers(cfg, on_cuda(backend))
        batcher = MicroBatcher(partial(backend.predict_arrays, tta=cfg.tta), cfg.max_batch,
                               cfg.batch_wait_ms, workers)
        pool = ThreadPoolExecutor(max_workers=min(_MAX_DECODE_THREADS, cores() + 1),
                                  thread_name_prefix="decode")
        desc = backend.describe()
        info = {k: desc.get(k) for k in ("name", "backend", "size", "epoch")}
        await batcher.start()
        app.state.serving = Serving(cfg=cfg, backend=backend, batcher=batcher, decode_pool=pool,
                                    model_info=info)
        try:
            yield
        finally:
            await batcher.stop()
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="catsdogs", version=__version__, lifespan=lifespan,
                  description="Classify photos with a trained catsdogs run. Upload an image as multipart "
                              "form field `file` (or several as `files` for /predict/batch).")
    _add_error_handlers(app)

    async def read_parts(request: Request) -> list[Part]:
        body = await read_body(request, cfg.max_bytes)
        return parse_multipart(body, request.headers.get("content-type", ""))

    @app.post("/predict", response_model=PredictionOut, responses=_ERRORS,
              openapi_extra=_multipart_body("file", many=False))
    async def predict(request: Request) -> JSONResponse:
        """Classify one image sent as multipart field ``file``."""
        start = time.perf_counter()
        serving: Serving = request.app.state.serving
        parts = [p for p in await read_parts(request) if p.name == "file"]
        if not parts:
            raise ApiError(400, "missing_file", "send the image as multipart form field 'file'")
        timing: dict[str, float] = {}
        out = await serving.classify(parts[0], timing)
        out["model"] = serving.model_info
        return JSONResponse(out, headers={"Server-Timing": server_timing(timing, start)})

    @app.post("/predict/batch", response_model=list[BatchItemOut], responses=_ERRORS,
              openapi_extra=_multipart_body("files", many=True))
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

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        """Liveness and readiness: the model is loaded and the batcher runs."""
        serving: Serving = request.app.state.serving
        return {"status": "ok", "backend": serving.backend.name, "version": __version__}

    @app.get("/model")
    async def model(request: Request) -> dict[str, Any]:
        """Model facts: classes, input size, checkpoint metrics and RUN/eval/metrics.json if present."""
        serving: Serving = request.app.state.serving
        desc = serving.backend.describe()
        report = run_folder(cfg).report
        return {**desc, "tta": cfg.tta, "eval_metrics": eval_metrics(cfg), "report": report.is_file(),
                "batching": {"max_batch": cfg.max_batch, "batch_wait_ms": cfg.batch_wait_ms},
                "limits": {"max_bytes": cfg.max_bytes, "max_pixels": cfg.max_pixels,
                           "max_files": cfg.max_files}}

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, Any]:
        """Micro-batching counters: number of forward passes and their batch sizes, forward workers."""
        batcher = request.app.state.serving.batcher
        return {**batcher.stats.as_dict(), "workers": batcher.workers, "threads": torch.get_num_threads()}

    @app.get("/report", include_in_schema=True, response_model=None)
    async def report() -> FileResponse | JSONResponse:
        """The run's HTML evaluation report (RUN/eval/report.html), or 404 if not evaluated yet."""
        path = run_folder(cfg).report
        if not path.is_file():
            return _error(404, "no_report", f"{path} does not exist yet; run 'catsdogs evaluate --run "
                                            f"{cfg.run}' to write it")
        return FileResponse(path, media_type="text/html")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/index.html", include_in_schema=False)
    async def index_html() -> RedirectResponse:
        return RedirectResponse("/")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Make every error a JSON ``{"error", "detail"}`` body."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.error, exc.detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        names = {404: "not_found", 405: "method_not_allowed"}
        return _error(exc.status_code, names.get(exc.status_code, "http_error"), str(exc.detail))

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


def main(cfg: ServeConfig) -> int:
    """Run ``catsdogs serve``: bind the port, load the model, serve until interrupted."""
    import uvicorn

    check_required(cfg)
    # models:/ or runs:/ -> a downloaded run folder, once: the report and metrics routes read it too.
    cfg = dataclasses.replace(cfg, run=local_run(cfg.run, cfg.tracking_uri))
    sock = bind_socket(cfg.host, cfg.port)
    try:
        backend = load_backend(cfg)  # a bad --run fails here with one line, before serving
        app = create_app(cfg, backend)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                               timeout_graceful_shutdown=5))
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        print(f"catsdogs serve: http://{host}:{cfg.port}/ (model {backend.describe().get('name')}, "
              f"backend {backend.name}, API docs at /docs)", file=sys.stderr, flush=True)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
            pass
    finally:
        sock.close()
    print("catsdogs serve: stopped", file=sys.stderr)
    return 0 if server.started else 1
