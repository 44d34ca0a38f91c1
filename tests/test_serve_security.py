"""``catsdogs serve`` on a network: API key, per-client limits, security headers, no disclosure, slow
clients, and a schemathesis run against the live server's own OpenAPI schema."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastapi
import httpx
import numpy as np
import pydantic
import pytest
import starlette
import torch
import uvicorn

from catsdogs.cli import main as cli_main
from catsdogs.config import ServeConfig
from catsdogs.errors import ConfigError
from catsdogs.infer.predictor import Answers
from catsdogs.serve.app import create_app
from catsdogs.serve.auth import API_KEY_ENV, check_exposure, load_api_key
from tests.fixtures import jpeg_bytes, make_run, make_shards, synthetic_image
from tests.live import live_server

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's notice about httpx in its TestClient
    from fastapi.testclient import TestClient

KEY = "k3y-for-tests-0123456789abcdef"
JPEG = jpeg_bytes(synthetic_image(0, 48, seed=1))
LIBRARY_VERSIONS = {"fastapi": fastapi.__version__, "starlette": starlette.__version__,
                    "uvicorn": uvicorn.__version__, "pydantic": pydantic.VERSION,
                    "torch": torch.__version__.split("+")[0]}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("secured") / "myrun")


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "api.key"
    path.write_text(KEY + "\n")
    return path


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(data: bytes = JPEG) -> dict[str, Any]:
    return {"files": {"file": ("a.jpg", data, "image/jpeg")}}


def assert_error(r: httpx.Response, status: int, error: str) -> dict[str, str]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == error and body["detail"]
    return body


# ----------------------------------------------------------------------------------- authentication


def test_key_is_required_except_for_health_page_and_docs(run: Path, key_file: Path) -> None:
    with TestClient(create_app(ServeConfig(run=str(run), api_key_file=str(key_file)))) as c:
        for method, url, kwargs in (("POST", "/predict", upload()), ("GET", "/model", {}),
                                    ("GET", "/stats", {}), ("GET", "/report", {}),
                                    ("GET", "/no-such-page", {})):
            assert_error(c.request(method, url, **kwargs), 401, "unauthorized")
            r = c.request(method, url, headers=bearer("wrong-key-0123456789abcdef"), **kwargs)
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"].startswith("Bearer")
            no_scheme = {"Authorization": KEY}
            assert_error(c.request(method, url, headers=no_scheme, **kwargs), 401, "unauthorized")
        r = c.post("/predict", headers=bearer(), **upload())
        assert r.status_code == 200 and r.json()["label"] in ("Cat", "Dog")
        assert c.get("/model", headers=bearer()).status_code == 200
        assert c.get("/model", headers={"authorization": f"bearer {KEY}"}).status_code == 200
        for url in ("/healthz", "/", "/static/app.js", "/openapi.json", "/docs"):
            assert c.get(url).status_code == 200, url


def test_key_from_the_environment_and_bad_keys(run: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, KEY)
    cfg = ServeConfig(run=str(run))
    assert load_api_key(cfg) == KEY
    with TestClient(create_app(cfg)) as c:
        assert_error(c.get("/model"), 401, "unauthorized")
        assert c.get("/model", headers=bearer()).status_code == 200
    monkeypatch.setenv(API_KEY_ENV, "short")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load_api_key(cfg)
    with pytest.raises(ConfigError, match="--api-key-file"):
        load_api_key(ServeConfig(run=str(run), api_key_file=str(tmp_path / "missing.key")))


def test_public_bind_without_a_key_exits_2_before_serving(run: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with socket.socket() as s:  # a port that is free right now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    assert cli_main(["serve", "--run", str(run), "--host", "0.0.0.0", "--port", str(port)]) == 2
    assert time.monotonic() - started < 10  # refused at once, not after serving until interrupted
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--api-key-file" in err[0] and "--insecure" in err[0] and "0.0.0.0" in err[0]
    with socket.socket() as s:  # nothing was bound
        s.bind(("0.0.0.0", port))
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_exposure(ServeConfig(host=host), None)
    check_exposure(ServeConfig(host="0.0.0.0", insecure=True), None)
    check_exposure(ServeConfig(host="0.0.0.0"), KEY)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        with pytest.raises(ConfigError):
            check_exposure(ServeConfig(host=host), None)


# ------------------------------------------------------------------------------------------- limits


def test_rate_limit_answers_429_then_serves_again(run: Path) -> None:
    with TestClient(create_app(ServeConfig(run=str(run), rate_limit=3))) as c:
        assert [c.get("/model").status_code for _ in range(3)] == [200, 200, 200]
        r = c.get("/model")
        assert_error(r, 429, "rate_limited")
        wait = int(r.headers["retry-after"])
        assert 1 <= wait <= 1
        assert c.get("/healthz").status_code == 200  # load balancers are never limited
        time.sleep(wait)
        assert c.get("/model").status_code == 200


class SlowFake:
    """A backend whose forward pass waits until released, so uploads stay in progress."""

    name = "fake"
    classes = ["Cat", "Dog"]
    size = 8
    predictor = None  # no torch model behind it: nothing to explain

    def __init__(self) -> None:
        self.release = threading.Event()

    def decode(self, data: bytes, max_pixels: int = 0) -> np.ndarray:
        return np.zeros((8, 8, 3), dtype=np.uint8)

    def predict_arrays(self, images: np.ndarray, tta: bool = False) -> np.ndarray:
        self.release.wait(5)
        return np.tile(np.array([[0.5, 0.5]], np.float32), (len(images), 1))

    def answer(self, images: np.ndarray) -> Answers:
        probs = self.predict_arrays(images)
        return Answers(probs, np.full(len(probs), np.nan, np.float32), np.ones(len(probs), bool))

    def describe(self) -> dict[str, Any]:
        return {"name": "fake", "classes": self.classes, "size": self.size, "backend": self.name}


def test_concurrent_uploads_per_client_are_limited(run: Path) -> None:
    fake = SlowFake()
    fake.release.set()  # let the warm-up pass through
    app = create_app(ServeConfig(run=str(run), max_uploads=2, rate_limit=0), predictor=fake)

    async def scenario() -> tuple[list[httpx.Response], httpx.Response]:
        async with app.router.lifespan_context(app):
            fake.release.clear()
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                post = lambda: c.post("/predict", files={"file": ("x", b"\0")})  # noqa: E731
                tasks = [asyncio.create_task(post()) for _ in range(5)]
                while sum(t.done() for t in tasks) < 3:  # three refused at once, two held by the model
                    await asyncio.sleep(0.01)
                fake.release.set()
                rs = list(await asyncio.gather(*tasks))
                after = await c.post("/predict", files={"file": ("x", b"\0")})
        return rs, after

    rs, after = asyncio.run(scenario())
    assert sorted(r.status_code for r in rs) == [200, 200, 429, 429, 429]
    for r in rs:
        if r.status_code == 429:
            assert_error(r, 429, "too_many_uploads")
            assert r.headers["retry-after"] == "1"
    assert after.status_code == 200


# ------------------------------------------------------------------------------------------ headers


def assert_security_headers(r: httpx.Response) -> None:
    csp = r.headers.get("content-security-policy", "")
    assert "frame-ancestors 'none'" in csp, (r.url, r.headers)
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert "server" not in r.headers


def test_security_headers_on_page_api_and_refusals(run: Path, key_file: Path) -> None:
    cfg = ServeConfig(run=str(run), api_key_file=str(key_file), rate_limit=20)
    with TestClient(create_app(cfg)) as c:
        page = c.get("/")
        assert_security_headers(page)
        assert "script-src 'self';" in page.headers["content-security-policy"]
        responses = [page, c.get("/static/app.js"), c.get("/static/style.css"), c.get("/healthz"),
                     c.get("/model", headers=bearer()), c.post("/predict", headers=bearer(), **upload()),
                     c.post("/predict", headers=bearer(), **upload(b"not an image")), c.get("/model"),
                     c.get("/openapi.json"), c.get("/docs")]
        assert [r.status_code for r in responses] == [200] * 6 + [400, 401, 200, 200]
        for _ in range(21):  # past 20 requests in one second
            limited = c.get("/stats", headers=bearer())
            if limited.status_code == 429:
                break
        responses.append(limited)
        assert limited.status_code == 429
        for r in responses:
            assert_security_headers(r)
            assert "access-control-allow-origin" not in r.headers
        # The docs page runs only its own inline script, allowed by hash.
        assert "'sha256-" in responses[9].headers["content-security-policy"]
        cross = c.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in cross.headers  # CORS is off by default


def test_cors_only_for_named_origins(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ServeConfig(run=str(run), cors_origin="https://app.example, https://other.example:8443")
    with TestClient(create_app(cfg)) as c:
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        ok = c.options("/predict", headers={"Origin": "https://app.example", **pre})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        bad = c.options("/predict", headers={"Origin": "https://evil.example", **pre})
        assert "access-control-allow-origin" not in bad.headers
    assert cli_main(["serve", "--run", str(run), "--cors-origin", "*"]) == 2  # a wildcard is no origin
    assert "--cors-origin" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- no disclosure


def test_no_response_shows_the_run_path_or_library_versions(run: Path, key_file: Path) -> None:
    secrets = {str(run), str(run.resolve()), str(run.parent), str(Path.home())} - {"/"}
    with live_server(ServeConfig(run=str(run), api_key_file=str(key_file))) as url:
        with httpx.Client(base_url=url, headers=bearer()) as c:
            def everything() -> list[httpx.Response]:
                return [c.get("/"), c.get("/static/app.js"), c.get("/healthz"), c.get("/model"),
                        c.get("/stats"), c.get("/report"), c.get("/openapi.json"), c.get("/docs"),
                        c.get("/nope"),
                        c.get("/predict"), c.post("/predict", **upload()), c.post("/predict", **upload(b"")),
                        c.post("/predict", **upload(JPEG[:100])), c.post("/predict", content=b"x"),
                        c.post("/predict/batch", files=[("files", ("a.jpg", JPEG, "image/jpeg"))]),
                        c.get("/model", headers=bearer("wrong-key-0123456789abcdef"))]

            seen = everything()
            (run / "eval").mkdir(exist_ok=True)
            (run / "eval" / "metrics.json").write_text(json.dumps({"accuracy": 0.75}))
            page = "<html><style>p{}</style><body>the report</body></html>"
            (run / "eval" / "report.html").write_text(page)
            seen += everything()
    info = seen[3].json()
    assert info["run"] == run.name and info["checkpoint"] == "best.pt"
    assert seen[-11].status_code == 200 and "the report" in seen[-11].text
    assert "'sha256-" in seen[-11].headers["content-security-policy"]  # the report's inline style, by hash
    for r in seen:
        assert r.status_code < 500, (r.request.url, r.text)
        text = r.text + "\n" + "\n".join(f"{k}: {v}" for k, v in r.headers.items())
        for secret in secrets:
            assert secret not in text, (r.request.url, secret)
        for name, version in LIBRARY_VERSIONS.items():
            assert version not in text, (r.request.url, name)
        assert "Traceback" not in text and "server" not in r.headers


def test_no_route_answers_with_an_absolute_path(tmp_path: Path) -> None:
    """Every route of the app, after a real evaluation (whose metrics.json records absolute paths)."""
    shards = tmp_path / "data" / "shards"
    make_shards(shards, counts={"train": 40, "val": 20, "test": 20}, size=32, shard_rows=20)
    run = make_run(tmp_path / "runs" / "leaky", data=str(shards))
    assert cli_main(["evaluate", "--run", str(run), "--threads", "1", "--backend", "torch"]) == 0
    recorded = json.loads((run / "eval" / "metrics.json").read_text())
    assert recorded["run"] == str(run.resolve())  # the paths this test must not see in any answer
    secrets = {str(tmp_path), str(tmp_path.resolve()), str(Path.home()), os.getcwd(), sys.prefix,
               str(Path(__file__).resolve().parents[1])} - {"/"}
    app = create_app(ServeConfig(run=str(run), backend="torch", api_key_file=""))
    seen: list[httpx.Response] = []
    covered: set[str] = set()
    with TestClient(app) as c:
        for route in app.routes:
            path = route.path  # type: ignore[attr-defined]
            methods = getattr(route, "methods", None) or {"GET"}
            url = "/static/app.js" if path == "/static" else path
            for method in sorted(methods - {"HEAD"}):
                if method == "POST":
                    field = "files" if path.endswith("batch") else "file"
                    seen.append(c.post(url, files=[(field, ("a.jpg", JPEG, "image/jpeg"))]))
                    seen.append(c.post(url, files=[(field, ("bad.jpg", b"nope", "image/jpeg"))]))
                    if path == "/predict":
                        seen.append(c.post(url + "?explain=true", **upload()))
                else:
                    seen.append(c.request(method, url))
                covered.add(path)
        seen += [c.get("/nope"), c.delete("/model"), c.post("/predict", content=b"x")]
    assert covered == {r.path for r in app.routes}  # type: ignore[attr-defined]
    assert seen[0].status_code < 500
    for r in seen:
        assert r.status_code < 500, (r.request.url, r.text[:300])
        text = r.text + "\n" + "\n".join(f"{k}: {v}" for k, v in r.headers.items())
        for secret in secrets:
            assert secret not in text, (str(r.request.url), secret)
    model = next(r for r in seen if r.request.url.path == "/model").json()
    assert model["eval_metrics"]["run"] == "leaky"
    assert model["eval_metrics"]["accuracy"] == recorded["accuracy"]


# ------------------------------------------------------------------------------------- slow clients


def read_all(sock: socket.socket) -> bytes:
    """Read until the server closes the connection (the socket's timeout bounds each wait)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_or_oversized_requests_are_cut_off(run: Path) -> None:
    cfg = ServeConfig(run=str(run), header_timeout_s=0.5, body_timeout_s=0.5, keep_alive_s=1,
                      max_header_bytes=4096)
    with live_server(cfg) as url:
        port = int(url.rsplit(":", 1)[1])

        def connect() -> socket.socket:
            return socket.create_connection(("127.0.0.1", port), timeout=5)

        with connect() as s:  # connects and says nothing
            reply = read_all(s)
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
        with connect() as s:  # trickles its headers: one line every 0.2 s, for ever
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            with pytest.raises(OSError):  # the server closed the connection: a write or read fails
                while time.monotonic() - started < 5:
                    time.sleep(0.2)
                    s.sendall(b"X-Slow: 1\r\n")
                    s.setblocking(False)
                    try:
                        if s.recv(65536) == b"":
                            raise ConnectionResetError("closed")
                    except BlockingIOError:
                        pass
                    s.setblocking(True)
            assert time.monotonic() - started < 2
        with connect() as s:  # headers larger than --max-header-bytes
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 8000 + b"\r\n")
            reply = read_all(s)
        assert reply.startswith(b"HTTP/1.1 431") and b"headers_too_large" in reply
        with connect() as s:  # a body that never completes
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000\r\n\r\n--b\r\n")
            reply = read_all(s)
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
        assert b"--body-timeout-s" in reply
        with connect() as s:  # an idle keep-alive connection is closed after --keep-alive-s
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            started = time.monotonic()
            reply = read_all(s)
        assert reply.startswith(b"HTTP/1.1 200") and time.monotonic() - started < 4
        # A large upload whose headers and body arrive together is not mistaken for large headers.
        big = jpeg_bytes(synthetic_image(1, 400, seed=4))
        assert len(big) > 4096
        assert httpx.post(url + "/predict", **upload(big)).status_code == 200


