"""segnode itself as a test peer: ``segnode serve`` and ``segnode worker`` as real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Engine, select

from node.db import engine as db
from node.db.models import Job, JobState
from tests import peers

SEGNODE = [sys.executable, "-m", "node.cli"]
STOPPED = {JobState.DELIVERED, JobState.FAILED, JobState.REJECTED}
PORT_ATTEMPTS = 3


class SegnodeProcesses:
    """A node's configuration and the processes that run it; ``stop_all`` ends every one."""

    def __init__(self, workdir: Path, config: Mapping[str, Any]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = peers.free_port()
        values: dict[str, Any] = {
            "data_dir": str(workdir / "data"),
            "quiet_period_s": 1.0,
            "assembly_poll_s": 0.2,
            "scp": {"ae_title": "SEGNODE", "port": self.port, "min_free_bytes": 0},
            "worker": {"delivery_backoff_s": 0.5, "delivery_backoff_max_s": 2.0},
            # The API on a port of its own where a test asks for it (api: {enabled: true}).
            "api": {"enabled": False, "port": peers.free_port()},
        }
        for key, value in config.items():
            if isinstance(value, dict) and isinstance(values.get(key), dict):
                values[key] = {**values[key], **value}
            else:
                values[key] = value
        self.values = values
        self.port = int(values["scp"]["port"])
        self.config_path = workdir / "segnode.yaml"
        self.config_path.write_text(yaml.safe_dump(values))
        self.database_url = (
            values.get("database_url") or f"sqlite:///{(workdir / 'data' / 'segnode.sqlite').resolve()}"
        )
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._engine: Engine | None = None

    def cli(
        self, *args: str, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SEGNODE, "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input if input is not None else "",
        )

    def _spawn(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [*SEGNODE, "--config", str(self.config_path), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.processes.append((name, proc))
        return proc

    def _checked(self, *args: str, input: str | None = None) -> str:
        """``segnode ARGS``'s output; its error output raised when it fails."""
        done = self.cli(*args, input=input)
        if done.returncode != 0:
            raise RuntimeError(f"segnode {' '.join(args[:2])} failed: {done.stderr}")
        return done.stdout

    def upgrade(self) -> None:
        self._checked("db", "upgrade")

    def add_user(self, name: str, role: str, password: str) -> None:
        """A user of the API (the schema up to date: after :meth:`upgrade` or :meth:`serve`)."""
        self._checked("users", "add", name, "--role", role, "--password-stdin", input=password + "\n")

    def token(self, name: str, label: str | None = None) -> str:
        """A new API token of user ``name``."""
        return self._checked("users", "token", name, *(("--label", label) if label else ())).strip()

    def serve(self, *, workers: bool = True, upgrade: bool = True) -> subprocess.Popen[bytes]:
        if upgrade:
            self.upgrade()
        for _ in range(PORT_ATTEMPTS):
            proc = self._start_serving(workers)
            if proc is not None:
                return proc
            # Its port was taken between free_port() and its bind (another test run): another one.
            self.port = peers.free_port()
            self.values["scp"]["port"] = self.port
            self.config_path.write_text(yaml.safe_dump(self.values))
        raise RuntimeError(f"segnode serve found no free port in {PORT_ATTEMPTS} tries:\n{self.log('serve')}")

    def _start_serving(self, workers: bool) -> subprocess.Popen[bytes] | None:
        """``segnode serve`` once it listens; None when its port was taken meanwhile."""
        log_path = self.workdir / "serve.log"
        start = log_path.stat().st_size if log_path.exists() else 0
        proc = self._spawn("serve", ["serve"] if workers else ["serve", "--no-workers"])
        # Its log says when it listens: a probe connection would hold one of its associations
        # until pynetdicom's ACSE timeout.
        deadline = time.monotonic() + 60
        while b"DICOM listener" not in log_path.read_bytes()[start:]:
            if proc.poll() is not None:
                if b"Address already in use" in log_path.read_bytes()[start:]:
                    return None
                raise RuntimeError(f"segnode serve exited {proc.returncode}:\n{self.log('serve')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"segnode serve did not listen:\n{self.log('serve')}")
            time.sleep(0.1)
        return proc

    def worker(self, name: str = "worker", celery_name: str = "segnode-test@%h") -> subprocess.Popen[bytes]:
        """``segnode worker``; ``name`` names its log, ``celery_name`` the Celery node."""
        return self._spawn(name, ["worker", "--name", celery_name])

    def wait_for_log(self, name: str, text: str, timeout: float = 60) -> None:
        """Until ``text`` appears in the process's log (a state it reports, not a time)."""
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not in {name}.log after {timeout} s:\n{self.log(name)}")
            time.sleep(0.1)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {name}.log ---\n{self.log(name)}" for name, _ in self.processes)

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal the process and its whole group (a worker's pool children too), then reap it."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop_all(self) -> None:
        for _, proc in reversed(self.processes):
            if proc.poll() is None:
                self.kill(proc, signal.SIGTERM)
        if self._engine is not None:
            self._engine.dispose()

    @contextlib.contextmanager
    def database_write_lock(self) -> Iterator[sqlite3.Connection]:
        """The embedded database's write lock, held: no process of the node writes meanwhile."""
        assert self.database_url.startswith("sqlite:///"), "only the embedded database"
        connection = sqlite3.connect(self.database_url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            yield connection
            connection.execute("ROLLBACK")
        finally:
            connection.close()

    def jobs(self) -> list[Job]:
        if self._engine is None:
            self._engine = db.make_engine(self.database_url)
        with db.make_sessionmaker(self._engine)() as session:
            return list(session.scalars(select(Job).order_by(Job.id)))

    def wait_for_job_count(self, count: int, timeout: float = 120) -> list[Job]:
        """Until the node has made ``count`` jobs, whatever their states."""
        return self.wait_for_jobs(lambda jobs: len(jobs) >= count, timeout, f"{count} jobs")

    def wait_for_jobs(
        self, done: Callable[[list[Job]], bool], timeout: float = 120, what: str = "jobs"
    ) -> list[Job]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs()
            if done(jobs):
                return jobs
            if jobs and all(j.state in STOPPED for j in jobs) and time.monotonic() > deadline - timeout + 20:
                break  # every job has stopped and the condition still fails: no need to wait longer
            time.sleep(0.25)
        states = [(j.id, j.state.value, j.reason) for j in self.jobs()]
        raise TimeoutError(f"{what} not reached in {timeout} s; jobs: {states}\n{self.logs()}")

    def wait_for_state(self, state: JobState, count: int = 1, timeout: float = 120) -> list[Job]:
        return self.wait_for_jobs(
            lambda jobs: sum(j.state == state for j in jobs) >= count,
            timeout,
            f"{count} job(s) {state.value}",
        )
