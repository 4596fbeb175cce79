"""The node's association limits: for all its listener processes together, for each calling AE,
and for each calling address.

pynetdicom counts the associations of one process; a shared semaphore counts those of every
listener process. One calling AE may hold only ``max_associations_per_caller`` of them, one address
``max_associations_per_address`` (counted in each listener process), so that a sender that opens
association after association, or stalls in each, under one AE title or many, cannot lock every
modality out. An association over a limit is rejected from ``EVT_REQUESTED`` as pynetdicom rejects
over its own (transient, local limit exceeded).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
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

    def __init__(self, semaphore: Semaphore, limit: int, per_caller: int, per_address: int) -> None:
        self.semaphore = semaphore
        self.limit = limit
        self.per_caller = per_caller
        self.per_address = per_address
        # Associations holding a slot (their threads), with their calling AE and address.
        self._held: dict[int, tuple[threading.Thread, str, str]] = {}
        self._callers: Counter[str] = Counter()
        self._addresses: Counter[str] = Counter()
        self._lock = threading.Lock()

    def requested(self, event: evt.Event) -> None:
        self._release_ended()
        request = event.assoc.requestor.primitive
        caller = str(request.calling_ae_title).strip() if request is not None else "?"
        address = str(event.assoc.requestor.address)
        with self._lock:
            if self._callers[caller] >= self.per_caller:
                why = f"{caller} holds {self.per_caller} associations already, as many as one caller may"
            elif self._addresses[address] >= self.per_address:
                why = f"{address} holds {self.per_address} associations already, as many as one address may"
            else:
                why = ""
                # Taken before the node's slot: given back if that fails.
                self._callers[caller] += 1
                self._addresses[address] += 1
        if why:
            self._reject(event, why)
            return
        if not self.semaphore.acquire(False):
            with self._lock:
                self._callers[caller] -= 1
                self._addresses[address] -= 1
            self._reject(event, f"the node's {self.limit} associations are all in use")
            return
        with self._lock:
            self._held[id(event.assoc)] = (event.assoc, caller, address)

    def closed(self, event: evt.Event) -> None:
        self._release({id(event.assoc)})

    def _release_ended(self) -> None:
        """pynetdicom raises no EVT_CONN_CLOSE for an association whose receiving thread died (its
        state machine's InvalidEventError): the slot of every association that has ended goes back."""
        with self._lock:
            ended = {key for key, (thread, _, _) in self._held.items() if not thread.is_alive()}
        if ended:
            self._release(ended)

    def _release(self, keys: set[int]) -> None:
        with self._lock:
            released = [self._held.pop(key) for key in keys if key in self._held]
            for _, caller, address in released:
                self._callers[caller] -= 1
                self._addresses[address] -= 1
        for _ in released:
            self.semaphore.release()

    @staticmethod
    def _reject(event: evt.Event, why: str) -> None:
        request = event.assoc.requestor.primitive
        calling = request.calling_ae_title if request is not None else "?"
        log.warning("association from %s at %s rejected: %s", calling, event.assoc.requestor.address, why)
        event.assoc.acse.send_reject(*LIMIT_REJECTION)
        # As pynetdicom does after its own rejections: wait until the rejection is sent, else its
        # reactor closes the connection before the peer reads the answer.
        event.assoc.kill()
