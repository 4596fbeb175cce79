"""The JSON API: reading needs a viewer, acting an admin; each action on a job goes into its event
history under the user's name."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations.
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.api import views
from node.api.auth import LoginThrottle, check_password, issue_token, revoke_token
from node.api.deps import COOKIE, Admin, AnyUser, Config, Credentials, Db, Viewer, token_of
from node.api.echo import test_destination
from node.api.preview import preview_png
from node.config_report import report
from node.core.identifiers import node_key, search_key
from node.core.queue import JobQueue
from node.core.uids import is_valid_uid
from node.db.jobs import JobNotFoundError, cancel, request_completion, rerun, resend, retry
from node.db.models import Job, JobState, Pull, Role, Series, Study, utcnow
from node.db.operations import (
    PROCESSING,
    delivery_target,
    destination_answered,
    resume,
    suspend,
)
from node.jobs.pulling import request_pull

MAX_PAGE = 500
router = APIRouter(prefix="/api")


class Login(BaseModel):
    name: str = Field(max_length=64)  # as long as a user's name may be (the throttle keeps it)
    password: str = Field(max_length=1024)
    # The dashboard's login: the token also comes back as an HttpOnly, SameSite=Strict cookie.
    cookie: bool = False


class Rerun(BaseModel):
    segmenter: str


class Resend(BaseModel):
    destination: str | None = None


def queue_of(request: Request) -> JobQueue:
    found: JobQueue = request.app.state.queue
    return found


@router.post("/login", tags=["auth"])
def login(body: Login, request: Request, db: Db, settings: Config) -> JSONResponse:
    """A session token for a user's name and password; failed attempts are throttled."""
    throttle: LoginThrottle = request.app.state.throttle
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
    answer = JSONResponse({"token": token, "expires_at": views.iso(row.expires_at), "role": user.role.value})
    if body.cookie:
        answer.set_cookie(
            COOKIE,
            token,
            max_age=int(lifetime.total_seconds()),
            httponly=True,
            samesite="strict",
            # Behind a proxy that ends TLS the request itself looks like http.
            secure=request.url.scheme == "https" or (settings.api.public_url or "").startswith("https://"),
        )
    return answer


@router.post("/logout", tags=["auth"])
def logout(user: AnyUser, request: Request, credentials: Credentials, db: Db) -> JSONResponse:
    token = token_of(request, credentials)
    revoked = token is not None and revoke_token(db, token)
    db.commit()  # before the answer: the token must be dead when the client hears so
    answer = JSONResponse({"revoked": revoked})
    answer.delete_cookie(COOKIE)
    return answer


@router.get("/me", tags=["auth"])
def me(user: Viewer) -> dict[str, str]:
    return {"name": user.name, "role": user.role.value}


