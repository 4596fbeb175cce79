"""The database row of each received instance, written through the database driver.

Recording is on the path of every acknowledgement, and SQLAlchemy's per-statement machinery cost
several times what the driver does (benchmarks/RESULTS.md); so this one path hands the driver SQL
that SQLAlchemy compiled once for the engine's dialect, with each column type's own conversions:
the rows are exactly those the ORM writes and reads everywhere else.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, bindparam, update
from sqlalchemy.engine.interfaces import DBAPICursor
from sqlalchemy.pool import PoolProxiedConnection

from node.core.outages import DatabaseFault
from node.db.engine import insert_unless_present
from node.db.models import INSTANCES, SERIES

# The columns of an instance row the node writes; ``id`` is the database's.
INSTANCE_COLUMNS = (
    "series_id",
    "sop_instance_uid",
    "sop_class_uid",
    "transfer_syntax_uid",
    "image_type",
    "slice_thickness",
    "orientation",
    "slice_position",
    "images_in_acquisition",
    "path",
    "size_bytes",
    "received_at",
)


class RowNotRecordedError(DatabaseFault):
    """The transaction holding an instance's row failed; the instance is not recorded."""


class _DriverStatement:
    """A statement compiled once for a dialect; :meth:`execute` runs it on a DBAPI cursor."""

    def __init__(self, statement: Any, engine: Engine) -> None:
        dialect = engine.dialect
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self._names: list[str] = list(compiled.positiontup or []) if compiled.positional else []
        # Values the statement itself holds (the 1 of ``count + 1``), under those given per call.
        self._fixed = {name: bind.value for name, bind in compiled.binds.items() if not bind.required}
        self._processors: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._processors[name] = processor

    def execute(self, cursor: DBAPICursor, values: Mapping[str, Any]) -> None:
        params = {
            name: (self._processors[name](value) if name in self._processors else value)
            for name, value in {**self._fixed, **values}.items()
        }
        cursor.execute(self.sql, [params[name] for name in self._names] if self._names else params)


@dataclass
class _Pending:
    """A row waiting for its transaction; ``added`` and ``error`` are set when it is done."""

    row: Mapping[str, Any]
    done: bool = False
    added: bool = False
    error: BaseException | None = None


class InstanceRows:
    """Adds instance rows on one connection of ``engine`` kept for it; safe across threads.

    Rows that arrive while a transaction is committing wait and go together in the next one
    (a group commit): with four senders, four handlers otherwise queued for the one connection,
    each behind the others' fsyncs (record 0.4 ms alone, 3.3 ms waiting with four senders). When
    such a transaction fails, its rows are tried again one by one, so that a row the database
    refuses fails alone.
    Call :meth:`close` when the node stops, to give the connection back.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # A duplicate leaves the transaction and the other rows of its batch alone.
        self._insert = _DriverStatement(
            insert_unless_present(engine.dialect.name, INSTANCES, "sop_instance_uid")
            .values({name: bindparam(name) for name in INSTANCE_COLUMNS})
            .inline(),  # no RETURNING of the new id
            engine,
        )
        self._count = _DriverStatement(
            update(SERIES)
            .where(SERIES.c.id == bindparam("series"))
            .values(
                instance_count=SERIES.c.instance_count + bindparam("added"),
                last_received_at=bindparam("now"),
            ),
            engine,
        )
        self._lock = threading.Lock()  # held by the one thread committing
        self._waiting_lock = threading.Lock()
        self._waiting: list[_Pending] = []
        self._connection: PoolProxiedConnection | None = None
        self.transactions = 0  # committed so far: fewer than rows when rows went together
        self._closed = False

    def add(self, row: Mapping[str, Any]) -> bool:
        """Insert ``row`` (every column of :data:`INSTANCE_COLUMNS`) and count it in its series;
        committed on return. False, and nothing changed, when its SOP Instance UID is already
        recorded. Raises :class:`RowNotRecordedError` when the transaction failed."""
        pending = _Pending(row)
        with self._waiting_lock:
            self._waiting.append(pending)
        with self._lock:
            if not pending.done:  # not taken by the transaction that just ended: commit all waiting
                with self._waiting_lock:
                    batch, self._waiting = self._waiting, []
                if self._closed:
                    self._fail(batch, RuntimeError("the storage is closed"))
                elif not self._commit(batch) and len(batch) > 1:
                    for alone in batch:  # one bad row must not fail the others: each on its own
                        alone.done, alone.error = False, None
                        self._commit([alone])
        if pending.error is not None:
            raise RowNotRecordedError(
                f"the instance row was not committed: {pending.error}"
            ) from pending.error
        return pending.added

    def _commit(self, batch: list[_Pending]) -> bool:
        """One transaction for ``batch``; False when it failed (every row then has the error).

        The connection kept from an earlier transaction may have died since (a database restart):
        then the batch is tried once more on a fresh one, so no sender sees an outage that is over.
        A retry after a commit that did land inserts nothing again (ON CONFLICT DO NOTHING).
        """
        kept = self._connection is not None
        if self._commit_once(batch):
            return True
        if not kept:
            return False
        for pending in batch:
            pending.done, pending.error = False, None
        return self._commit_once(batch)

    def _commit_once(self, batch: list[_Pending]) -> bool:
        try:
            connection = self._connection or self.engine.raw_connection()
            self._connection = connection
            counts: dict[int, list[Any]] = {}  # series id -> [rows added, latest time]
            cursor = connection.cursor()
            try:
                for pending in batch:
                    self._insert.execute(cursor, pending.row)
                    pending.added = cursor.rowcount == 1  # 0: already recorded (ON CONFLICT)
                    if pending.added:
                        count = counts.setdefault(pending.row["series_id"], [0, pending.row["received_at"]])
                        count[0] += 1
                        count[1] = max(count[1], pending.row["received_at"])
                for series_id, (added, latest) in counts.items():
                    self._count.execute(cursor, {"series": series_id, "added": added, "now": latest})
            finally:
                cursor.close()
            connection.commit()
            self.transactions += 1
        except BaseException as err:  # every row of the batch fails with it
            self._drop_connection()  # in doubt (server gone, disk error): a fresh one next time
            self._fail(batch, err)
            if not isinstance(err, Exception):
                raise
            return False
        for pending in batch:
            pending.done = True
        return True

    @staticmethod
    def _fail(batch: list[_Pending], error: BaseException) -> None:
        for pending in batch:
            pending.added, pending.error, pending.done = False, error, True

    def close(self) -> None:
        """Give the connection back; rows added later fail (handlers still running at shutdown)."""
        with self._lock:
            self._closed = True
            if self._connection is not None:
                self._connection.close()  # back to the engine's pool
                self._connection = None

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.rollback()
            connection.close()
        except Exception:  # noqa: BLE001 - a broken connection is thrown away, not reused
            connection.invalidate()
