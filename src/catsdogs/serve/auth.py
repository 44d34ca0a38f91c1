"""API-key authentication of ``catsdogs serve``: where the key comes from, who must send it, the check.

The key comes from ``--api-key-file`` or ``$CATSDOGS_API_KEY``, never from a flag (a flag shows in
``ps`` and shell history). Clients send ``Authorization: Bearer KEY``; the key is compared with
:func:`hmac.compare_digest`, in time independent of where the first wrong character is. Without a key
the API is open, which :func:`check_exposure` allows only on a loopback address (or with
``--insecure``).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from catsdogs.config import ServeConfig, flag
from catsdogs.errors import ConfigError
from catsdogs.serve.docs import ASSETS_PREFIX, DOCS_PATH, OAUTH2_REDIRECT_PATH, REDOC_PATH
from catsdogs.serve.replies import send_error

API_KEY_ENV = "CATSDOGS_API_KEY"
"""Environment variable holding the API key when no --api-key-file is given."""

MIN_KEY_CHARS = 16
"""Shortest key accepted: 16 characters of token_urlsafe carry 96 bits, beyond online guessing at any
rate this server answers (a shorter key is a typo or a password, not a generated key)."""

OPEN_PATHS = frozenset({"/healthz", "/", "/index.html", DOCS_PATH, OAUTH2_REDIRECT_PATH, REDOC_PATH,
                        "/openapi.json"})
"""Paths served without a key: the load balancer's health check, the page (it asks for the key) and
the API description. Everything else, unknown paths and /metrics included, needs the key."""

OPEN_PREFIXES = ("/static/", f"{ASSETS_PREFIX}/")
"""Path prefixes served without a key: the page's script and style sheet, the docs' bundles."""


def is_open(path: str) -> bool:
    """Return True when ``path`` is served without a key."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def load_api_key(cfg: ServeConfig) -> str | None:
    """Return the configured key (``--api-key-file``, else ``$CATSDOGS_API_KEY``), or None for no key."""
    if cfg.api_key_file:
        path = Path(cfg.api_key_file)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {flag('api_key_file')} {cfg.api_key_file!r} "
                              f"({getattr(exc, 'strerror', None) or exc}); fix the path") from None
        source = f"{flag('api_key_file')} {cfg.api_key_file!r}"
    else:
        key = os.environ.get(API_KEY_ENV, "").strip()
        if not key:
            return None
        source = f"${API_KEY_ENV}"
    if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
        raise ConfigError(f"the API key in {source} must be one word of at least {MIN_KEY_CHARS} characters; "
                          f"make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return key


def is_loopback(host: str) -> bool:
    """Return True when ``host`` binds only this machine (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public address


def check_exposure(cfg: ServeConfig, key: str | None) -> None:
    """Refuse to serve an open API on a non-loopback address unless ``--insecure`` says so."""
    if key is None and not cfg.insecure and not is_loopback(cfg.host):
        raise ConfigError(f"--host {cfg.host} exposes the API without a key: set {flag('api_key_file')} "
                          f"or ${API_KEY_ENV}, or pass {flag('insecure')} to serve it open")


class ApiKeyMiddleware:
    """Answer 401 JSON to any request outside :data:`OPEN_PATHS` without ``Authorization: Bearer KEY``."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self._key = key.encode("utf-8")

    def authorized(self, scope: Scope) -> bool:
        """Return True when the request carries the key."""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]) or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        await send_error(send, 401, "unauthorized",
                         "send the API key as 'Authorization: Bearer KEY'",
                         {"www-authenticate": 'Bearer realm="catsdogs"'})
