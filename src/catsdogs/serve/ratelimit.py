"""Per-client limits of ``catsdogs serve``: requests per second and concurrent uploads, 429 beyond.

The request rate uses the ``limits`` library's moving window in memory (exact: at most N requests in
any one-second window; entries expire on their own, so memory stays bounded by the clients of the
last second). Concurrent uploads are a per-client counter of POST requests in progress. A client is
its address as uvicorn reports it: the peer, or the X-Forwarded-For of a proxy in
``--forwarded-allow-ips``. One process holds the counters; several server processes each count alone.
"""

from __future__ import annotations

import math
import time
from collections import Counter

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.types import ASGIApp, Receive, Scope, Send

from catsdogs.serve.replies import send_error

EXEMPT_PATHS = frozenset({"/healthz"})
"""Paths never limited: load balancers poll the health check as often as they like."""

UPLOAD_RETRY_AFTER_S = 1
"""Retry-After for too many concurrent uploads: an upload takes milliseconds (docs/benchmarks/serve.md)
and one second is the smallest value the header can say."""


def client_id(scope: Scope) -> str:
    """The client's address (as uvicorn reports it, after trusted proxy headers)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class RateLimitMiddleware:
    """Answer 429 JSON with ``Retry-After`` to a client over ``rate`` requests/s or ``uploads`` uploads."""

    def __init__(self, app: ASGIApp, rate: int, uploads: int) -> None:
        self.app = app
        self.item = RateLimitItemPerSecond(rate) if rate > 0 else None
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        self.max_uploads = uploads
        self.uploads: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        who = client_id(scope)
        if self.item is not None and not self.limiter.hit(self.item, who):
            reset = self.limiter.get_window_stats(self.item, who).reset_time
            wait = max(1, math.ceil(reset - time.time()))
            await send_error(send, 429, "rate_limited",
                             f"more than {self.item.amount} requests per second from this client; "
                             f"retry in {wait} s", {"retry-after": str(wait)})
            return
        if scope["method"] != "POST" or not self.max_uploads:
            await self.app(scope, receive, send)
            return
        if self.uploads[who] >= self.max_uploads:
            await send_error(send, 429, "too_many_uploads",
                             f"{self.max_uploads} uploads from this client are already in progress; "
                             f"wait for one to finish", {"retry-after": str(UPLOAD_RETRY_AFTER_S)})
            return
        self.uploads[who] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.uploads[who] -= 1
            if not self.uploads[who]:
                del self.uploads[who]
