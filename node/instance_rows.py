"""The database row of each received instance, written through the database driver.

Recording an instance is on the path of every C-STORE acknowledgement: one INSERT, one UPDATE of
its series' count and time, one commit. Through SQLAlchemy Core that costs ~0.5 ms of CPU and
~0.7 ms before the answer can go (a connection checked out and returned, an execution context
and a result per statement), while the driver itself takes ~0.1 ms with the commit's fsync
(measured on this path, 300 CT slices into SQLite). So this one hot path hands the driver SQL
that SQLAlchemy compiled once for the engine's dialect, with each column type's own conversion
of the values (time zones, SQLite's text timestamps): the rows are exactly those the ORM writes
and reads everywhere else.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Engine, bindparam, insert, update
from sqlalchemy.engine.interfaces import DBAPICursor
from sqlalchemy.pool import PoolProxiedConnection

from node.db.models import INSTANCES, SERIES

# The columns of an instance row the node writes; ``id`` is the database's.
INSTANCE_COLUMNS = (
    "series_id",
    "sop_instance_uid",
    "sop_class_uid",
    "transfer_syntax_uid",
    "image_type",
    "slice_thickness",
    "path",
    "size_bytes",
    "received_at",
)


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


class InstanceRows:
    """Adds instance rows on one connection of ``engine`` kept for it; safe across threads.

    Call :meth:`close` when the node stops, to give the connection back.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = _DriverStatement(
            insert(INSTANCES).values({name: bindparam(name) for name in INSTANCE_COLUMNS}), engine
        )
        self._count = _DriverStatement(
            update(SERIES)
            .where(SERIES.c.id == bindparam("series"))
            .values(instance_count=SERIES.c.instance_count + 1, last_received_at=bindparam("now")),
            engine,
        )
        self._integrity_error = engine.dialect.loaded_dbapi.IntegrityError
        self._lock = threading.Lock()
        self._connection: PoolProxiedConnection | None = None

    def add(self, row: Mapping[str, Any]) -> bool:
        """Insert ``row`` (every column of :data:`INSTANCE_COLUMNS`) and count it in its series,
        in one committed transaction. False, and nothing changed, when its SOP Instance UID is
        already recorded."""
        count = {"series": row["series_id"], "now": row["received_at"]}
        with self._lock:
            connection = self._connection or self.engine.raw_connection()
            self._connection = connection
            try:
                cursor = connection.cursor()
                try:
                    self._insert.execute(cursor, row)
                    self._count.execute(cursor, count)
                finally:
                    cursor.close()
                connection.commit()
            except self._integrity_error:
                connection.rollback()
                return False
            except BaseException:
                self._drop_connection()  # in doubt (server gone, disk error): a fresh one next time
                raise
        return True

    def close(self) -> None:
        with self._lock:
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
