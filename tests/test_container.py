"""The serve image as a user runs it: built from a local Debian base, a trained run mounted read-only.

1. builds the serve target (container/image.py: the host's pip settings as a build secret);
2. starts it read-only, as its non-root user, without capabilities, with the run mounted read-only and a key;
3. posts a real photo (200, right label) and one without the key (401);
4. checks /healthz, the image's HEALTHCHECK and /metrics;
5. stops it with SIGTERM while an upload is in flight: the upload is answered, the container exits 0
   within 10 s.

Skips with one line only where no container can run (no podman, or podman cannot start one).
"""

from __future__ import annotations

import importlib.util
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures import REAL_DATA
from tests.real_run import held_out_photo

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KEY = "container-test-key-0123456789abcdef"
STOP_WITHIN_S = 10
"""podman's and docker's default grace period before SIGKILL."""
MAX_SERVE_IMAGE_BYTES = 1.5e9
"""The serve image's size target (docs/container.md has the measured sizes)."""
TAG = "catsdogs-test"


def load_image_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("catsdogs_image_tool", ROOT / "container" / "image.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    module = load_image_tool()
    problem = module.runtime_problem()
    if problem is not None:
        pytest.skip(f"no container runtime: {problem}")
    return module


@pytest.fixture(scope="module")
def serve_image(tool: ModuleType) -> str:
    started = time.monotonic()
    base_s = tool.ensure_base()
    times = tool.build(["serve"], TAG, tool.LOCAL_BASE, log=False)
    print(f"container test: base image {base_s:.0f} s, serve image {times['serve']:.0f} s, "
          f"{time.monotonic() - started:.0f} s in all")
    return f"{TAG}:serve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def container(tool: ModuleType, serve_image: str, real_run: Path,
              tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The serve image running on ``real_run``; yields (container name, base URL)."""
    name = f"catsdogs-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    key_file = tmp_path / "api.key"
    key_file.write_text(KEY)
    key_file.chmod(0o644)  # the container's user (uid 10001) reads it
    cmd = ["run", "--detach", "--name", name, "--read-only", "--cap-drop", "all",
           "--security-opt", "no-new-privileges", "--health-interval", "disable",
           "--publish", f"127.0.0.1:{port}:8000",
           "--volume", f"{real_run}:/srv/run:ro", "--volume", f"{key_file}:/run/secrets/api.key:ro",
           serve_image, "serve", "--run", "/srv/run", "--host", "0.0.0.0", "--port", "8000",
           "--api-key-file", "/run/secrets/api.key"]
    tool.podman(*cmd, capture=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            state = tool.podman("inspect", "--format", "{{.State.Status}}", name, capture=True).stdout.strip()
            assert state == "running", logs(tool, name)
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, logs(tool, name)
            time.sleep(0.5)
        yield name, url
    finally:
        tool.podman("rm", "--force", "--time", "0", name, check=False, capture=True)


def logs(tool: ModuleType, name: str) -> str:
    out = tool.podman("logs", name, check=False, capture=True)
    return out.stdout + out.stderr


def multipart(data: bytes, filename: str) -> tuple[bytes, str]:
    boundary = "catsdogs-container-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_the_image_is_lean_non_root_and_has_a_healthcheck(tool: ModuleType, serve_image: str) -> None:
    config = tool.podman("image", "inspect", "--format", "{{.Config.User}}|{{json .Config.Healthcheck}}",
                         serve_image, capture=True).stdout.strip()
    user, health = config.split("|", 1)
    assert user == "10001:10001"
    assert "/healthz" in health
    assert tool.image_size(serve_image) < MAX_SERVE_IMAGE_BYTES
    # No Spark, Java, MLflow or Optuna in the serve image; torch is the CPU build.
    probe = tool.podman("run", "--rm", "--health-cmd", "none", "--entrypoint", "python3", serve_image, "-c",
                        "import importlib.util as u, shutil, torch; "
                        "print([m for m in ('pyspark', 'mlflow', 'optuna', 'sklearn') if u.find_spec(m)], "
                        "shutil.which('java'), torch.version.cuda, torch.__version__)",
                        capture=True).stdout.strip()
    assert probe == "[] None None 2.13.0+cpu", probe
    # The build machine's pip settings were a build secret and read-only mounts: no file of them is left
    # (only the mounts' empty folders, which podman makes in every RUN layer of such a build).
    leftovers = tool.podman("run", "--rm", "--health-cmd", "none", "--entrypoint", "sh", serve_image, "-c",
                            "find /run/host-pip ! -type d 2>/dev/null; "
                            "ls -d /run/secrets/pipconf 2>/dev/null; pip config list", capture=True).stdout
    assert "host-pip" not in leftovers and "pipconf" not in leftovers, leftovers
    assert not any(k in leftovers for k in ("find-links", "index-url", "constraint", "cert")), leftovers
    history = tool.podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", serve_image,
                          capture=True).stdout
    assert not any(path in history for path in ("/opt/wheels", "/opt/pypi", "/etc/xdg/pip")), history


def test_serves_a_real_photo_read_only_and_stops_cleanly_on_sigterm(
        tool: ModuleType, container: tuple[str, str]) -> None:
    name, url = container
    cat = held_out_photo(REAL_DATA, "Cat")
    files = {"file": (cat.name, cat.read_bytes(), "image/jpeg")}
    auth = {"Authorization": f"Bearer {KEY}"}

    r = httpx.post(f"{url}/predict", files=files, headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["label"] == "Cat", r.json()
    # OpenVINO answers inside the image, on the fp32 graph the run keeps in RUN/engine/ (read-only: no
    # int8 graph can be made there, so serve says so and stays on fp32).
    assert r.json()["model"]["backend"] == "openvino", r.json()["model"]
    refused = httpx.post(f"{url}/predict", files=files, timeout=60)
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    health = httpx.get(f"{url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    check = tool.podman("healthcheck", "run", name, check=False, capture=True)
    assert check.returncode == 0, check.stdout + check.stderr  # the image's own HEALTHCHECK

    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401  # behind the key
    scraped = httpx.get(f"{url}/metrics", headers=auth, timeout=10)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(scraped.text) for s in family.samples}
    assert samples[("catsdogs_http_requests_total",
                    (("method", "POST"), ("route", "/predict"), ("status", "200")))] == 1
    assert samples[("catsdogs_http_requests_total",
                    (("method", "POST"), ("route", "/predict"), ("status", "401")))] == 1
    assert samples[("catsdogs_predictions_total", (("label", "Cat"),))] == 1

    # SIGTERM with an upload half sent: it is still answered, then the process exits 0.
    dog = held_out_photo(REAL_DATA, "Dog", 1)
    body, ctype = multipart(dog.read_bytes(), dog.name)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall((f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                      f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                     + body[: len(body) // 2])
        time.sleep(0.5)
        stopped_at = time.monotonic()
        tool.podman("kill", "--signal", "TERM", name, capture=True)
        time.sleep(0.5)
        conn.sendall(body[len(body) // 2:])
        answer = b""
        while not answer.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b'"label":"Dog"' in answer.replace(b" ", b"")
    exit_code = tool.podman("wait", name, capture=True, timeout=STOP_WITHIN_S + 5).stdout.strip()
    took = time.monotonic() - stopped_at
    out = logs(tool, name)
    assert exit_code == "0", out
    assert took < STOP_WITHIN_S, f"{took:.1f} s"
    assert "catsdogs serve: stopped" in out and "Traceback" not in out
