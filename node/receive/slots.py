"""The node's association limit, for all its listener processes together.

pynetdicom counts the associations of one process; with several listener processes on one port a
shared semaphore counts them all. An association that finds no free slot is rejected from
``EVT_REQUESTED`` as pynetdicom rejects over its own limit (transient, local limit exceeded).
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from pynetdicom import evt

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ: rejected-transient, service-provider (presentation), local-limit-exceeded.
LIMIT_REJECTION = (0x02, 0x03, 0x02)


class Semaphore(Protocol):
    """threading's or multiprocessing's: both take ``block`` first, by position."""

    def acquire(self, block: bool = ..., timeout: float | None = ..., /) -> bool: ...

    def release(self) -> None: ...


class AssociationSlots:
    """Bind :meth:`requested` to ``EVT_REQUESTED`` and :meth:`closed` to ``EVT_CONN_CLOSE``."""

    def __init__(self, semaphore: Semaphore, limit: int) -> None:
        self.semaphore = semaphore
        self.limit = limit
        self._held: set[int] = set()
        self._lock = threading.Lock()

    def requested(self, event: evt.Event) -> None:
        if self.semaphore.acquire(False):
            with self._lock:
                self._held.add(id(event.assoc))
            return
        request = event.assoc.requestor.primitive
        log.warning(
            "association from %s rejected: the node's %d associations are all in use",
            request.calling_ae_title if request is not None else "?",
            self.limit,
        )
        event.assoc.acse.send_reject(*LIMIT_REJECTION)
        # As pynetdicom does after its own rejections: wait until the rejection is sent, else its
        # reactor closes the connection before the peer reads the answer.
        event.assoc.kill()

    def closed(self, event: evt.Event) -> None:
        with self._lock:
            held = id(event.assoc) in self._held
            self._held.discard(id(event.assoc))
        if held:
            self.semaphore.release()
