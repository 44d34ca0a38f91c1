"""HTTP connections of ``catsdogs serve`` under slow or hostile clients, and the uvicorn settings.

uvicorn bounds the idle time between requests (``timeout_keep_alive``) but not the time a client
takes to send a request's headers, and with httptools not their size either: a client trickling
header bytes held a connection for ever. :func:`guarded_protocol` adds both bounds to uvicorn's own
HTTP protocol: the request line and headers must arrive within ``--header-timeout-s`` (else 408)
and within ``--max-header-bytes`` (else 431); either way the connection is closed. The body has its
own deadline in :func:`catsdogs.serve.uploads.read_body`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from catsdogs.config import ServeConfig, flag

GRACEFUL_SHUTDOWN_S = 5
"""Seconds requests in flight get to finish on Ctrl-C."""

_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}


def _raw_error(status: int, error: str, detail: str) -> bytes:
    """A complete HTTP/1.1 JSON error response that closes the connection."""
    body = json.dumps({"error": error, "detail": detail}).encode("utf-8")
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\nx-content-type-options: nosniff\r\n\r\n")
    return head.encode("latin-1") + body


class _GuardedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[valid-type,misc]
    """Closes a connection whose request headers come too slowly or grow too large."""

    header_timeout_s: float
    """Seconds a client has for a request's headers (``--header-timeout-s``)."""
    max_header_bytes: int
    """Largest request line plus headers in bytes (``--max-header-bytes``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._head_cycle: object = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm()  # a new connection owes its first request's headers

    def _arm(self) -> None:
        self._head_bytes = 0
        self._head_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, error: str, detail: str) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(_raw_error(status, error, detail))
            self.transport.close()

    def _draining(self) -> bool:
        """True while the body of a request that was already answered still arrives."""
        return self.cycle is not None and self.cycle.response_complete and self.cycle.more_body

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._draining():  # its answer is sent: just stop waiting for the rest of the body
            self.transport.close()
            return
        self._refuse(408, "request_timeout", f"request headers did not arrive within "
                                             f"{flag('header_timeout_s')}={self.header_timeout_s:g} s")

    def data_received(self, data: bytes) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if self._head_timer is None and idle:
            self._arm()  # the next request on a kept-alive connection, or an answered body
        counting = self._head_timer is not None and not self._draining()
        if counting:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._head_timer is None:
            return
        if self.cycle is not self._head_cycle:  # the headers are complete: a new request began
            self._disarm()
        elif counting and self._head_bytes > self.max_header_bytes:
            limit = f"{flag('max_header_bytes')}={self.max_header_bytes}"
            self._refuse(431, "headers_too_large", f"request line and headers exceed {limit} bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def guarded_protocol(header_timeout_s: float, max_header_bytes: int) -> type[asyncio.Protocol]:
    """Uvicorn's HTTP protocol class with a deadline and a size bound on each request's headers."""
    return type("GuardedHTTPProtocol", (_GuardedHTTPProtocol,),
                {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes})


def uvicorn_config(app: Any, cfg: ServeConfig, **overrides: Any) -> uvicorn.Config:
    """Uvicorn settings of ``catsdogs serve``: bounded timeouts, no Server header, trusted proxies."""
    settings: dict[str, Any] = {
        "log_level": "warning", "access_log": False, "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
        "server_header": False,  # "server: uvicorn" would name the library
        "timeout_keep_alive": cfg.keep_alive_s,
        "h11_max_incomplete_event_size": cfg.max_header_bytes,
        "http": guarded_protocol(cfg.header_timeout_s, cfg.max_header_bytes),
        "proxy_headers": True, "forwarded_allow_ips": cfg.forwarded_allow_ips,
    }
    return uvicorn.Config(app, **{**settings, **overrides})
