"""pynetdicom's reactor threads wait for what wakes them: a message or a ring, bounded otherwise."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import A_ASSOCIATE, A_RELEASE

from node.receive.fastpath import reactor_pace


class _Reactor(Association):
    """A real pynetdicom association whose thread only takes the reactor's 1 ms sleep: the sleep
    looks at its ``dimse`` message queue and its ``dul``'s wake-ups."""

    def __init__(self, messages: queue.Queue[object], wakeups: reactor_pace.Wakeups | None = None) -> None:
        super().__init__(AE(), "acceptor")
        self.dimse.msg_queue = messages  # type: ignore[assignment]
        if wakeups is not None:
            wakeups.install(self.dul)
        self.slept: float | None = None

    def run(self) -> None:
        started = time.monotonic()
        reactor_pace.reactor_sleep(reactor_pace.DEFAULT_POLL_S)
        self.slept = time.monotonic() - started


def _sleep_in_reactor(
    messages: queue.Queue[object],
    wakeups: reactor_pace.Wakeups | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> float:
    reactor = _Reactor(messages, wakeups)
    reactor.start()
    if meanwhile is not None:
        time.sleep(0.1)
        meanwhile()
    reactor.join(timeout=10)
    assert reactor.slept is not None
    return reactor.slept


@pytest.fixture
def make_wakeups() -> Iterator[Callable[[queue.Queue[object]], reactor_pace.Wakeups]]:
    made: list[reactor_pace.Wakeups] = []

    def make(messages: queue.Queue[object]) -> reactor_pace.Wakeups:
        made.append(reactor_pace.Wakeups(messages))
        return made[-1]

    yield make
    for wakeups in made:
        wakeups.close()


def _a_request(messages: queue.Queue[object]) -> Callable[[], None]:
    return lambda: messages.put((1, "C-STORE-RQ"))


def test_a_queued_message_wakes_the_reactor_at_once(
    monkeypatch: pytest.MonkeyPatch, make_wakeups: Callable[[queue.Queue[object]], reactor_pace.Wakeups]
) -> None:
    monkeypatch.setattr(reactor_pace, "IDLE_WAIT_S", 5.0)
    monkeypatch.setattr(reactor_pace, "WOKEN_WAIT_S", 5.0)
    for wakeups in (False, True):
        messages: queue.Queue[object] = queue.Queue()
        rings = make_wakeups(messages) if wakeups else None
        assert _sleep_in_reactor(messages, rings, _a_request(messages)) < 2.0  # not the 5 s bound
        messages.put((1, "C-STORE-RQ"))
        assert _sleep_in_reactor(messages, rings) < 0.5  # a message already there: no wait at all


def test_a_ring_wakes_the_reactor_and_is_not_lost_while_it_is_busy(
    monkeypatch: pytest.MonkeyPatch, make_wakeups: Callable[[queue.Queue[object]], reactor_pace.Wakeups]
) -> None:
    monkeypatch.setattr(reactor_pace, "WOKEN_WAIT_S", 5.0)
    messages: queue.Queue[object] = queue.Queue()
    wakeups = make_wakeups(messages)
    assert _sleep_in_reactor(messages, wakeups, wakeups.ring_reactor) < 2.0  # a release request
    wakeups.ring_reactor()  # rung while the reactor was busy elsewhere
    assert _sleep_in_reactor(messages, wakeups) < 0.5
    monkeypatch.setattr(reactor_pace, "WOKEN_WAIT_S", 0.2)
    assert 0.2 <= _sleep_in_reactor(messages, wakeups) < 2.0  # heard: the next wait is a whole one


def test_without_a_message_or_ring_the_wait_ends_for_the_other_checks(
    monkeypatch: pytest.MonkeyPatch, make_wakeups: Callable[[queue.Queue[object]], reactor_pace.Wakeups]
) -> None:
    monkeypatch.setattr(reactor_pace, "IDLE_WAIT_S", 0.2)
    monkeypatch.setattr(reactor_pace, "WOKEN_WAIT_S", 0.3)
    assert 0.2 <= _sleep_in_reactor(queue.Queue()) < 2.0
    messages: queue.Queue[object] = queue.Queue()
    assert 0.3 <= _sleep_in_reactor(messages, make_wakeups(messages)) < 2.0


def test_other_threads_and_other_sleeps_sleep_as_asked() -> None:
    started = time.monotonic()
    reactor_pace.reactor_sleep(0.05)  # the main thread has no DIMSE provider
    reactor_pace.dul_sleep(0.05)  # nor a DUL's socket
    assert time.monotonic() - started >= 0.1


def _dul_wait(
    wakeups: reactor_pace.Wakeups, sock: socket.socket, meanwhile: Callable[[], object] | None
) -> float:
    started = time.monotonic()
    if meanwhile is not None:
        threading.Timer(0.1, meanwhile).start()
    wakeups.dul_wait(sock, 5.0)
    return time.monotonic() - started


def test_the_dul_thread_wakes_for_data_or_a_ring_even_one_rung_before(
    make_wakeups: Callable[[queue.Queue[object]], reactor_pace.Wakeups],
) -> None:
    ours, theirs = socket.socketpair()
    wakeups = make_wakeups(queue.Queue())
    assert _dul_wait(wakeups, ours, lambda: theirs.send(b"PDU")) < 2.0
    assert ours.recv(3) == b"PDU"
    assert _dul_wait(wakeups, ours, wakeups.ring_dul) < 2.0  # a response queued to send
    wakeups.ring_dul()
    wakeups.ring_dul()  # rung twice while it was busy: one wait ends at once, the next is whole
    assert _dul_wait(wakeups, ours, None) < 0.5
    started = time.monotonic()
    wakeups.dul_wait(ours, 0.2)
    assert time.monotonic() - started >= 0.2
    ours.close()
    theirs.close()


def test_installed_queues_ring_who_takes_from_them(
    make_wakeups: Callable[[queue.Queue[object]], reactor_pace.Wakeups],
) -> None:
    messages: queue.Queue[object] = queue.Queue()
    wakeups = make_wakeups(messages)
    provider = DULServiceProvider(Association(AE(), "acceptor"))
    wakeups.install(provider)
    assert getattr(provider, "segnode_wakeups", None) is wakeups
    acceptance, release = A_ASSOCIATE(), A_RELEASE()
    provider.to_provider_queue.put_nowait(acceptance)  # pynetdicom's own calls, unchanged
    provider.to_user_queue.put(release)
    assert provider.to_provider_queue.get(False) is acceptance
    assert provider.to_user_queue.get(False) is release
    ours, theirs = socket.socketpair()
    assert _dul_wait(wakeups, ours, None) < 0.5  # the DUL thread was rung by the put
    assert _sleep_in_reactor(messages, wakeups) < 0.5  # and the reactor by its own
    ours.close()
    theirs.close()