# -------------------------------------------------------------------------------- oversized uploads

BIG_UPLOAD = 50 * 1024 * 1024
"""A 50 MB file sent by mistake (a camera RAW, a video): over --max-bytes, within --drain-bytes."""


def multipart_file(size: int) -> tuple[bytes, dict[str, str]]:
    """A multipart body holding one ``size``-byte file as field ``file``, and its Content-Type."""
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.raw"\r\n\r\n'
    return head + bytes(size) + b"\r\n--b--\r\n", {"Content-Type": "multipart/form-data; boundary=b"}


def assert_too_large(status: int, headers: Any, body: bytes) -> None:
    assert status == 413, body[:200]
    assert headers["connection"] == "close" and headers["content-type"] == "application/json"
    assert json.loads(body)["error"] == "payload_too_large" and b"--max-bytes" in body


@pytest.fixture(scope="module")
def serving_defaults(run: Path) -> Iterator[str]:
    """The live server with the default --max-bytes and --drain-bytes."""
    with live_server(ServeConfig(run=str(run))) as url:
        yield url


def test_a_50_mb_upload_from_urllib_gets_the_413(serving_defaults: str) -> None:
    # urllib sends the whole body (and Connection: close) before reading: a server that answered and
    # closed with the body unread made the kernel reset the connection, and urllib saw only the reset.
    body, headers = multipart_file(BIG_UPLOAD)
    url = serving_defaults
    for _ in range(2):  # the second on a fresh connection: the server is fine after a drain
        request = urllib.request.Request(url + "/predict", data=body, headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)  # noqa: S310 (the test's own http URL)
        assert_too_large(refused.value.code, refused.value.headers, refused.value.read())
    assert httpx.post(url + "/predict", **upload()).status_code == 200


