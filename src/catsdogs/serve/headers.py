"""Security headers on every response of ``catsdogs serve``.

A Content-Security-Policy per kind of response, ``X-Content-Type-Options: nosniff``, no framing, no
referrer, and no ``Server`` header. Three policies: the web page may load only this server's script,
style sheet and API (plus the ``blob:`` preview of the chosen photo); API answers may load nothing;
other HTML (the API docs, the evaluation report) may run only the inline scripts and styles it was
served with, allowed by their SHA-256 hashes, which the middleware computes from the body it passes
on, and files of this server (the docs' Swagger UI and ReDoc bundles, :mod:`catsdogs.serve.docs`).
No policy names another origin.
"""

from __future__ import annotations

import base64
import hashlib
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from catsdogs.serve.docs import REDOC_PATH

PAGE_PATHS = frozenset({"/", "/index.html"})
"""The web page; its files under ``/static/`` get the same policy."""

PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'")
"""The page: its own script and style sheet only (no inline code); blob: for the photo preview,
data: for the empty favicon."""

API_CSP = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
"""JSON answers and everything else that is no HTML page: load nothing, never framed."""

COMMON_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",  # frame-ancestors for browsers without CSP level 2
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}
"""Sent with every response."""

_INLINE = re.compile(rb"<(script|style)\b([^>]*)>(.*?)</\1\s*>", re.IGNORECASE | re.DOTALL)


def inline_hashes(html: bytes) -> tuple[list[str], list[str]]:
    """Return the CSP hash sources (``'sha256-...'``) of the inline scripts and styles of ``html``."""
    scripts: list[str] = []
    styles: list[str] = []
    for tag, attrs, body in _INLINE.findall(html):
        if tag.lower() == b"script" and b"src=" in attrs.lower():
            continue  # an external script is allowed by its origin, not by a hash
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")
        (scripts if tag.lower() == b"script" else styles).append(f"'sha256-{digest}'")
    return scripts, styles


EMPTY_STYLE = "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='"
"""The hash of an empty inline style. ReDoc (styled-components) adds empty ``<style>`` elements and fills
them through the CSSOM (``insertRule``), which style-src does not govern; without this hash the first
element is refused and ReDoc stops with its error 17. It allows empty style elements only."""

REDOC_EXTRA = {"style-src": [EMPTY_STYLE], "worker-src": ["blob:"]}
"""What ReDoc needs beyond the docs' policy: empty styles (above) and its search index, a worker that
its own bundle starts from a ``blob:`` URL (only script already running on the page can make one)."""


def hashed_html_csp(html: bytes, extra: dict[str, list[str]] | None = None) -> str:
    """The policy of a generated HTML page: this server's files and its own inline code by hash."""
    scripts, styles = inline_hashes(html)
    more = extra or {}
    script_src = " ".join(["'self'", *scripts])
    style_src = " ".join(["'self'", *styles, *more.get("style-src", [])])
    workers = f"worker-src {' '.join(more['worker-src'])}; " if "worker-src" in more else ""
    return (f"default-src 'none'; script-src {script_src}; style-src {style_src}; {workers}"
            f"img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
            f"base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _is_html(message: Message) -> bool:
    for name, value in message.get("headers", ()):
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"text/html"
    return False


def _with_headers(message: Message, extra: dict[str, str]) -> Message:
    """The response start ``message`` without a Server header and with ``extra`` set (replacing)."""
    drop = {b"server", *(k.encode("latin-1") for k in extra)}
    headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in drop]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
    return {**message, "headers": headers}


class SecurityHeadersMiddleware:
    """Add the security headers to every HTTP response; buffer generated HTML pages to hash their code."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        page = path in PAGE_PATHS or path.startswith("/static/")
        start: Message | None = None
        chunks: list[bytes] = []

        async def send_with_headers(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                if page or not _is_html(message):
                    csp = PAGE_CSP if page else API_CSP
                    await send(_with_headers(message, {**COMMON_HEADERS, "content-security-policy": csp}))
                else:
                    start = message  # hold the start until the whole page is here to hash
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            csp = hashed_html_csp(body, REDOC_EXTRA if path == REDOC_PATH else None)
            await send(_with_headers(start, {**COMMON_HEADERS, "content-security-policy": csp}))
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_with_headers)
