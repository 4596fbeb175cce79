"""How pynetdicom's reactor threads wait: the association's for its next message, the DUL's by
polling, fast for one association and at its default for several.

pynetdicom runs two threads per association that poll instead of waiting on events: the DUL
thread sleeps ``_run_loop_delay`` (1 ms) whenever its socket has nothing to read, and the
association reactor sleeps a literal ``time.sleep(0.001)`` between looks at its message queue.
With one sender, every C-STORE waits for about three such polls (the request to reach the
handler, the response to reach the socket, the next request to be noticed): ~1.5 ms an instance,
a fifth of segnode's ingest time for a CT series here. Polling every 0.2 ms removes most of it.

With several associations open the same short poll costs more than it saves: eight or more
threads waking 5,000 times a second each fight for the GIL that the handlers need (measured with
four senders: 2.0 s at 1 ms, 2.3 s at 0.2 ms, for the same 300 instances). So the short poll
applies only while one association is open. See benchmarks/ingest.py.

Both polls are now waits. The association reactor waits on its message queue: it wakes the
moment the receiving thread queues a request, and otherwise every ``IDLE_WAIT_S`` for the checks
its loop also makes (release, abort). Its 5,000 sleeps a second cost ~0.5 ms of CPU an instance
on two cores shared with the sender, where the node is CPU-bound (segnode/Orthanc 1.06-1.09 ->
0.96-1.00). The DUL thread waits on its socket, so a request is read the moment it arrives; on
a plain TCP socket for up to ``IDLE_WAIT_S``, as C-STORE responses do not pass through its queue
(node/store_response.py writes them itself), over TLS for its poll interval as before.
"""

from __future__ import annotations

import select
import ssl
import threading
import time
from types import SimpleNamespace

from pynetdicom import association, dul, evt

FAST_POLL_S = 0.0002
DEFAULT_POLL_S = 0.001  # pynetdicom's own, for both threads
# The longest a reactor thread waits for its next message or PDU before its loop's other checks;
# a peer's release is answered at most twice this much later.
IDLE_WAIT_S = 0.002


class ReactorPace:
    """Counts open associations and sets their reactors' poll interval accordingly."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[association.Association] = set()
        self.alone = True

    def opened(self, event: evt.Event) -> None:
        with self._lock:
            self._open.add(event.assoc)
            self._retune()

    def closed(self, event: evt.Event) -> None:
        with self._lock:
            self._open.discard(event.assoc)
            self._retune()

    def _retune(self) -> None:
        # An association whose threads ended without EVT_CONN_CLOSE (pynetdicom raises none when its
        # receiving thread dies on an exception) is over: it must not keep the others at 1 ms.
        self._open = {a for a in self._open if a.ident is None or a.is_alive()}
        self.alone = len(self._open) <= 1
        delay = FAST_POLL_S if self.alone else DEFAULT_POLL_S
        for assoc in self._open:
            assoc.dul._run_loop_delay = delay  # pynetdicom's own knob for the DUL thread

    def sleep(self, seconds: float) -> None:
        """``time.sleep`` as the association reactor sees it: its 1 ms poll becomes a wait for
        its next message (other sleeps of that module are left as they are)."""
        dimse = getattr(threading.current_thread(), "dimse", None)
        if seconds != DEFAULT_POLL_S or dimse is None:
            time.sleep(seconds)
            return
        messages = dimse.msg_queue
        with messages.not_empty:  # the queue's own condition, notified by every put
            if not messages.queue:
                messages.not_empty.wait(IDLE_WAIT_S)


PACE = ReactorPace()


def dul_sleep(seconds: float) -> None:
    """``time.sleep`` as pynetdicom's DUL threads see it: a wait for data on their socket."""
    thread = threading.current_thread()
    transport = thread.socket if isinstance(thread, dul.DULServiceProvider) else None
    sock = transport.socket if transport is not None else None
    if sock is None or not isinstance(thread, dul.DULServiceProvider):
        time.sleep(seconds)
        return
    # Only the listener's responses skip the DUL's queue, and not over TLS: other DUL threads
    # (the tests' and any requestor's) look at their queue at their own pace.
    direct = thread.assoc.is_acceptor and not isinstance(sock, ssl.SSLSocket)
    wait = IDLE_WAIT_S if direct else seconds
    try:
        select.select([sock], [], [], wait)
    except (OSError, ValueError):  # closed meanwhile: pynetdicom's next look at it finds out
        time.sleep(seconds)


def install() -> None:
    """Give pynetdicom's association and DUL modules a ``time`` whose ``sleep`` waits as above
    (:meth:`ReactorPace.sleep`, :func:`dul_sleep`).

    Their polls have no setting for what they wait on, so this is the one way to change it; every
    other use of ``time`` in those modules is untouched. Idempotent.
    """
    if getattr(association.time, "sleep", None) != PACE.sleep:
        association.time = SimpleNamespace(**{**vars(time), "sleep": PACE.sleep})  # type: ignore[assignment]
    if getattr(dul.time, "sleep", None) != dul_sleep:
        dul.time = SimpleNamespace(**{**vars(time), "sleep": dul_sleep})  # type: ignore[assignment]
