"""JSON refusals sent by the server's ASGI middleware, in the app's ``{"error", "detail"}`` shape."""

from __future__ import annotations

import json

from starlette.types import Send


async def send_error(send: Send, status: int, error: str, detail: str,
                     headers: dict[str, str] | None = None) -> None:
    """Send a complete JSON error response ``{"error": error, "detail": detail}`` with ``status``."""
    body = json.dumps({"error": error, "detail": detail}).encode("utf-8")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode("ascii"))]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
