"""A running job's lease, renewed while its worker works: a worker that dies or hangs stops
renewing, and the scheduler gives the job to another worker, whatever its name or host. A
delivery's hold is renewed the same way while it is being sent."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from node.db.job_runs import JobRuns

log = logging.getLogger(__name__)


@contextmanager
def lease_kept(runs: JobRuns, job_id: int, every_s: float) -> Iterator[threading.Event]:
    """Renew the job's lease every ``every_s`` until the block ends. The event yielded is set when
    the job stopped being this worker's (cancelled, or taken over after a lapse)."""
    with renewed(lambda: runs.renew(job_id), every_s, f"job {job_id}") as lost:
        yield lost


@contextmanager
def renewed(renew: Callable[[], bool], every_s: float, what: str) -> Iterator[threading.Event]:
    """Call ``renew`` every ``every_s`` until the block ends (a lease, a delivery's hold). The
    event yielded is set when ``renew`` says the thing held is no longer this worker's."""
    lost = threading.Event()
    done = threading.Event()

    def keep() -> None:
        while not done.wait(every_s):
            try:
                if not renew():
                    lost.set()
                    log.warning("%s: no longer this worker's (cancelled or taken over)", what)
                    return
            except Exception as err:  # noqa: BLE001 - the database is away: try again next time
                log.warning("%s: not renewed (%s); trying again", what, type(err).__name__)

    thread = threading.Thread(target=keep, name=f"segnode-renew-{what}", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        done.set()
        thread.join(timeout=every_s)  # a renewal stuck on the database is not waited out
