"""A worker's heartbeat in the database: the dashboard lists live workers from it, /readyz needs
one, and a worker that stops cleanly says so at once."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading

from sqlalchemy.orm import Session, sessionmaker

from node.db.engine import session_scope
from node.db.operations import beat, worker_stopped

log = logging.getLogger(__name__)


def gpu_name() -> str:
    """The first visible GPU's name, from nvidia-smi ('' without one). The worker's main process
    must not initialise CUDA itself: its pool processes are forked from it."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return ""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ""
    index = (visible or "0").split(",")[0].strip()
    try:
        found = subprocess.run(
            [smi, f"--id={index}", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return found.stdout.strip().splitlines()[0] if found.stdout.strip() else ""


class Heartbeat:
    def __init__(self, sessions: sessionmaker[Session], name: str, concurrency: int, every_s: float) -> None:
        self.sessions, self.name, self.concurrency, self.every_s = sessions, name, concurrency, every_s
        self.gpu = gpu_name()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="segnode-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every_s)
        try:
            with session_scope(self.sessions) as session:
                worker_stopped(session, self.name)
        except Exception as err:  # noqa: BLE001 - stopping anyway; the beat lapses by itself
            log.warning("could not record that worker %s stopped (%s)", self.name, type(err).__name__)

    def _run(self) -> None:
        while True:
            try:
                with session_scope(self.sessions) as session:
                    beat(
                        session,
                        self.name,
                        host=socket.gethostname(),
                        pid=os.getpid(),
                        gpu=self.gpu,
                        concurrency=self.concurrency,
                    )
            except Exception as err:  # noqa: BLE001 - the database is away: the next beat tries again
                log.warning("heartbeat not recorded (%s); trying again", type(err).__name__)
            if self._stop.wait(self.every_s):
                return
