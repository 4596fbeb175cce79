"""A running job's lease, renewed while its worker works: a worker that dies or hangs stops
renewing, and the scheduler gives the job to another worker, whatever its name or host."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from node.db.job_runs import JobRuns

log = logging.getLogger(__name__)


@contextmanager
def lease_kept(runs: JobRuns, job_id: int, every_s: float) -> Iterator[threading.Event]:
    """Renew the job's lease every ``every_s`` until the block ends. The event yielded is set when
    the job stopped being this worker's (cancelled, or taken over after a lapse)."""
    lost = threading.Event()
    done = threading.Event()

    def renew() -> None:
        while not done.wait(every_s):
            try:
                if not runs.renew(job_id):
                    lost.set()
                    log.warning("job %d: no longer this worker's (cancelled or taken over)", job_id)
                    return
            except Exception as err:  # noqa: BLE001 - the database is away: try again next time
                log.warning("job %d: lease not renewed (%s); trying again", job_id, type(err).__name__)

    thread = threading.Thread(target=renew, name=f"segnode-lease-{job_id}", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        done.set()
        thread.join(timeout=every_s)  # a renewal stuck on the database is not waited out