def test_a_50_mb_upload_from_requests_gets_the_413(serving_defaults: str) -> None:
    requests = pytest.importorskip("requests")  # not a dependency; here when mlflow or schemathesis is
    body, headers = multipart_file(BIG_UPLOAD)
    r = requests.post(serving_defaults + "/predict", data=body, headers=headers, timeout=30)
    assert_too_large(r.status_code, r.headers, r.content)
    r = requests.post(serving_defaults + "/predict", files=upload()["files"], timeout=30)
    assert r.status_code == 200, r.text


def test_uploads_over_the_drain_bound_or_awaiting_100_continue_are_refused_at_once(
        serving_defaults: str) -> None:
    port = int(serving_defaults.rsplit(":", 1)[1])
    for extra in (f"Content-Length: {1 << 30}\r\n",  # 1 GiB: over --drain-bytes
                  f"Content-Length: {BIG_UPLOAD}\r\nExpect: 100-continue\r\n"):  # as curl sends it
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\n"
                      f"Content-Type: multipart/form-data; boundary=b\r\n{extra}\r\n".encode())
            reply = read_all(s)  # no body sent: the answer comes, then the server closes
        assert reply.startswith(b"HTTP/1.1 413") and b"100 Continue" not in reply, reply[:200]
        assert b"\r\nconnection: close\r\n" in reply and b"payload_too_large" in reply


