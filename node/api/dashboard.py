"""The dashboard: pages rendered on the server (Jinja2), kept live by a little JavaScript that
fetches each panel's HTML again every few seconds; no build step, nothing to install on the user's
side. It reads through the same views as the JSON API and acts through the JSON API's routes, but
for Open in viewer: a form whose answer is the viewer's address, since a new tab needs a navigation."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations.
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from node.api import rest, views
from node.api.auth import issue_token
from node.api.deps import Admin, Config, Db, NotLoggedInError, Viewer
from node.db.models import Job, Role, utcnow

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
# Every panel of a page, and how often (ms) the page fetches it again.
POLL_MS = 2000
CHART_POLL_MS = 60000


def _page(request: Request, name: str, user: Any, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(
        request, name, {"user": user, "admin": user.role == Role.ADMIN, "poll_ms": POLL_MS, **context}
    )


def mount(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(NotLoggedInError)
    async def to_login(request: Request, exc: NotLoggedInError) -> Response:
        """People on a page go to the login page; programs get the 401 they asked for."""
        if request.url.path.startswith(("/api/", "/metrics")) or "text/html" not in request.headers.get(
            "accept", ""
        ):
            from fastapi.exception_handlers import http_exception_handler

            return await http_exception_handler(request, exc)
        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)

    @app.get("/login", include_in_schema=False)
    def login_page(request: Request) -> HTMLResponse:
        return templates.TemplateResponse(request, "login.html", {"user": None})

    @app.get("/", include_in_schema=False)
    def queue_page(request: Request, user: Viewer, settings: Config) -> HTMLResponse:
        return _page(
            request, "queue.html", user, chart_poll_ms=CHART_POLL_MS, segmenters=_segmenters(settings)
        )

    @app.get("/ui/queue", include_in_schema=False)
    def queue_panel(request: Request, user: Viewer, db: Db, settings: Config) -> HTMLResponse:
        return _page(request, "_queue.html", user, queue=views.queue_overview(db, settings, utcnow()))

    @app.get("/ui/workers", include_in_schema=False)
    def workers_panel(request: Request, user: Viewer, db: Db, settings: Config) -> HTMLResponse:
        return _page(
            request,
            "_workers.html",
            user,
            workers=views.workers(db, settings, utcnow()),
            queues=views.queues(db, settings, request.app.state.queue.app),
        )

    @app.get("/ui/destinations", include_in_schema=False)
    def destinations_panel(request: Request, user: Viewer, db: Db, settings: Config) -> HTMLResponse:
        return _page(request, "_destinations.html", user, destinations=views.destinations(db, settings))

    @app.get("/ui/charts", include_in_schema=False)
    def charts_panel(request: Request, user: Viewer, db: Db) -> HTMLResponse:
        return _page(request, "_charts.html", user, charts=views.charts(db, utcnow()))

    @app.get("/jobs/{job_id}", include_in_schema=False)
    def job_page(job_id: int, request: Request, user: Viewer, db: Db, settings: Config) -> HTMLResponse:
        job = _job(db, settings, job_id)
        return _page(
            request, "job.html", user, job=job, segmenters=_segmenters(settings), viewer=_has_viewer(settings)
        )

    @app.get("/ui/jobs/{job_id}", include_in_schema=False)
    def job_panel(job_id: int, request: Request, user: Viewer, db: Db, settings: Config) -> HTMLResponse:
        return _page(
            request,
            "_job.html",
            user,
            job=_job(db, settings, job_id),
            segmenters=_segmenters(settings),
            viewer=_has_viewer(settings),
        )

    @app.post("/jobs/{job_id}/viewer", include_in_schema=False)
    def open_in_viewer(job_id: int, user: Viewer, db: Db, settings: Config) -> RedirectResponse:
        """The job's study in the configured web viewer, with a read token made for this click (the
        viewer sends it on each DICOMweb request): the session's own token never leaves the node."""
        if settings.api.viewer_url is None:
            raise HTTPException(404, "no web viewer is configured (api.viewer_url)")
        found = db.execute(views.jobs_query().where(Job.id == job_id)).first()
        if found is None:
            raise HTTPException(404, f"no job {job_id}")
        study = found[2].study_instance_uid
        token, _ = issue_token(db, user, "viewer", timedelta(hours=settings.api.viewer_token_hours))
        url = settings.api.viewer_url.replace("{study}", quote(study, safe=""))
        return RedirectResponse(f"{url}{'&' if '?' in url else '?'}token={token}", status_code=303)

    @app.get("/search", include_in_schema=False)
    def search_page(q: str, request: Request, user: Admin, db: Db, settings: Config) -> HTMLResponse:
        """An admin's search for a patient ID or accession number (exact), through the JSON API's."""
        found = rest.list_jobs(user=user, db=db, settings=settings, q=q, limit=rest.MAX_PAGE)
        return _page(request, "search.html", user, q=q, jobs=found["items"])

    @app.get("/series/{uid}", include_in_schema=False)
    def series_page(uid: str, request: Request, user: Viewer, db: Db, settings: Config) -> HTMLResponse:
        series = views.series_detail(db, settings, uid)
        if series is None:
            raise HTTPException(404, f"no series {uid} was received")
        return _page(request, "series.html", user, series=series)


def _job(db: Db, settings: Config, job_id: int) -> dict[str, Any]:
    job = views.job_detail(db, settings, job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


def _has_viewer(settings: Config) -> bool:
    return settings.api.viewer_url is not None


def _segmenters(settings: Config) -> list[str]:
    from segmenters import registry

    return sorted(set(registry.available()) | set(settings.segmenters))
