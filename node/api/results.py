"""A remote worker hands a job's results back (PUT) and fetches them for a delivery (GET): the
node keeps every job's results in its own output folder, whichever machine made them."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations.
import os
import re
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from node.api.deps import Config, Db, RemoteWorker
from node.core.config import Settings
from node.db.models import Job, JobState
from node.receive.spool_files import fsync_dir

router = APIRouter(prefix="/api/jobs", tags=["workers"])
# What a job writes (node.core.outputs): these names and no others, so no path leaves its folder.
RESULT_NAME = re.compile(r"(seg|rtstruct|sr)\.dcm|overlay/[0-9.]{1,64}\.dcm")
MAX_RESULT_BYTES = 512 * 1024**2


def _path(settings: Settings, job_id: int, name: str) -> Path:
    if not RESULT_NAME.fullmatch(name):
        raise HTTPException(422, f"{name!r} is not a result a job writes")
    return settings.output_dir / f"job-{job_id}" / name


@router.put("/{job_id}/results/{name:path}")
async def put_result(
    job_id: int, name: str, request: Request, user: RemoteWorker, settings: Config, db: Db
) -> dict[str, Any]:
    """Keep one result file of a running job, durably (written, synced, renamed into place)."""
    target = _path(settings, job_id, name)
    job = db.get(Job, job_id)
    if job is None or job.state != JobState.RUNNING:
        raise HTTPException(409, f"job {job_id} is not running: results are handed back while it runs")
    declared = request.headers.get("content-length", "")
    if not declared.isdigit():
        raise HTTPException(411, "a result is sent with its Content-Length")
    if int(declared) > MAX_RESULT_BYTES:
        raise HTTPException(413, f"a result of {declared} bytes; at most {MAX_RESULT_BYTES}")
    body = await request.body()
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{uuid.uuid4().hex}.part")
    await run_in_threadpool(_write, temporary, body)
    temporary.replace(target)
    await run_in_threadpool(fsync_dir, target.parent)
    return {"folder": str(target.parent.parent if "/" in name else target.parent), "bytes": len(body)}


def _write(path: Path, body: bytes) -> None:
    """``body`` into ``path``, synced (on a thread, off the event loop)."""
    with path.open("wb") as out:
        out.write(body)
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
