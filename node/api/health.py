"""Health for supervisors (no login) and metrics for Prometheus (a viewer's token)."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations.
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from node.api.deps import Config, Db, Viewer
from node.api.metrics import free_bytes
from node.api.views import MISSED_BEATS, live
from node.core.queue import broker_fault_now

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process lives and answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(db: Db, settings: Config, request: Request) -> JSONResponse:
    """Ready to take work: the database and the broker answer, the storage has room, and at least
    one worker has a live heartbeat."""
    checks: dict[str, str] = {}
    try:
        db.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as err:  # noqa: BLE001 - any failure is "not ready", said in the answer
        checks["database"] = f"unreachable: {type(err).__name__}"
    checks["broker"] = broker_fault_now(request.app.state.queue.app, settings.effective_broker_url) or "ok"
    free = free_bytes(settings.storage_dir)
    needed = settings.scp.min_free_bytes
    checks["storage"] = "ok" if free >= needed else f"{free} bytes free, {needed} needed"
    if checks["database"] == "ok":
        found = live(db, settings)
        window = MISSED_BEATS * settings.worker.heartbeat_s
        checks["workers"] = (
            f"ok: {len(found)} online" if found else f"no worker has been heard from in {window:g} s"
        )
    ready = all(v.startswith("ok") for v in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics")
def prometheus(user: Viewer, request: Request) -> Response:
    """The node's metrics for Prometheus (a viewer's API token in its bearer_token setting)."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
