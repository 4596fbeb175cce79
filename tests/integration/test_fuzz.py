"""Fuzzed input against a running listener (tests/fuzz.py): a few thousand mutated sessions of
real senders on each receive path; the node must not crash, leak a thread or descriptor, write a
file outside its storage, or keep a damaged instance, and must still answer C-ECHO.

benchmarks/fuzz.py runs the same with more cases."""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select

from node.core.config import ScpSettings
from node.core.dicom import CT_IMAGE, VERIFICATION
from node.core.logs import is_protocol_error
from node.db import engine as db
from node.db.models import Instance
from node.receive.listener import start_scp
from node.receive.storage import Storage
from tests import dicom_factory as factory
from tests import fuzz
from tests.waiting import eventually

# Real programs end to end: run by ./dev test and CI, left out of the edit loop's -m 'not slow'.
pytestmark = pytest.mark.slow

CASES = 1500  # each receive path; benchmarks/fuzz.py runs more
# Room for the associations that fuzzed sessions leave waiting on their timeout (0.5 s).
SLOTS = 128
SEED = 20261206


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def _every_slot_free(server: ThreadedAssociationServer, slots: int) -> bool:
    """Whether the node, and each of two callers, can hold every association they may at once:
    no slot was lost to a session that ended without pynetdicom saying so."""
    # Opening this many associations takes a while on a loaded machine: no timeout of the fuzz's
    # 0.5 s (nor an idle one) may end one before the last is open.
    server.ae.network_timeout = server.ae.acse_timeout = 600
    port = server.server_address[1]
    held, established = [], []
    try:
        for caller in ("FUZZSEED", "ANOTHER"):
            ae = AE(ae_title=caller)
            ae.network_timeout = ae.acse_timeout = 600
            ae.add_requested_context(VERIFICATION)
            for _ in range(slots // 2):
                held.append(ae.associate("127.0.0.1", port, ae_title="SEGNODE"))
                established.append(held[-1].is_established)
        return all(established)
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()


def run_fuzz(tmp_path: Path, fast_path: bool, count: int, seed: int) -> Counter[str]:
    """``count`` fuzzed sessions against a fresh listener; asserts every invariant; returns how
    many cases of each kind ran."""
    url = f"sqlite:///{tmp_path / 'segnode.sqlite'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    root = tmp_path / "store"
    settings = ScpSettings(
        port=0,
        min_free_bytes=0,
        fast_path=fast_path,
        network_timeout_s=0.5,
        max_associations=SLOTS,
        max_associations_per_caller=SLOTS // 2,
        max_associations_per_address=SLOTS,
    )
    storage = Storage(root, engine, 0)
    server = start_scp(settings, storage)
    port = server.server_address[1]
    slices = factory.make_ct_series(tmp_path / "ct", n_slices=2, rows=16, cols=16)
    implicit = factory.make_ct_series(
        tmp_path / "ct-implicit", n_slices=1, rows=16, cols=16, transfer_syntax=ImplicitVRLittleEndian
    )

    def store_session(port: int, paths: list[Path], syntax: str) -> None:
        ae = AE(ae_title="FUZZSEED")
        ae.add_requested_context(CT_IMAGE, [syntax])
        ae.add_requested_context(VERIFICATION)
        assoc = ae.associate("127.0.0.1", port, ae_title="SEGNODE")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        for path in paths:
            assert assoc.send_c_store(dcmread(path)).Status == 0
        assoc.release()

    try:
        streams = [
            fuzz.record(port, lambda p: store_session(p, slices, ExplicitVRLittleEndian)),
            fuzz.record(port, lambda p: store_session(p, implicit, ImplicitVRLittleEndian)),
        ]
        assert all(len(fuzz.pdus(s)) >= 5 for s in streams)  # association, echo, stores, release
        assert eventually(lambda: not server.active_associations, timeout=30)
        threads, descriptors = threading.active_count(), _descriptors()
        kinds: Counter[str] = Counter()
        died: list[threading.ExceptHookArgs] = []
        hook, threading.excepthook = threading.excepthook, died.append
        try:
            for kind, data in fuzz.cases(streams, seed=seed, count=count):
                fuzz.deliver(port, data)
                kinds[kind] += 1
            assert eventually(lambda: not server.active_associations, timeout=30), "associations left open"
        finally:
            threading.excepthook = hook
        # Only pynetdicom itself may choke on a peer's bytes (the node logs it as one line).
        unexpected = [a for a in died if not is_protocol_error(a.exc_value)]
        assert unexpected == [], [
            f"{a.thread.name if a.thread else '?'}: {a.exc_value!r}" for a in unexpected
        ]
        assert eventually(lambda: threading.active_count() <= threads + 2, timeout=30), "threads left running"
        assert eventually(lambda: _descriptors() <= descriptors + 5, timeout=30), "descriptors left open"
        store_session(port, [], ExplicitVRLittleEndian)  # C-ECHO still answers
        assert _every_slot_free(server, SLOTS)
    finally:
        server.shutdown()
        storage.close()
    expected = {root, root / ".incoming", tmp_path / "ct", tmp_path / "ct-implicit"}
    with db.make_sessionmaker(engine)() as session:
        rows = session.scalars(select(Instance)).all()
    engine.dispose()
    assert rows, "the seeds' instances were stored"
    for row in rows:  # every instance acknowledged is whole and is what its row says
        stored = dcmread(root / row.path)
        assert stored.SOPInstanceUID == row.sop_instance_uid
        assert stored.pixel_array.shape == (16, 16)
    files = {p for p in tmp_path.rglob("*") if p.is_file()}
    outside = {p for p in files if not any(parent in expected for parent in p.parents)}
    assert {p.name for p in outside} <= {"segnode.sqlite", "segnode.sqlite-wal", "segnode.sqlite-shm"}
    assert not list((root / ".incoming").iterdir()), "temporary files left behind"
    assert len(list(root.rglob("*.dcm"))) == len(rows)
    return kinds


@pytest.mark.parametrize("fast_path", [False, True], ids=["plain", "fast-path"])
def test_fuzzed_sessions_break_nothing(tmp_path: Path, fast_path: bool) -> None:
    kinds = run_fuzz(tmp_path, fast_path, CASES, SEED)
    assert sum(kinds.values()) == CASES and len(kinds) == len(fuzz.MUTATIONS)
