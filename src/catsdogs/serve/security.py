"""Wire the server's protections into the app: headers, CORS, rate limits, API key, and their schema.

Order, outermost first: security headers (so every answer carries them, refusals included), CORS (a
browser's preflight needs no key), rate limits (unauthenticated guessing is limited too), the API key,
then the app. The OpenAPI document says which operations need the key and which may answer 401, 408
or 429, so clients and schema fuzzers see the server as it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from catsdogs.config import ServeConfig
from catsdogs.serve.auth import ApiKeyMiddleware, check_exposure, is_open, load_api_key
from catsdogs.serve.headers import SecurityHeadersMiddleware
from catsdogs.serve.ratelimit import EXEMPT_PATHS, RateLimitMiddleware

API_VERSION = "1"
"""Version of the HTTP API in the OpenAPI document (the package's own version is not shown)."""

SECURITY_SCHEME = "apiKey"
"""Name of the bearer-key scheme in the OpenAPI document."""

CORS_MAX_AGE_S = 600
"""Seconds a browser may cache a CORS preflight answer."""

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error", "detail"],
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
}


def _error_response(text: str, retry_after: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    if retry_after:
        out["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    return out


def cors_origins(cfg: ServeConfig) -> list[str]:
    """The origins of ``--cors-origin`` (empty: no CORS)."""
    return [o.strip().rstrip("/") for o in (cfg.cors_origin or "").split(",") if o.strip()]


def install_security(app: FastAPI, cfg: ServeConfig) -> None:
    """Add the middleware of ``cfg`` to ``app`` and describe the key and the refusals in its schema."""
    key = load_api_key(cfg)
    check_exposure(cfg, key)
    if key is not None:
        app.add_middleware(ApiKeyMiddleware, key=key)
    if cfg.rate_limit or cfg.max_uploads:
        app.add_middleware(RateLimitMiddleware, rate=cfg.rate_limit, uploads=cfg.max_uploads)
    origins = cors_origins(cfg)
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"], max_age=CORS_MAX_AGE_S)
    app.add_middleware(SecurityHeadersMiddleware)
    app.openapi = _openapi_with_security(app, key is not None, bool(cfg.rate_limit or cfg.max_uploads))  # type: ignore[method-assign]


def _openapi_with_security(app: FastAPI, keyed: bool, limited: bool) -> Callable[[], dict[str, Any]]:
    """Wrap ``app.openapi`` to add the bearer scheme and the 401/408/429 answers each operation can give."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schema["info"]["version"] = API_VERSION
        if keyed:
            schema.setdefault("components", {})["securitySchemes"] = {
                SECURITY_SCHEME: {"type": "http", "scheme": "bearer",
                                  "description": "the API key (--api-key-file or $CATSDOGS_API_KEY)"}}
        for path, operations in schema.get("paths", {}).items():
            for method, op in operations.items():
                responses = op.setdefault("responses", {})
                if keyed and not is_open(path):
                    op["security"] = [{SECURITY_SCHEME: []}]
                    responses["401"] = _error_response("No API key, or a wrong one")
                if limited and path not in EXEMPT_PATHS:
                    responses["429"] = _error_response("Too many requests or uploads from this client",
                                                       retry_after=True)
                if method == "post":
                    responses["408"] = _error_response("The body did not arrive within --body-timeout-s")
        app.openapi_schema = schema
        return schema

    return openapi
