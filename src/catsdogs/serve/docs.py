"""The API docs, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), with their files served by the app itself.

FastAPI's own pages load Swagger UI and ReDoc from a CDN: blank on an offline machine, and a CSP that
has to trust that CDN. The fastapi-offline package ships both bundles (Swagger UI 5, ReDoc 2; 2.8 MB)
and builds the same pages on them, served under :data:`ASSETS_PREFIX`, so the docs work without a
network and the CSP allows no other origin (:mod:`catsdogs.serve.headers`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

DOCS_PATH = "/docs"
"""Swagger UI."""

REDOC_PATH = "/redoc"
"""ReDoc."""

OAUTH2_REDIRECT_PATH = "/docs/oauth2-redirect"
"""Swagger UI's OAuth2 redirect page (FastAPI's default path)."""

ASSETS_PREFIX = "/docs-assets"
"""Where the Swagger UI and ReDoc bundles are served from (open without a key, like the docs)."""


def create_documented_app(**fastapi_kwargs: Any) -> FastAPI:
    """A FastAPI app whose /docs and /redoc load their scripts and styles from this server only."""
    return FastAPIOffline(docs_url=DOCS_PATH, redoc_url=REDOC_PATH, static_url=ASSETS_PREFIX,
                          swagger_ui_oauth2_redirect_url=OAUTH2_REDIRECT_PATH, **fastapi_kwargs)
