"""How pynetdicom's reactor threads wait: woken by what they wait for, instead of polling
(figures: benchmarks/RESULTS.md, "wakeups").

pynetdicom's two threads per association poll: the DUL thread sleeps 1 ms whenever its socket has
nothing to read, the association reactor a literal ``time.sleep(0.001)`` between looks at its
message queue. For the listener's associations (:class:`Wakeups`, bound to ``EVT_CONN_OPEN``) the
reactor waits on its message queue's condition and the DUL thread on its socket plus a socket pair,
each rung by what the other queues for it; killing the association rings both. Their waits end after
``WOKEN_WAIT_S`` at the latest, for what nothing rings: pynetdicom's timers and kill flags. Other
associations (the node's own as a requestor) keep bounded waits.
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from pynetdicom import association, dul, evt

DEFAULT_POLL_S = 0.001  # pynetdicom's own, for both threads
# The longest the reactor of an association without wake-ups waits for its next message before
# its loop's other checks (release, abort).
IDLE_WAIT_S = 0.002
# The longest the threads of an association with wake-ups wait: what this bounds is only noticing
# a timer that expired or a kill flag set from elsewhere.
WOKEN_WAIT_S = 0.05


class _Doorbell(queue.Queue[Any]):
    """A queue whose every put also rings: wakes the thread that takes from it."""

    def __init__(self, ring: Callable[[], None]) -> None:
        super().__init__()
        self._ring = ring

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._ring()


class Wakeups:
    """What wakes one acceptor association's two pynetdicom threads.

    :meth:`install` replaces the DUL's two primitive queues, before its thread starts, by queues
    that ring: the one to the reactor (``to_user_queue``) rings the reactor's message condition,
    the one to the DUL thread (``to_provider_queue``) writes to its socket pair. A ring while the
    thread is busy is not lost: the reactor counts rings, the DUL finds the byte waiting.
    """

    def __init__(self, messages: queue.Queue[Any]) -> None:
        self._messages = messages
        self._rung = 0  # rings of the reactor so far, and how many its waits have seen
        self._heard = 0
        self._bell, self._clapper = socket.socketpair()  # closed when the association is killed
        self._bell.setblocking(False)
        self._clapper.setblocking(False)

    @classmethod
    def opened(cls, event: evt.Event) -> None:
        """``EVT_CONN_OPEN``: the association's threads are woken from now on, until it is killed
        (every way out of its reactor's loop kills it)."""
        assoc = event.assoc
        wakeups = cls(assoc.dimse.msg_queue)
        wakeups.install(assoc.dul)
        kill = assoc.kill

        def kill_and_close() -> None:
            try:
                kill()  # returns once its DUL thread has ended
            finally:
                wakeups.close()

        # An instance attribute: pynetdicom calls ``self.kill()`` and ``assoc.kill()``.
        assoc.kill = kill_and_close  # type: ignore[method-assign]

    def close(self) -> None:
        """Wake the reactor a last time (the association was killed: it ends now, not at the
        end of its wait) and close the socket pair. pynetdicom's association and DUL refer to
        each other, so only a full garbage collection would close it otherwise: two file
        descriptors held for every association of the last half minute or so."""
        self.ring_reactor()
        self._bell.close()
        self._clapper.close()

    def install(self, provider: dul.DULServiceProvider) -> None:
        provider.to_user_queue = _Doorbell(self.ring_reactor)
        provider.to_provider_queue = _Doorbell(self.ring_dul)
        provider.segnode_wakeups = self  # type: ignore[attr-defined]

    def ring_reactor(self) -> None:
        with self._messages.not_empty:
            self._rung += 1
            self._messages.not_empty.notify_all()

    def reactor_wait(self, timeout: float) -> None:
        """Until a message is queued or the reactor is rung (either may have happened already)."""
        messages = self._messages
        with messages.not_empty:  # the queue's own condition, notified by every put
            if not messages.queue and self._rung == self._heard:
                messages.not_empty.wait(timeout)
            self._heard = self._rung

    def ring_dul(self) -> None:
        try:
            self._clapper.send(b"\0")
        except OSError:  # its buffer is full of rings already
            pass

    def dul_wait(self, sock: socket.socket, timeout: float) -> None:
        """Until ``sock`` has data to read or the DUL thread is rung."""
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted already: select sees only what is still on the socket
        readable, _, _ = select.select([sock, self._bell], [], [], timeout)
        if self._bell in readable:
            try:
                while self._bell.recv(4096):
                    pass
            except OSError:  # drained
                pass


def _wakeups(thread: threading.Thread) -> Wakeups | None:
    """The wake-ups of the association ``thread`` (its reactor or DUL thread) belongs to."""
    provider = thread if isinstance(thread, dul.DULServiceProvider) else getattr(thread, "dul", None)
    return getattr(provider, "segnode_wakeups", None)


def reactor_sleep(seconds: float) -> None:
    """``time.sleep`` as pynetdicom's association module sees it: its reactor's 1 ms poll becomes
    a wait for its next message (other sleeps of that module are left as they are)."""
    thread = threading.current_thread()
    dimse = getattr(thread, "dimse", None)
    if seconds != DEFAULT_POLL_S or dimse is None:
        time.sleep(seconds)
        return
    wakeups = _wakeups(thread)
    if wakeups is not None:
        wakeups.reactor_wait(WOKEN_WAIT_S)
        return
    messages = dimse.msg_queue
    with messages.not_empty:  # the queue's own condition, notified by every put
        if not messages.queue:
            messages.not_empty.wait(IDLE_WAIT_S)


def dul_sleep(seconds: float) -> None:
    """``time.sleep`` as pynetdicom's DUL module sees it: a DUL thread waits for data on its
    socket, or a ring where it has wake-ups."""
    thread = threading.current_thread()
    wakeups = _wakeups(thread)
    transport = thread.socket if isinstance(thread, dul.DULServiceProvider) else None
    sock = transport.socket if transport is not None else None
    if sock is None:  # other threads, and a DUL whose socket is closed
        time.sleep(seconds)
        return
    try:
        if wakeups is not None:
            wakeups.dul_wait(sock, WOKEN_WAIT_S)
        else:  # a requestor's: its own pace, but woken by data
            select.select([sock], [], [], seconds)
    except (OSError, ValueError):  # closed meanwhile: pynetdicom's next look at it finds out
        time.sleep(seconds)


def install() -> None:
    """Give pynetdicom's association and DUL modules a ``time`` whose ``sleep`` waits as above
    (:func:`reactor_sleep`, :func:`dul_sleep`).

    Their polls have no setting for what they wait on, so this is the one way to change it; every
    other use of ``time`` in those modules is untouched. Idempotent.
    """
    if getattr(association.time, "sleep", None) != reactor_sleep:
        association.time = SimpleNamespace(**{**vars(time), "sleep": reactor_sleep})  # type: ignore[assignment]
    if getattr(dul.time, "sleep", None) != dul_sleep:
        dul.time = SimpleNamespace(**{**vars(time), "sleep": dul_sleep})  # type: ignore[assignment]
