"""Failures that last (a database or disk that is away) logged as one outage: a line when it
starts, and a line with the count when it ends, instead of a line and a traceback for every
failure meanwhile. A traceback only for a failure the node does not understand."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.exc import DBAPIError


class DatabaseFault(RuntimeError):
    """A database operation failed in a way its message explains (the server is away, a row was
    refused): understood, not a bug."""


UNDERSTOOD = (DBAPIError, OSError, DatabaseFault)


def understood(err: BaseException) -> bool:
    """A failure of the database or the disk, which its message explains; else a bug to trace."""
    return isinstance(err, UNDERSTOOD)


def summary(err: BaseException) -> str:
    """The failure in one line: its type and the first line of its message (a database error's
    later lines carry the statement and its parameters)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


class Outage:
    """Counts the failures of ``what`` between two successes; safe across threads."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger = logger
        self.what = what
        self.failures = 0
        self._since = 0.0
        self._lock = threading.Lock()

    def failed(self, err: BaseException, why: str | None = None) -> None:
        """``why``: the failure as the caller understands it, told instead of ``err`` (no traceback)."""
        with self._lock:
            self.failures += 1
            if self.failures > 1:
                return
            self._since = time.monotonic()
        self.logger.error(
            "%s failing (%s); further failures are counted until it works again",
            self.what,
            why or summary(err),
            exc_info=None if why or understood(err) else err,
        )

    def succeeded(self) -> None:
        if not self.failures:  # the common case, without the lock
            return
        with self._lock:
            failures, self.failures = self.failures, 0
            lasted = time.monotonic() - self._since
        if failures:
            self.logger.warning(
                "%s working again after %.1f s; %d failure(s) meanwhile", self.what, lasted, failures
            )


def run_passes(
    stop: threading.Event, one_pass: Callable[[], object], every_s: float, logger: logging.Logger, what: str
) -> None:
    """Call ``one_pass`` every ``every_s`` until ``stop`` is set; a failing pass is logged as an
    outage of ``what`` and the next pass tries again."""
    passes = Outage(logger, what)
    while not stop.is_set():
        try:
            one_pass()
        except Exception as err:  # noqa: BLE001 - the next pass tries again; the outage is logged
            passes.failed(err)
        else:
            passes.succeeded()
        stop.wait(every_s)
