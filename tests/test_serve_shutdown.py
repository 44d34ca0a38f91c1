"""``catsdogs serve`` stops cleanly on SIGTERM, as a container runtime stops it: requests in flight finish."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures import jpeg_bytes, synthetic_image

pytestmark = pytest.mark.slow

STOP_WITHIN_S = 10
"""Docker's and podman's default grace period before SIGKILL."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[str], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("serve did not become healthy")


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "catsdogs-boundary-7"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(run_dir: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "catsdogs.cli", "serve", "--run", str(run_dir), "--port",
                             str(port), "--backend", "torch"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_healthy(url, proc)
        body, ctype = multipart(jpeg_bytes(synthetic_image(0, 48, seed=1)))
        half = len(body) // 2
        with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
            conn.sendall((f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:half])
            time.sleep(0.3)  # the server has the headers and half of the upload: the request is in flight
            stopped_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            conn.sendall(body[half:])
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert b'"label"' in answer
        code = proc.wait(timeout=STOP_WITHIN_S)
        took = time.monotonic() - stopped_at
        err = proc.stderr.read() if proc.stderr else ""
        assert code == 0, err
        assert took < STOP_WITHIN_S and "catsdogs serve: stopped" in err and "Traceback" not in err
        with pytest.raises(httpx.ConnectError):  # and it no longer listens
            httpx.get(f"{url}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
