"""A remote worker hands a job's results back (PUT) and fetches them for a delivery (GET): the
node keeps every job's results in its own output folder, whichever machine made them."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations.
import os
import re
import uuid
from pathlib import Path
from typing import IO, Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session, sessionmaker

from node.api.deps import Config, Credentials, RemoteWorker, current_user, remote_worker
from node.core.config import Settings
from node.core.files import fsync_dir
from node.db.engine import session_scope
from node.db.models import Job, JobState, User

router = APIRouter(prefix="/api/jobs", tags=["workers"])
# What a job writes (node.core.outputs): these names and no others, so no path leaves its folder.
RESULT_NAME = re.compile(r"(seg|rtstruct|sr)\.dcm|overlay/[0-9.]{1,64}\.dcm")
MAX_RESULT_BYTES = 512 * 1024**2
# The worker that sends a result, as named on the job when it claimed it (workers.remote sends it).
WORKER_HEADER = "X-Segnode-Worker"
# Bytes gathered from the body before each write on a thread: few thread hops, little memory.
WRITE_BATCH_BYTES = 1024**2


def _path(settings: Settings, job_id: int, name: str) -> Path:
    if not RESULT_NAME.fullmatch(name):
        raise HTTPException(422, f"{name!r} is not a result a job writes")
    return settings.output_dir / f"job-{job_id}" / name


def uploader(request: Request, credentials: Credentials) -> User:
    """The worker behind an upload, from a session closed before the body is read: a result may
    take minutes to arrive, and no database connection waits on it meanwhile."""
    with session_scope(request.app.state.sessions) as db:
        user = remote_worker(current_user(request, db, credentials))
        db.expunge(user)
    return user


Uploader = Annotated[User, Depends(uploader)]


@router.put("/{job_id}/results/{name:path}")
async def put_result(
    job_id: int, name: str, request: Request, user: Uploader, settings: Config
) -> dict[str, Any]:
    """Keep one result file of a running job, durably (written, synced, renamed into place), if
    the worker sending it still holds the job: one whose lease lapsed overwrites nothing."""
    target = _path(settings, job_id, name)
    worker = request.headers.get(WORKER_HEADER, "")
    if not worker:
        raise HTTPException(
            400, f"a result is sent with its worker's name in {WORKER_HEADER} (upgrade the worker)"
        )
    declared = _declared_size(request)
    sessions: sessionmaker[Session] = request.app.state.sessions
    await run_in_threadpool(_check_holder, sessions, job_id, worker)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{uuid.uuid4().hex}.part")
    try:
        received = await _receive(request, temporary, declared)
        await run_in_threadpool(_keep, sessions, job_id, worker, temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return {"folder": str(target.parent.parent if "/" in name else target.parent), "bytes": received}


def _declared_size(request: Request) -> int:
    declared = request.headers.get("content-length", "")
    if not declared.isdigit():
        raise HTTPException(411, "a result is sent with its Content-Length")
    if int(declared) > MAX_RESULT_BYTES:
        raise HTTPException(413, f"a result of {declared} bytes; at most {MAX_RESULT_BYTES}")
    return int(declared)


def _check_holder(sessions: sessionmaker[Session], job_id: int, worker: str) -> None:
    """Refuse before the body comes when the job is not ``worker``'s."""
    with session_scope(sessions) as session:
        _refuse_unless_held(session.get(Job, job_id), job_id, worker)


def _keep(sessions: sessionmaker[Session], job_id: int, worker: str, temporary: Path, target: Path) -> None:
    """Rename the received file into place while the job's row is locked and still ``worker``'s:
    a claim by another worker waits for the rename, so it cannot slip between check and rename."""
    with session_scope(sessions) as session:
        _refuse_unless_held(session.get(Job, job_id, with_for_update=True), job_id, worker)
        temporary.replace(target)
        fsync_dir(target.parent)


def _refuse_unless_held(job: Job | None, job_id: int, worker: str) -> None:
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    if job.state != JobState.RUNNING:
        raise HTTPException(
            409, f"job {job_id} is {job.state.value}, not RUNNING: results are handed back while it runs"
        )
    if job.worker != worker:
        raise HTTPException(
            409,
            f"job {job_id} is no longer worker {worker}'s (its lease lapsed and {job.worker} took it "
            "over): this result is discarded",
        )


async def _receive(request: Request, path: Path, declared: int) -> int:
    """The body into ``path`` as it arrives, written in batches on a thread and synced; the bytes
    received, which must be the ``declared`` length."""
    received = 0
    batch = bytearray()
    with path.open("wb") as out:
        async for chunk in request.stream():
            received += len(chunk)
            if received > declared:
                raise HTTPException(400, f"more than the {declared} bytes of its Content-Length")
            batch += chunk
            if len(batch) >= WRITE_BATCH_BYTES:
                full, batch = batch, bytearray()
                await run_in_threadpool(out.write, full)
        await run_in_threadpool(_finish, out, batch)
    if received != declared:
        raise HTTPException(400, f"{received} of the {declared} bytes of its Content-Length arrived")
    return received


def _finish(out: IO[bytes], rest: bytearray) -> None:
    """The last bytes written and the file synced (on a thread, off the event loop)."""
    out.write(rest)
    out.flush()
    os.fsync(out.fileno())


@router.get("/{job_id}/results")
def list_results(job_id: int, user: RemoteWorker, settings: Config) -> list[str]:
    """The names of the job's result files the node keeps."""
    folder = settings.output_dir / f"job-{job_id}"
    found = (
        [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*.dcm"))] if folder.is_dir() else []
    )
    return [name for name in found if RESULT_NAME.fullmatch(name)]


@router.get("/{job_id}/results/{name:path}")
def get_result(job_id: int, name: str, user: RemoteWorker, settings: Config) -> FileResponse:
    target = _path(settings, job_id, name)
    if not target.is_file():
        raise HTTPException(404, f"job {job_id} has no {name}")
    return FileResponse(target, media_type="application/dicom")
