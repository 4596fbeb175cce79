"""The node's web side (FastAPI; OpenAPI at /docs): health for supervisors, the JSON API for
programs, and the dashboard for people.

Every route but /healthz and /readyz (/metrics included) needs a user: a bearer token (a login's,
from POST /api/login, or an API token made with `segnode users token`) or the dashboard's session
cookie. Reading needs the viewer role, acting the admin role.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session, sessionmaker

from node.api import dashboard, health, rest, results
from node.api.auth import LoginThrottle
from node.api.deps import Viewer
from node.api.dicomweb import frames, retrieve, stow
from node.api.metrics import registry
from node.core.config import Settings
from node.core.queue import JobQueue, make_celery
from node.db.engine import make_engine, make_sessionmaker
from node.receive.storage import Storage


def create_app(settings: Settings, sessions: sessionmaker[Session] | None = None) -> FastAPI:
    """The app over the node's database (``sessions``, else one made from the settings)."""
    sessions = sessions or make_sessionmaker(make_engine(settings.effective_database_url))
    # STOW-RS stores as the listener does; the listener's process owns the leftovers of a crash.
    storage = Storage(settings.storage_dir, sessions.kw["bind"], settings.scp.min_free_bytes, owner=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        storage.close()

    # The OpenAPI description and its try-it page need a user like every other route.
    app = FastAPI(
        title="segnode",
        summary="The queue of a DICOM segmentation node",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.storage = storage
    app.state.settings = settings
    app.state.sessions = sessions
    app.state.throttle = LoginThrottle(settings.api.login_attempts, settings.api.login_window_s)
    app.state.metrics = registry(sessions, settings)
    app.state.queue = JobQueue(make_celery(settings), settings)
    if settings.api.cors_origins:
        # Preflights are answered before any user is asked for; the requests themselves still need one.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.api.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Accept", "Content-Type"],
            expose_headers=["Warning", "Retry-After"],
            max_age=600,
        )
    app.include_router(health.router)
    app.include_router(rest.router)
    app.include_router(results.router)
    if settings.dicomweb.enabled:
        app.include_router(stow.router)
        app.include_router(retrieve.router)
        app.include_router(frames.router)
    dashboard.mount(app)
    _serve_docs(app)
    return app


def _serve_docs(app: FastAPI) -> None:
    @app.get("/openapi.json", include_in_schema=False)
    def openapi(user: Viewer) -> dict[str, Any]:
        return app.openapi()

    @app.get("/docs", include_in_schema=False)
    def docs(user: Viewer) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="segnode API")
