"""``catsdogs download`` against a loopback HTTP server: resume, verify, safe and atomic unpacking."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from catsdogs import cli
from catsdogs.download import extract, fetch
from catsdogs.download.source import (
    DATA_DIR,
    ENV_BYTES,
    ENV_SHA256,
    ENV_URL,
    MARKER_NAME,
    OFFICIAL_BYTES,
    OFFICIAL_SHA256,
    OFFICIAL_URL,
    Source,
    resolve_source,
)
from catsdogs.errors import ConfigError
from tests.fixtures import make_pet_archive
from tests.http_archive import serve_archive

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def _no_retry_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "RETRY_WAIT_S", 0.0)
    for name in (ENV_URL, ENV_SHA256, ENV_BYTES):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, list[str]]]:
    path = tmp_path_factory.mktemp("zip") / "kagglecatsanddogs.zip"
    info = make_pet_archive(path)
    return path.read_bytes(), info


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download(out: Path, url: str, sha: str, *extra: str) -> int:
    return cli.main(["download", "--output", str(out), "--url", url, "--sha256", sha, *extra])


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("catsdogs download: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _assert_complete(out: Path, payload: bytes, info: dict[str, list[str]]) -> None:
    data = out / DATA_DIR
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file())
    assert files == sorted(info["good"] + info["bad"] + info["ignored"])
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        for rel in files:
            assert (data / rel).read_bytes() == zf.read(f"{DATA_DIR}/{rel}")
    assert (out / "CDLA-Permissive-2.0.pdf").is_file() and (out / "readme[1].txt").is_file()
    record = json.loads((out / MARKER_NAME).read_text())
    assert record["sha256"] == _sha(payload) and record["archive_bytes"] == len(payload)
    leftovers = [p.name for p in out.iterdir() if ".tmp-" in p.name or p.suffix in (".part", ".zip")]
    assert not leftovers


def _assert_nothing_unpacked(out: Path) -> None:
    assert not (out / DATA_DIR).exists() and not (out / MARKER_NAME).exists()
    if out.exists():
        assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_full_download(tmp_path: Path, archive: tuple[bytes, dict[str, list[str]]]) -> None:
    payload, info = archive
    out = tmp_path / "data"
    with serve_archive(payload) as server:
        assert _download(out, server.url, _sha(payload)) == 0
    assert [(r.range, r.status) for r in server.requests] == [(None, 200)]
    assert server.bytes_sent == len(payload)
    _assert_complete(out, payload, info)


def test_second_call_fetches_nothing(tmp_path: Path, archive: tuple[bytes, dict[str, list[str]]],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    payload, _ = archive
    out = tmp_path / "data"
    with serve_archive(payload) as server:
        assert _download(out, server.url, _sha(payload)) == 0
        before = len(server.requests)
        mtime = (out / MARKER_NAME).stat().st_mtime_ns
        capsys.readouterr()
        assert _download(out, server.url, _sha(payload)) == 0
        assert len(server.requests) == before == 1
    assert "nothing to fetch" in capsys.readouterr().out
    assert (out / MARKER_NAME).stat().st_mtime_ns == mtime


def test_dropped_connection_resumes_with_range(tmp_path: Path,
                                               archive: tuple[bytes, dict[str, list[str]]]) -> None:
    payload, info = archive
    cut = len(payload) // 3
    out = tmp_path / "data"
    with serve_archive(payload, drop_after=[cut]) as server:
        assert _download(out, server.url, _sha(payload)) == 0
    assert [(r.range, r.status) for r in server.requests] == [(None, 200), (f"bytes={cut}-", 206)]
    assert server.bytes_sent == len(payload)  # the first third was not fetched again
    _assert_complete(out, payload, info)


def test_killed_download_resumes_from_the_part_file(tmp_path: Path,
                                                    archive: tuple[bytes, dict[str, list[str]]]) -> None:
    payload, info = archive
    cut = len(payload) // 2
    out = tmp_path / "data"
    out.mkdir()
    source = Source("http://unused", _sha(payload), 0)
    (out / f"{source.archive_name}{fetch.PART_SUFFIX}").write_bytes(payload[:cut])
    with serve_archive(payload) as server:
        assert _download(out, server.url, _sha(payload)) == 0
    assert [(r.range, r.status) for r in server.requests] == [(f"bytes={cut}-", 206)]
    assert server.bytes_sent == len(payload) - cut
    _assert_complete(out, payload, info)


def test_server_ignoring_range_restarts_cleanly(tmp_path: Path, archive: tuple[bytes, dict[str, list[str]]],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    payload, info = archive
    cut = len(payload) // 3
    out = tmp_path / "data"
    with serve_archive(payload, honour_range=False, drop_after=[cut]) as server:
        assert _download(out, server.url, _sha(payload)) == 0
    assert [(r.range, r.status) for r in server.requests] == [(None, 200), (f"bytes={cut}-", 200)]
    assert server.bytes_sent == cut + len(payload)
    assert "restarting from byte 0" in capsys.readouterr().err
    _assert_complete(out, payload, info)


def test_connection_that_keeps_dropping_fails_then_resumes(
        tmp_path: Path, archive: tuple[bytes, dict[str, list[str]]],
        capsys: pytest.CaptureFixture[str]) -> None:
    payload, info = archive
    step = len(payload) // (fetch.ATTEMPTS * 2)
    out = tmp_path / "data"
    with serve_archive(payload, drop_after=[step] * fetch.ATTEMPTS) as server:
        assert _download(out, server.url, _sha(payload)) == 2
        assert "run the same command again to resume" in _one_line_error(capsys)
        _assert_nothing_unpacked(out)
        assert _download(out, server.url, _sha(payload)) == 0
    assert server.requests[-1].range == f"bytes={step * fetch.ATTEMPTS}-"
    assert server.bytes_sent == len(payload)
    _assert_complete(out, payload, info)


@pytest.mark.parametrize("wrong", ["sha256", "size"])
def test_checksum_mismatch_deletes_and_unpacks_nothing(
        tmp_path: Path, archive: tuple[bytes, dict[str, list[str]]], capsys: pytest.CaptureFixture[str],
        wrong: str) -> None:
    payload, _ = archive
    out = tmp_path / "data"
    sha = _sha(payload + b"x") if wrong == "sha256" else _sha(payload)
    extra = ["--archive-bytes", str(len(payload) + 1)] if wrong == "size" else []
    with serve_archive(payload) as server:
        assert _download(out, server.url, sha, *extra) == 2
    line = _one_line_error(capsys)
    assert ("sha256" in line) if wrong == "sha256" else (f"expected {len(payload) + 1:,}" in line)
    assert "deleted" in line
    _assert_nothing_unpacked(out)
    assert not list(out.iterdir())  # no .part, no .zip


def _zip_with(tmp_path: Path, name: str, link: bool = False) -> bytes:
    path = tmp_path / "evil.zip"
    make_pet_archive(path, per_class=2)
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo(name)
        if link:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, b"/etc/passwd" if link else b"escaped")
    return path.read_bytes()


@pytest.mark.parametrize("name", ["../escape.txt", "PetImages/../../escape.txt", "/tmp/escape.txt",
                                  "PetImages\\..\\..\\escape.txt", "C:/escape.txt", "PetImages/Cat/link.jpg"])
def test_unsafe_member_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    payload = _zip_with(tmp_path, name, link=name.endswith("link.jpg"))
    out = tmp_path / "a" / "data"
    with serve_archive(payload) as server:
        assert _download(out, server.url, _sha(payload)) == 2
    line = _one_line_error(capsys)
    assert "refused" in line and repr(name) in line
    _assert_nothing_unpacked(out)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "a" / "escape.txt").exists()
    assert not (out / "CDLA-Permissive-2.0.pdf").exists()  # checked before a single byte is written


def test_unpacked_size_is_bounded(tmp_path: Path, archive: tuple[bytes, dict[str, list[str]]],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    payload, _ = archive
    out = tmp_path / "data"
    with serve_archive(payload) as server:
        assert _download(out, server.url, _sha(payload), "--max-unpacked-bytes", "1000") == 2
    assert "--max-unpacked-bytes" in _one_line_error(capsys)
    _assert_nothing_unpacked(out)


def test_error_during_extraction_leaves_nothing_complete(
        tmp_path: Path, archive: tuple[bytes, dict[str, list[str]]], monkeypatch: pytest.MonkeyPatch) -> None:
    payload, info = archive
    out = tmp_path / "data"
    real = extract._write_member
    calls = []

    def failing(*args: object) -> int:
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.EIO, "injected I/O error")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(extract, "_write_member", failing)
    with serve_archive(payload) as server:
        with pytest.raises(OSError, match="injected"):
            _download(out, server.url, _sha(payload))
        _assert_nothing_unpacked(out)
        monkeypatch.setattr(extract, "_write_member", real)
        assert _download(out, server.url, _sha(payload)) == 0
        assert len(server.requests) == 1  # the verified archive was kept for the retry
    _assert_complete(out, payload, info)


def test_kill_during_extraction_leaves_nothing_complete(
        tmp_path: Path, archive: tuple[bytes, dict[str, list[str]]]) -> None:
    payload, info = archive
    out = tmp_path / "data"
    code = (
        "import os, signal, sys\n"
        "from catsdogs.download import extract\n"
        "real, calls = extract._write_member, []\n"
        "def dying(*args):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 5:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*args)\n"
        "extract._write_member = dying\n"
        "from catsdogs.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    with serve_archive(payload) as server:
        proc = subprocess.run([sys.executable, "-c", code, "download", "--output", str(out), "--url",
                               server.url, "--sha256", _sha(payload)], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == -9, proc.stderr
        assert not (out / DATA_DIR).exists() and not (out / MARKER_NAME).exists()
        staged = [p for p in out.iterdir() if p.name.startswith(f"{DATA_DIR}.tmp-")]
        assert len(staged) == 1 and len(list(staged[0].rglob("*.jpg"))) == 4  # killed half-way
        assert _download(out, server.url, _sha(payload)) == 0
        assert len(server.requests) == 1  # the verified archive was reused, not fetched again
    _assert_complete(out, payload, info)  # and the killed run's staged folder is gone


def test_full_disk_is_one_line(tmp_path: Path, archive: tuple[bytes, dict[str, list[str]]],
                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    payload, _ = archive
    out = tmp_path / "data"
    with serve_archive(payload) as server:
        def full(*args: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(extract, "_write_member", full)
        assert _download(out, server.url, _sha(payload)) == 2
        assert "disk full" in _one_line_error(capsys)
        _assert_nothing_unpacked(out)
        usage = fetch.shutil.disk_usage(tmp_path)
        monkeypatch.setattr(fetch.shutil, "disk_usage", lambda p: usage._replace(free=10))
        out2 = tmp_path / "data2"
        assert _download(out2, server.url, _sha(payload), "--archive-bytes", str(len(payload))) == 2
        assert "disk full" in _one_line_error(capsys)


def test_no_network_and_http_errors_are_one_line(tmp_path: Path, archive: tuple[bytes, dict[str, list[str]]],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    payload, _ = archive
    with serve_archive(payload) as server:
        url = server.url
        assert _download(tmp_path / "a", url.replace(".zip", "-missing.zip"), _sha(payload)) == 2
        assert "HTTP 404" in _one_line_error(capsys)
    assert _download(tmp_path / "b", url, _sha(payload)) == 2  # the server is gone: connection refused
    assert f"cannot reach {url.split('/')[2]}" in _one_line_error(capsys)


def test_environment_points_at_a_mirror(tmp_path: Path, archive: tuple[bytes, dict[str, list[str]]],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    payload, info = archive
    out = tmp_path / "data"
    with serve_archive(payload) as server:
        monkeypatch.setenv(ENV_URL, server.url)
        monkeypatch.setenv(ENV_SHA256, _sha(payload).upper())
        monkeypatch.setenv(ENV_BYTES, str(len(payload)))
        assert cli.main(["download", "--output", str(out)]) == 0
    _assert_complete(out, payload, info)


def test_existing_images_not_from_download_are_never_overwritten(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / DATA_DIR / "Cat").mkdir(parents=True)
    assert _download(tmp_path, "http://127.0.0.1:9/x.zip", "0" * 64) == 2
    assert "was not written by catsdogs download" in _one_line_error(capsys)
    assert (tmp_path / DATA_DIR / "Cat").is_dir()


def test_resolve_source_layers() -> None:
    assert resolve_source(env={}) == Source(OFFICIAL_URL, OFFICIAL_SHA256, OFFICIAL_BYTES)
    mirror = {ENV_URL: "http://mirror/pets.zip", ENV_SHA256: "A" * 64, ENV_BYTES: "123"}
    assert resolve_source(env=mirror) == Source("http://mirror/pets.zip", "a" * 64, 123)
    assert resolve_source("https://x/y.zip", "b" * 64, env=mirror) == Source("https://x/y.zip", "b" * 64, 0)
    for kwargs in ({"url": "https://x/y.zip"}, {"sha256": "b" * 64},
                   {"url": "ftp://x/y.zip", "sha256": "b" * 64}, {"url": "https://x/y.zip", "sha256": "xyz"},
                   {"env": {ENV_URL: "http://m/p.zip"}},
                   {"env": {**mirror, ENV_BYTES: "12 MB"}}):
        with pytest.raises(ConfigError):
            resolve_source(**kwargs)  # type: ignore[arg-type]


@pytest.mark.skipif(not shutil.which("make"), reason="make is not installed")
def test_make_run_downloads_first_only_when_data_is_not_given(tmp_path: Path) -> None:
    """The Makefile's run target, with a stand-in catsdogs that logs its arguments."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls.log"
    fake = venv / "bin" / "catsdogs"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n'
                    f'[ "$1" = download ] && mkdir -p "$3/{DATA_DIR}"\nexit 0\n')
    fake.chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml: make does not reinstall
    root = Path(__file__).resolve().parents[1]
    data_dir = tmp_path / "data"
    common = ["make", "-s", "run", f"VENV={venv}", f"DATA_DIR={data_dir}", f"OUT={tmp_path / 'out'}"]
    env = {k: v for k, v in os.environ.items() if k != "DATA"}
    for _ in range(2):  # the second time data/PetImages exists: no download
        subprocess.run(common, cwd=root, env=env, check=True, capture_output=True)
    subprocess.run([*common, f"DATA={tmp_path / 'mine'}"], cwd=root, env=env, check=True, capture_output=True)
    calls = log.read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["download", "run", "run", "run"]
    assert calls[0] == f"download --output {data_dir}"
    assert f"--data {data_dir}/{DATA_DIR} " in calls[1] and f"--data {tmp_path / 'mine'} " in calls[3]