# ---------------------------------------------------------------------------------- schema fuzzing

SCHEMATHESIS_EXAMPLES = 25
"""Cases per operation and phase: enough to reach every documented answer, about 15 s on 2 cores."""


def test_schemathesis_against_the_live_schema(run: Path, key_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("schemathesis")
    cfg = ServeConfig(run=str(run), api_key_file=str(key_file), rate_limit=0, max_uploads=0)
    (run / "eval").mkdir(exist_ok=True)  # so GET /report answers 200 (HTML) as well as 404
    (run / "eval" / "report.html").write_text("<html><body>the report</body></html>")
    report = tmp_path / "schemathesis.ndjson"
    config = tmp_path / "schemathesis.toml"
    # Multipart carries no types: one `files` part is both "an array of one file" and "not an array",
    # and the server rightly answers it like a batch of one, which schemathesis takes for accepting
    # a wrong type. Every other operation keeps the negative-data check.
    # Random bytes that fit "format: binary" are rightly refused as not_an_image (400): no schema can
    # say "a decodable photo", so generated positive data is not always accepted.
    config.write_text('[checks]\npositive_data_acceptance.enabled = false\n\n'
                      '[[operations]]\ninclude-path = "/predict/batch"\n'
                      'checks.negative_data_rejection.enabled = false\n')
    with live_server(cfg) as url:
        cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color",
               "run", f"{url}/openapi.json",
               "--header", f"Authorization: Bearer {KEY}",
               "--max-examples", str(SCHEMATHESIS_EXAMPLES), "--seed", "18", "--workers", "1",
               "--phases", "examples,coverage,fuzzing", "--request-timeout", "10",
               "--report", "ndjson", "--report-ndjson-path", str(report)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,  # its cache
                              env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    events = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
    checks = set(re.findall(r'"name": "([a-z_]+)", "status"', json.dumps(events)))
    assert {"not_a_server_error", "status_code_conformance", "content_type_conformance",
            "response_headers_conformance", "response_schema_conformance", "ignored_auth",
            "missing_required_header"} <= checks, checks
    counts = re.search(r"(\d+) generated, (\d+) passed", out)
    assert counts and counts[1] == counts[2] and int(counts[1]) >= 100, out[-2000:]
    print(f"schemathesis: {counts[1]} cases generated, all passed")  # the figure in docs/reliability.md


# ------------------------------------------------------------------------------------ trusted inputs


class _RunsCode:
    """A pickle that would create a file when unpickled by a full (unsafe) unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_runs_code_is_refused_without_running_it(tmp_path: Path) -> None:
    from catsdogs.checkpoint import load_checkpoint
    from catsdogs.errors import CheckpointError

    marker = tmp_path / "pwned"
    evil = tmp_path / "best.pt"
    torch.save({"model_state": _RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(evil)
    assert not marker.exists()
