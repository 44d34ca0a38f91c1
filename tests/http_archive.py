"""A loopback HTTP server that serves one archive, with its own Range handling and failure modes.

It records every request (its Range header, the status sent and the body bytes sent), so tests can
check that a resumed download does not fetch the same bytes twice.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ARCHIVE_PATH = "/kagglecatsanddogs.zip"


@dataclass
class Served:
    """One answered request."""

    range: str | None
    status: int
    sent: int


@dataclass
class ArchiveServer:
    """What the server serves and how it misbehaves; ``requests`` fills in as it answers."""

    payload: bytes
    honour_range: bool = True
    drop_after: list[int] = field(default_factory=list)
    """Per request, in order: close the connection after this many body bytes (then serve normally)."""
    requests: list[Served] = field(default_factory=list)
    url: str = ""

    @property
    def bytes_sent(self) -> int:
        return sum(r.sent for r in self.requests)


def _handler(state: ArchiveServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet test server
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            rng = self.headers.get("Range")
            if self.path != ARCHIVE_PATH:
                self.send_error(404, "Not Found")
                state.requests.append(Served(rng, 404, 0))
                return
            data, start, status = state.payload, 0, 200
            match = re.fullmatch(r"bytes=(\d+)-", rng or "")
            if match and state.honour_range:
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    state.requests.append(Served(rng, 416, 0))
                    return
                status = 206
            body = data[start:]
            self.send_response(status)
            self.send_header("Content-Type", "application/zip")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes" if state.honour_range else "none")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            drop = state.drop_after.pop(0) if state.drop_after else None
            if drop is not None:
                self.wfile.write(body[:drop])
                self.wfile.flush()
                self.close_connection = True
                state.requests.append(Served(rng, status, min(drop, len(body))))
                return
            self.wfile.write(body)
            state.requests.append(Served(rng, status, len(body)))

    return Handler


@contextmanager
def serve_archive(payload: bytes, honour_range: bool = True,
                  drop_after: list[int] | None = None) -> Iterator[ArchiveServer]:
    """Serve ``payload`` at ``http://127.0.0.1:PORT/kagglecatsanddogs.zip``; always stopped."""
    state = ArchiveServer(payload, honour_range, list(drop_after or []))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="archive-server", daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}{ARCHIVE_PATH}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
