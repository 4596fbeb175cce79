"""The REST API (FastAPI; OpenAPI at /docs): health for supervisors, login, and the job queue for
viewers and admins.

Every route but /healthz and /readyz (/metrics included) needs a bearer token: a login's
(POST /api/login) or an API token made with `segnode users token`. Reading needs the viewer role,
acting the admin role, and each action goes into the job's event history under the user's name.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at definition, and
# the dependencies they name (Db, Viewer, Admin) are local to create_app.
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from node.api.auth import LoginThrottle, check_password, issue_token, revoke_token, user_for_token
from node.api.metrics import free_bytes, registry
from node.core.config import Settings
from node.core.queue import JobQueue, make_celery
from node.db.engine import make_engine, make_sessionmaker, session_scope
from node.db.jobs import JobNotFoundError, cancel, retry
from node.db.models import Job, JobEvent, JobState, Role, Series, Study, User

MAX_PAGE = 500


class Login(BaseModel):
    name: str
    password: str


def create_app(settings: Settings, sessions: sessionmaker[Session] | None = None) -> FastAPI:
    """The API over the node's database (``sessions``, else one made from the settings)."""
    sessions = sessions or make_sessionmaker(make_engine(settings.effective_database_url))
    throttle = LoginThrottle(settings.api.login_attempts, settings.api.login_window_s)
    bearer = HTTPBearer(auto_error=False)
    app = FastAPI(title="segnode", summary="The queue of a DICOM segmentation node", docs_url="/docs")

    def session() -> Iterator[Session]:
        with session_scope(sessions) as s:
            yield s

    Db = Annotated[Session, Depends(session)]

    def current_user(
        db: Db, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> User:
        if credentials is None:
            raise HTTPException(
                401,
                "log in first (POST /api/login) or send an API token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        user = user_for_token(db, credentials.credentials)
        if user is None:
            raise HTTPException(
                401,
                "the token is expired, revoked or unknown: log in again",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return user

    Viewer = Annotated[User, Depends(current_user)]

    def admin(user: Viewer) -> User:
        if user.role != Role.ADMIN:
            raise HTTPException(403, f"{user.name} is a viewer; this needs the admin role")
        return user

    Admin = Annotated[User, Depends(admin)]

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process lives and answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """Ready to take work: the database answers and the storage has room."""
        checks: dict[str, str] = {}
        try:
            with sessions() as s:
                s.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as err:  # noqa: BLE001 - any failure is "not ready", said in the answer
            checks["database"] = f"unreachable: {type(err).__name__}"
        free = free_bytes(settings.storage_dir)
        needed = settings.scp.min_free_bytes
        checks["storage"] = "ok" if free >= needed else f"{free} bytes free, {needed} needed"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    metrics = registry(sessions, settings.storage_dir)

    @app.get("/metrics", tags=["health"])
    def prometheus(user: Viewer) -> Response:
        """The node's metrics for Prometheus (a viewer's API token in its bearer_token setting)."""
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    @app.post("/api/login", tags=["auth"])
    def login(body: Login, request: Request, db: Db) -> JSONResponse:
        """A session token for a user's name and password; failed attempts are throttled."""
        address = request.client.host if request.client else "unknown"
        keys = (f"name:{body.name}", f"address:{address}")
        wait = throttle.retry_after(*keys)
        if wait > 0:
            raise HTTPException(
                429, "too many failed logins: wait and try again", headers={"Retry-After": f"{wait:.0f}"}
            )
        user = check_password(db, body.name, body.password)
        if user is None:
            throttle.failed(*keys)
            raise HTTPException(401, "wrong name or password")
        throttle.succeeded(*keys)
        lifetime = timedelta(hours=settings.api.session_hours)
        token, row = issue_token(db, user, "login", lifetime)
        db.commit()  # before the answer: the client may use the token at once
        return JSONResponse({"token": token, "expires_at": _iso(row.expires_at), "role": user.role.value})

    @app.post("/api/logout", tags=["auth"])
    def logout(
        user: Viewer, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)], db: Db
    ) -> dict[str, bool]:
        revoked = credentials is not None and revoke_token(db, credentials.credentials)
        db.commit()  # before the answer: the token must be dead when the client hears so
        return {"revoked": revoked}

    @app.get("/api/me", tags=["auth"])
    def me(user: Viewer) -> dict[str, str]:
        return {"name": user.name, "role": user.role.value}

    @app.get("/api/jobs", tags=["jobs"])
    def list_jobs(
        user: Viewer,
        db: Db,
        state: Annotated[list[JobState] | None, Query()] = None,
        segmenter: str | None = None,
        rule: str | None = None,
        calling_ae: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        cursor: Annotated[int | None, Query(description="next_cursor of the previous page")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    ) -> dict[str, Any]:
        """Jobs, newest first, a page at a time (cursor: the id the next page starts below)."""
        query = (
            select(Job, Series, Study)
            .join(Series, Job.series_id == Series.id)
            .join(Study, Series.study_id == Study.id)
        )
        if state:
            query = query.where(Job.state.in_(state))
        if segmenter:
            query = query.where(Job.segmenter == segmenter)
        if rule:
            query = query.where(Job.rule == rule)
        if calling_ae:
            query = query.where(Series.calling_ae == calling_ae)
        if created_after:
            query = query.where(Job.created_at >= created_after)
        if created_before:
            query = query.where(Job.created_at < created_before)
        if cursor is not None:
            query = query.where(Job.id < cursor)
        rows = db.execute(query.order_by(Job.id.desc()).limit(limit + 1)).all()
        items = [_job(job, series, study) for job, series, study in rows[:limit]]
        more = len(rows) > limit
        return {"items": items, "next_cursor": items[-1]["id"] if more else None}

    @app.get("/api/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: int, user: Viewer, db: Db) -> dict[str, Any]:
        """One job with its event history (oldest first) and its deliveries."""
        found = db.execute(
            select(Job, Series, Study)
            .join(Series, Job.series_id == Series.id)
            .join(Study, Series.study_id == Study.id)
            .where(Job.id == job_id)
        ).first()
        if found is None:
            raise HTTPException(404, f"no job {job_id}")
        job, series, study = found
        events = db.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
        return {
            **_job(job, series, study),
            "outputs": list(job.outputs),
            "destinations": list(job.destinations),
            "events": [
                {
                    "at": _iso(e.at),
                    "event": e.event,
                    "state": e.state.value,
                    "host": e.host,
                    "message": e.message,
                }
                for e in events
            ],
            "deliveries": [
                {
                    "destination": d.destination,
                    "output": d.output,
                    "state": d.state.value,
                    "attempts": d.attempts,
                    "last_status": d.last_status,
                    "delivered_at": _iso(d.delivered_at),
                    "next_attempt_at": _iso(d.next_attempt_at),
                }
                for d in job.deliveries
            ],
        }

    @app.post("/api/jobs/{job_id}/retry", tags=["jobs"])
    def retry_job(job_id: int, user: Admin) -> dict[str, Any]:
        """Run the job again from the start (its SEG keeps the same UIDs: no duplicate at the PACS)."""
        state = _act(sessions, job_id, lambda s: retry(s, job_id, who=f"user {user.name}"))
        JobQueue(make_celery(settings)).process(job_id)
        return {"id": job_id, "state": state}

    @app.post("/api/jobs/{job_id}/cancel", tags=["jobs"])
    def cancel_job(job_id: int, user: Admin) -> dict[str, Any]:
        """Stop the job where it is: a worker running it discards its result, nothing more is sent."""
        return {
            "id": job_id,
            "state": _act(sessions, job_id, lambda s: cancel(s, job_id, who=f"user {user.name}")),
        }

    return app


def _act(sessions: sessionmaker[Session], job_id: int, action: Callable[[Session], Job]) -> str:
    """Run an admin's action in its own committed transaction; 404 / 409 for what cannot be done."""
    try:
        with session_scope(sessions) as s:
            return action(s).state.value
    except JobNotFoundError as err:
        raise HTTPException(404, str(err)) from err
    except ValueError as err:
        raise HTTPException(409, str(err)) from err


def _job(job: Job, series: Series, study: Study) -> dict[str, Any]:
    return {
        "id": job.id,
        "state": job.state.value,
        "reason": job.reason,
        "segmenter": job.segmenter,
        "rule": job.rule,
        "study_instance_uid": study.study_instance_uid,
        "series_instance_uid": series.series_instance_uid,
        "modality": series.modality,
        "series_description": series.series_description,
        "calling_ae": series.calling_ae,
        "instance_count": job.instance_count,
        "attempts": job.attempts,
        "worker": job.worker,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "hold_until": _iso(job.hold_until),
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None