@router.get("/jobs", tags=["jobs"])
def list_jobs(
    user: Viewer,
    db: Db,
    settings: Config,
    state: Annotated[list[JobState] | None, Query()] = None,
    segmenter: str | None = None,
    rule: str | None = None,
    calling_ae: str | None = None,
    series: Annotated[str | None, Query(description="a series or study instance UID")] = None,
    q: Annotated[str | None, Query(description="a patient ID or accession number, exactly (admins)")] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    cursor: Annotated[int | None, Query(description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> dict[str, Any]:
    """Jobs, newest first, a page at a time (cursor: the id the next page starts below)."""
    query = views.jobs_query()
    if state:
        query = query.where(Job.state.in_(state))
    if segmenter:
        query = query.where(Job.segmenter == segmenter)
    if rule:
        query = query.where(Job.rule == rule)
    if calling_ae:
        query = query.where(Series.calling_ae == calling_ae)
    if series:
        query = query.where((Series.series_instance_uid == series) | (Study.study_instance_uid == series))
    if q:
        if user.role != Role.ADMIN:
            raise HTTPException(403, "searching by patient ID or accession number needs the admin role")
        key = search_key(node_key(settings.data_dir), q)
        query = query.where((Series.patient_key == key) | (Series.accession_key == key))
    if created_after:
        query = query.where(Job.created_at >= _utc(created_after))
    if created_before:
        query = query.where(Job.created_at < _utc(created_before))
    if cursor is not None:
        query = query.where(Job.id < cursor)
    rows = db.execute(query.order_by(Job.id.desc()).limit(limit + 1)).all()
    items = [views.job_row(row) for row in rows[:limit]]
    return {"items": items, "next_cursor": items[-1]["id"] if len(rows) > limit else None}


def _utc(moment: datetime) -> datetime:
    """A time without a zone is read as UTC, as every time the node shows is."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@router.get("/jobs/{job_id}", tags=["jobs"])
def get_job(job_id: int, user: Viewer, db: Db, settings: Config) -> dict[str, Any]:
    """One job with its event history (oldest first) and its deliveries."""
    found = views.job_detail(db, settings, job_id)
    if found is None:
        raise HTTPException(404, f"no job {job_id}")
    return found


@router.get("/jobs/{job_id}/preview.png", tags=["jobs"], response_class=Response)
def job_preview(job_id: int, user: Viewer, db: Db, settings: Config) -> Response:
    """Representative slices of the CT with each segment drawn in its colour (PNG)."""
    job = db.get(Job, job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    png = preview_png(db, settings, job)
    if png is None:
        raise HTTPException(404, f"job {job_id} has no segmentation to show ({job.state.value})")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


def act(request: Request, action: Callable[[Session], Job], send: bool = False) -> dict[str, Any]:
    """Run an admin's action in its own committed transaction; 404 / 409 for what cannot be done.
    ``send``: the job goes to the workers now (unless processing is suspended: then it waits)."""
    from node.db.engine import session_scope

    try:
        with session_scope(request.app.state.sessions) as s:
            job = action(s)
            job_id, state, segmenter = job.id, job.state.value, job.segmenter
    except JobNotFoundError as err:
        raise HTTPException(404, str(err)) from err
    except ValueError as err:
        raise HTTPException(409, str(err)) from err
    if send:
        queue_of(request).process(job_id, segmenter)
    return {"id": job_id, "state": state}


@router.post("/jobs/{job_id}/retry", tags=["jobs"])
def retry_job(job_id: int, user: Admin, request: Request) -> dict[str, Any]:
    """Run the job again from the start (its SEG keeps the same UIDs: no duplicate at the PACS)."""
    return act(request, lambda s: retry(s, job_id, who=f"user {user.name}"), send=True)


@router.post("/jobs/{job_id}/cancel", tags=["jobs"])
def cancel_job(job_id: int, user: Admin, request: Request) -> dict[str, Any]:
    """Stop the job where it is: a worker running it discards its result, nothing more is sent."""
    return act(request, lambda s: cancel(s, job_id, who=f"user {user.name}"))


@router.post("/jobs/{job_id}/rerun", tags=["jobs"])
def rerun_job(job_id: int, body: Rerun, user: Admin, request: Request, settings: Config) -> dict[str, Any]:
    """Run the job's series again with another segmenter, as a new job (same rule and destinations)."""
    from segmenters import registry

    known = set(registry.available()) | set(settings.segmenters)
    if body.segmenter not in known:
        raise HTTPException(
            422, f"segmenter {body.segmenter!r} is not installed or configured ({', '.join(sorted(known))})"
        )
    return act(request, lambda s: rerun(s, job_id, body.segmenter, who=f"user {user.name}"))


@router.post("/jobs/{job_id}/resend", tags=["jobs"])
def resend_job(job_id: int, user: Admin, request: Request, body: Resend | None = None) -> dict[str, Any]:
    """Send a finished job's results again, to every destination or to one."""
    destination = body.destination if body else None
    return act(request, lambda s: resend(s, job_id, who=f"user {user.name}", destination=destination))


@router.get("/series/{uid}", tags=["series"])
def get_series(uid: str, user: Viewer, db: Db, settings: Config) -> dict[str, Any]:
    """A stored series, its jobs, and the rule tester: which rule takes it, why each other declines."""
    found = views.series_detail(db, settings, uid)
    if found is None:
        raise HTTPException(404, f"no series {uid} was received")
    return found


@router.post("/series/{uid}/complete", tags=["series"])
def complete_series(uid: str, user: Admin, db: Db) -> dict[str, Any]:
    """Take a series (or every series of a study) still receiving as complete now."""
    waiting = request_completion(db, uid)
    if waiting is None:
        raise HTTPException(404, f"no series or study {uid} was received")
    return {"completing": waiting}


@router.get("/studies", tags=["series"])
def list_studies(
    user: Viewer,
    db: Db,
    cursor: int | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> dict[str, Any]:
    """Studies received, newest first, with their series."""
    return views.studies(db, cursor, limit)


@router.get("/queue", tags=["queue"])
def queue_overview(user: Viewer, db: Db, settings: Config) -> dict[str, Any]:
    """The live queue: counts by state, what needs a person, what is under way, what finished last."""
    return views.queue_overview(db, settings, utcnow())


@router.get("/queues", tags=["queue"])
def queue_depths(user: Viewer, db: Db, settings: Config, request: Request) -> list[dict[str, Any]]:
    """Each queue's depth, as the database counts it and as the broker holds it."""
    return views.queues(db, settings, queue_of(request).app)


@router.get("/workers", tags=["queue"])
def list_workers(user: Viewer, db: Db, settings: Config) -> list[dict[str, Any]]:
    """Workers heard from in the last day: online or not, GPU, current job, jobs done in the last day."""
    return views.workers(db, settings, utcnow())


@router.get("/charts", tags=["queue"])
def throughput(user: Viewer, db: Db) -> dict[str, Any]:
    """Jobs finished and the median wait from last instance to delivery, by hour and by day."""
    return views.charts(db, utcnow())


@router.post("/processing/suspend", tags=["queue"])
def suspend_processing(user: Admin, db: Db) -> dict[str, Any]:
    """No job goes to a worker until resumed; the node keeps receiving and jobs wait, nothing lost."""
    return {"suspended": True, "changed": suspend(db, PROCESSING, user.name)}


@router.post("/processing/resume", tags=["queue"])
def resume_processing(user: Admin, request: Request, db: Db) -> dict[str, Any]:
    """Processing again: jobs that waited go to the workers, oldest first."""
    changed = resume(db, PROCESSING)
    queued = db.execute(
        select(Job.id, Job.segmenter).where(Job.state == JobState.QUEUED).order_by(Job.id)
    ).all()
    db.commit()
    for job_id, segmenter in queued:  # their messages were taken while suspended; the claim is idempotent
        queue_of(request).process(job_id, segmenter)
    return {"suspended": False, "changed": changed}


@router.get("/destinations", tags=["destinations"])
def list_destinations(user: Viewer, db: Db, settings: Config) -> list[dict[str, Any]]:
    """Every destination: address, state (up, down, suspended, unknown), last answer, what waits."""
    return views.destinations(db, settings)


def _destination(settings: Config, name: str) -> None:
    if name not in settings.destinations:
        raise HTTPException(404, f"no destination {name!r} is configured")


@router.post("/destinations/{name}/echo", tags=["destinations"])
def echo_destination(name: str, user: Admin, db: Db, settings: Config) -> dict[str, Any]:
    """Test the destination now (C-ECHO, or a QIDO-RS search for a DICOMweb one); its answer
    becomes the destination's last known state."""
    _destination(settings, name)
    destination = settings.destinations[name]
    ok, answer = test_destination(destination, settings.scp.ae_title, settings.worker.delivery_timeout_s)
    destination_answered(db, name, ok, answer)
    return {"destination": name, "ok": ok, "answer": answer}


@router.post("/destinations/{name}/suspend", tags=["destinations"])
def suspend_destination(name: str, user: Admin, db: Db, settings: Config) -> dict[str, Any]:
    """Send nothing to this destination until resumed; its results wait, nothing lost."""
    _destination(settings, name)
    return {"destination": name, "suspended": True, "changed": suspend(db, delivery_target(name), user.name)}


@router.post("/destinations/{name}/resume", tags=["destinations"])
def resume_destination(name: str, user: Admin, db: Db, settings: Config) -> dict[str, Any]:
    _destination(settings, name)
    return {"destination": name, "suspended": False, "changed": resume(db, delivery_target(name))}


class PullRequest(BaseModel):
    source: str
    study_instance_uid: str


def _pull_row(pull: Pull) -> dict[str, Any]:
    return {
        "id": pull.id,
        "source": pull.source,
        "study_instance_uid": pull.study_instance_uid,
        "state": pull.state,
        "requested_by": pull.requested_by,
        "requested_at": views.iso(pull.requested_at),
        "finished_at": views.iso(pull.finished_at),
        "instances": pull.instances,
        "message": pull.message,
    }


@router.post("/pulls", tags=["pulls"])
def ask_pull(body: PullRequest, user: Admin, db: Db, settings: Config) -> dict[str, Any]:
    """Fetch a study from a source (a PACS) and segment it as if it had been sent; asking again
    for the same study from the same source answers with the pull already asked for."""
    if body.source not in settings.sources:
        raise HTTPException(404, f"no source {body.source!r} is configured")
    if not is_valid_uid(body.study_instance_uid):
        raise HTTPException(422, "study_instance_uid is not a valid DICOM UID")
    pull, created = request_pull(db, body.source, body.study_instance_uid, f"user {user.name}")
    db.flush()
    return {**_pull_row(pull), "created": created}


@router.get("/pulls", tags=["pulls"])
def list_pulls(user: Viewer, db: Db) -> list[dict[str, Any]]:
    """The latest pulls, newest first."""
    return [_pull_row(p) for p in db.scalars(select(Pull).order_by(Pull.id.desc()).limit(MAX_PAGE))]


@router.get("/config", tags=["config"])
def configuration(user: Viewer, settings: Config) -> dict[str, Any]:
    """The configuration as `segnode config check` describes it, with its problems."""
    lines, problems = report(settings)
    return {"lines": lines, "problems": problems, "ok": not problems}
