"""The association reactor's poll is a wait on its message queue: woken by a message, bounded otherwise."""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace

import pytest

from node import reactor_pace


class _Reactor(threading.Thread):
    """Stands in for pynetdicom's Association thread: the sleep looks at the thread's ``dimse``."""

    def __init__(self, messages: queue.Queue[object]) -> None:
        super().__init__()
        self.dimse = SimpleNamespace(msg_queue=messages)
        self.slept: float | None = None

    def run(self) -> None:
        started = time.monotonic()
        reactor_pace.PACE.sleep(reactor_pace.DEFAULT_POLL_S)
        self.slept = time.monotonic() - started


def _sleep_in_reactor(messages: queue.Queue[object], put_after: float | None = None) -> float:
    reactor = _Reactor(messages)
    reactor.start()
    if put_after is not None:
        time.sleep(put_after)
        messages.put((1, "C-STORE-RQ"))
    reactor.join(timeout=10)
    assert reactor.slept is not None
    return reactor.slept


def test_a_queued_message_wakes_the_reactor_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reactor_pace, "IDLE_WAIT_S", 5.0)
    assert _sleep_in_reactor(queue.Queue(), put_after=0.1) < 2.0  # woken by the put, not the 5 s bound
    waiting: queue.Queue[object] = queue.Queue()
    waiting.put((1, "C-STORE-RQ"))
    assert _sleep_in_reactor(waiting) < 0.5  # a message already there: no wait at all


def test_without_a_message_the_wait_ends_for_the_other_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reactor_pace, "IDLE_WAIT_S", 0.2)
    assert 0.2 <= _sleep_in_reactor(queue.Queue()) < 2.0


def test_other_threads_and_other_sleeps_sleep_as_asked() -> None:
    started = time.monotonic()
    reactor_pace.PACE.sleep(0.05)  # the main thread has no DIMSE provider
    assert time.monotonic() - started >= 0.05
