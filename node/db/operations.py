"""What admins steer and watch beside the jobs: suspended work, worker heartbeats, the state of
each destination, and the webhook outbox. Each function works in the caller's transaction."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.engine import insert_unless_present
from node.db.models import DestinationStatus, Notification, Suspension, WorkerBeat, utcnow

PROCESSING = "processing"


def delivery_target(destination: str) -> str:
    return f"delivery:{destination}"


def _add_unless_present(session: Session, model: Any, key: str, **values: Any) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING on ``key``: two callers adding the same row at once (two
    workers, two admins) both go on, where a plain INSERT fails one of them; True if this one added it."""
    table = model.__table__
    statement = insert_unless_present(session.get_bind().dialect.name, table, key).values(**values)
    # RETURNING tells whether the row went in: rowcount is -1 on some drivers.
    return session.execute(statement.returning(table.c[key])).first() is not None


def suspend(session: Session, target: str, who: str) -> bool:
    """Suspend ``target`` (PROCESSING or a delivery_target); False if it already was."""
    return _add_unless_present(session, Suspension, "target", target=target, by=who, since=utcnow())


def resume(session: Session, target: str) -> bool:
    """Resume ``target``; False if it was not suspended."""
    found = session.get(Suspension, target)
    if found is None:
        return False
    session.delete(found)
    return True


def suspensions(session: Session) -> dict[str, Suspension]:
    return {s.target: s for s in session.scalars(select(Suspension))}


def processing_suspended(session: Session) -> Suspension | None:
    return session.get(Suspension, PROCESSING)


def suspended_destinations(session: Session) -> set[str]:
    prefix = delivery_target("")
    return {t.removeprefix(prefix) for t in suspensions(session) if t.startswith(prefix)}


def beat(session: Session, name: str, *, host: str, pid: int, gpu: str, concurrency: int) -> None:
    """A worker says it lives (a restart under the same name starts its record again)."""
    now = utcnow()
    row = session.get(WorkerBeat, name)
    if row is None or row.pid != pid or row.stopped_at is not None:
        session.merge(
            WorkerBeat(
                name=name,
                host=host,
                pid=pid,
                gpu=gpu,
                concurrency=concurrency,
                started_at=now,
                last_seen_at=now,
                stopped_at=None,
            )
        )
    else:
        row.last_seen_at = now


def worker_stopped(session: Session, name: str) -> None:
    row = session.get(WorkerBeat, name)
    if row is not None:
        row.stopped_at = utcnow()


def live_workers(session: Session, now: datetime, within_s: float) -> list[WorkerBeat]:
    """Workers that beat within ``within_s`` and did not say they stopped."""
    since = now - timedelta(seconds=within_s)
    query = select(WorkerBeat).where(WorkerBeat.stopped_at.is_(None), WorkerBeat.last_seen_at >= since)
    return list(session.scalars(query.order_by(WorkerBeat.name)))


def destination_answered(session: Session, name: str, ok: bool, answer: str) -> None:
    """Record a destination's answer (a delivery attempt or a C-ECHO). Coming back after a down
    that was notified queues a ``destination_up`` message."""
    now = utcnow()
    _add_unless_present(session, DestinationStatus, "name", name=name, down_notified=False)
    # Locked until commit, so that two answers at once do not both report the destination back up.
    row = session.get(DestinationStatus, name, with_for_update=True, populate_existing=True)
    assert row is not None
    row.checked_at, row.ok, row.answer = now, ok, answer
    if not ok:
        row.down_since = row.down_since or now
        return
    if row.down_notified:
        since = row.down_since.isoformat() if row.down_since else None
        notify(session, "destination_up", {"destination": name, "down_since": since, "answer": answer})
    row.down_since, row.down_notified = None, False


def destinations_down_since(session: Session, before: datetime) -> list[DestinationStatus]:
    """Destinations down since before ``before`` that no message has reported yet."""
    query = select(DestinationStatus).where(
        DestinationStatus.down_since.is_not(None),
        DestinationStatus.down_since <= before,
        DestinationStatus.down_notified.is_(False),
    )
    return list(session.scalars(query))


def notify(session: Session, event: str, payload: dict[str, Any]) -> None:
    """Queue a webhook message; the notifier sends it after the transaction commits."""
    session.add(
        Notification(event=event, payload={"event": event, **payload}, created_at=utcnow(), sent_to=[])
    )
