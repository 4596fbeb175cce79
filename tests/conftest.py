"""Fixtures that start real peers on 127.0.0.1 (see peers.py) and always stop them.

orthanc_factory(**options) -> Orthanc    any number of Orthancs (options: peers.start_orthanc)
orthanc -> Orthanc                        one with the defaults
storescp_factory(**options) -> StoreSCP   DCMTK storescp PACSes (options: peers.start_storescp)
storescp -> StoreSCP                      one with AE title STORESCP
pg_url -> str                             a fresh PostgreSQL database for the session
fresh_pg_url -> str                       a fresh PostgreSQL database for one test
redis_url -> str                          a Redis database of its own for one test, flushed
redis_session_url -> str                  the same for the session
segnode_factory(**config) -> SegnodeProcesses   real segnode processes (node_process.py)
tiny_disk -> Path                         a 1 MiB tmpfs that fills up (needs root)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy.orm import Session, sessionmaker

from node.db import engine as db
from tests import peers
from tests.node_process import SegnodeProcesses


@pytest.fixture
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., peers.Orthanc]]:
    # ExitStack: every started process is stopped, even when stopping another one fails.
    with contextlib.ExitStack() as stack:

        def make(**options: Any) -> peers.Orthanc:
            instance = peers.start_orthanc(tmp_path_factory.mktemp("orthanc"), **options)
            # Killed, not stopped gracefully (3.5 s each): its storage is a temporary folder.
            stack.callback(instance.stop, graceful=False)
            return instance

        yield make


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., peers.Orthanc]) -> peers.Orthanc:
    return orthanc_factory()


@pytest.fixture
def storescp_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., peers.StoreSCP]]:
    # ExitStack: every started process is stopped, even when stopping another one fails.
    with contextlib.ExitStack() as stack:

        def make(**options: Any) -> peers.StoreSCP:
            instance = peers.start_storescp(tmp_path_factory.mktemp("storescp"), **options)
            stack.callback(instance.stop)
            return instance

        yield make


@pytest.fixture
def storescp(storescp_factory: Callable[..., peers.StoreSCP]) -> peers.StoreSCP:
    return storescp_factory()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = peers.create_pg_database()
    yield url
    peers.drop_pg_database(url)


@pytest.fixture(scope="session")
def migrated_pg_template() -> Iterator[str]:
    """A PostgreSQL database migrated to the head once, for tests to copy (CREATE DATABASE ...
    TEMPLATE) instead of migrating their own; nothing stays connected to it."""
    url = peers.create_pg_database("segnode_template")
    db.upgrade(url)
    yield url
    peers.drop_pg_database(url)


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    url = peers.create_pg_database()
    yield url
    peers.drop_pg_database(url)


@pytest.fixture
def redis_url() -> Iterator[str]:
    with peers.claimed_redis_db() as url:
        yield url


@pytest.fixture(scope="session")
def redis_session_url() -> Iterator[str]:
    with peers.claimed_redis_db() as url:
        yield url


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A SQLite database of the current schema in the test's folder (the embedded default)."""
    url = f"sqlite:///{tmp_path / 'segnode.sqlite'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    yield db.make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions_on_both(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """The schema at its head on each database the node runs on: migrated on SQLite, a copy of
    the migrated template on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'segnode.sqlite'}"
        db.upgrade(url)
    else:
        url = peers.create_pg_database(template=request.getfixturevalue("migrated_pg_template"))
    engine = db.make_engine(url)
    db.check_schema(engine)
    yield db.make_sessionmaker(engine)
    engine.dispose()
    if request.param == "postgresql":
        peers.drop_pg_database(url)


@pytest.fixture
def segnode_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., SegnodeProcesses]]:
    """Configure (and later start) real segnode processes; every one is stopped at the end."""
    made: list[SegnodeProcesses] = []

    def make(**config: Any) -> SegnodeProcesses:
        node = SegnodeProcesses(tmp_path_factory.mktemp("segnode"), config)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop_all()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB file system (tmpfs) that fills up: the disk-full path without a threshold."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (./dev test and CI run as root)")
    mount_point = tmp_path / "tiny-disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest.fixture
def strict_reading() -> Iterator[None]:
    """pydicom raises on any invalid value it reads, as highdicom's own tests do."""
    old = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE
    try:
        yield
    finally:
        pydicom.config.settings.reading_validation_mode = old
