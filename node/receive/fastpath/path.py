"""The fast receive path: the plain one with each measured part of pynetdicom's work replaced."""

from __future__ import annotations

from contextlib import AbstractContextManager
from io import BytesIO
from typing import cast

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE

from node.receive.fastpath import reactor_pace
from node.receive.fastpath.spooling import Spooler, received_data_set
from node.receive.fastpath.store_response import pack_store_responses
from node.receive.paths import DataSetSource, Handler, PlainPath
from node.receive.spool_files import StagedFile
from node.receive.storage import Storage

# Each part alone, so that benchmarks/ingest can weigh it against plain pynetdicom.
SPOOLING = "spooling"  # data sets written to their file while they arrive; middle PDUs bypass pynetdicom
RESPONSES = "responses"  # C-STORE responses packed and sent by the association's thread
WAKEUPS = "wakeups"  # reactor threads woken by what they wait for instead of polling
PARTS = frozenset({SPOOLING, RESPONSES, WAKEUPS})


class FastPath(PlainPath):
    name = "fast path"

    def __init__(self, storage: Storage, parts: frozenset[str] = PARTS) -> None:
        super().__init__(storage)
        unknown = parts - PARTS
        if unknown:
            raise ValueError(f"unknown fast-path parts: {', '.join(sorted(unknown))}")
        self.parts = parts
        self.spooler = Spooler(storage) if SPOOLING in parts else None
        if WAKEUPS in parts:
            reactor_pace.install()

    def handlers(self) -> list[Handler]:
        handlers: list[Handler] = []
        if self.spooler is not None:
            handlers += [(evt.EVT_CONN_OPEN, self.spooler.opened), (evt.EVT_CONN_CLOSE, self.spooler.closed)]
        if RESPONSES in self.parts:
            handlers.append((evt.EVT_CONN_OPEN, pack_store_responses))
        if WAKEUPS in self.parts:
            handlers.append((evt.EVT_CONN_OPEN, reactor_pace.Wakeups.opened))
        return handlers

    def staged(self, event: evt.Event) -> StagedFile:
        spooled = self.spooler.staged(event) if self.spooler is not None else None
        return spooled if spooled is not None else super().staged(event)

    def data_set(self, event: evt.Event) -> AbstractContextManager[DataSetSource]:
        return received_data_set(cast(BytesIO, cast(C_STORE, event.request).DataSet))
