"""Delivery by C-STORE against real peers that do not cooperate: one that never answers, one that
rejects the association for good, one that is only full for now."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from node.core.config import DicomDestination, Settings, load_settings
from node.core.dicom import VERIFICATION
from node.core.queue import JobQueue, make_celery
from node.db.job_runs import JobRuns
from node.db.models import Job, JobState, utcnow
from node.jobs.assembly import assemble
from node.receive.listener import instance_facts
from node.receive.storage import Storage
from tests import dicom_factory as factory
from tests import peers
from tests.node_process import SegnodeProcesses
from tests.waiting import eventually
from workers.destinations.dicom import send_by_c_store
from workers.errors import DeliveryRefusedError, DestinationUnavailableError
from workers.tasks import WorkerContext, _deliver, run_deliver_job

# Real programs end to end: run by ./dev test and CI, left out of the edit loop's -m 'not slow'.
pytestmark = pytest.mark.slow


@pytest.fixture
def one_slice(tmp_path: Path) -> list[Path]:
    return factory.make_ct_series(tmp_path / "ct", n_slices=1, rows=32, cols=32)


@pytest.fixture
def silent_pacs() -> Iterator[tuple[int, threading.Event]]:
    """A pynetdicom SCP that accepts C-STOREs and never answers them until the event is set."""
    release = threading.Event()
    ae = AE(ae_title="SILENT")
    ae.add_supported_context(CTImageStorage)

    def hold(event: evt.Event) -> int:
        release.wait(60)
        return 0x0000

    server: ThreadedAssociationServer | None = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, hold)]
    )
    assert server is not None
    port = server.server_address[1]
    yield port, release
    release.set()
    server.shutdown()


def test_a_pacs_that_never_answers_costs_the_timeout_not_the_worker(
    silent_pacs: tuple[int, threading.Event], one_slice: list[Path]
) -> None:
    port, _ = silent_pacs
    pacs = DicomDestination(ae_title="SILENT", host="127.0.0.1", port=port)
    with pytest.raises(DestinationUnavailableError, match=r"no C-STORE response within 1 s"):
        send_by_c_store(pacs, one_slice, "SEGNODE", timeout_s=1)


@pytest.fixture
def stalling_pacs(storescp: peers.StoreSCP) -> Iterator[int]:
    """A proxy to storescp that passes the association's acceptance, then three bytes of the next
    PDU (the C-STORE response), then nothing: a PACS that stalls inside a PDU."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def relay() -> None:
        client, _ = listener.accept()
        server = socket.create_connection(storescp.address)

        def upstream() -> None:
            with contextlib.suppress(OSError):
                while data := client.recv(65536):
                    server.sendall(data)

        threading.Thread(target=upstream, daemon=True).start()
        header = server.recv(6, socket.MSG_WAITALL)
        client.sendall(header + server.recv(int.from_bytes(header[2:], "big"), socket.MSG_WAITALL))
        client.sendall(server.recv(3, socket.MSG_WAITALL))
        done.wait(120)
        client.close()
        server.close()

    threading.Thread(target=relay, daemon=True).start()
    yield listener.getsockname()[1]
    done.set()
    listener.close()


def test_a_pacs_that_stalls_inside_a_pdu_costs_the_timeout_not_the_worker(
    stalling_pacs: int, one_slice: list[Path]
) -> None:
    pacs = DicomDestination(ae_title="STORESCP", host="127.0.0.1", port=stalling_pacs)
    raised: list[BaseException] = []

    def deliver() -> None:
        try:
            send_by_c_store(pacs, one_slice, "SEGNODE", timeout_s=1)
        except BaseException as err:  # noqa: BLE001 - kept for the assertions below
            raised.append(err)

    sender = threading.Thread(target=deliver, daemon=True)
    sender.start()
    sender.join(60)  # pynetdicom alone would read on for good
    assert not sender.is_alive(), "the delivery still waits on a PACS that stalled inside a PDU"
    assert len(raised) == 1 and isinstance(raised[0], DestinationUnavailableError), raised


def test_a_permanent_rejection_is_refused_at_once_a_transient_one_retried(
    orthanc_factory: Callable[..., peers.Orthanc], one_slice: list[Path]
) -> None:
    orthanc = orthanc_factory(config={"DicomCheckCalledAet": True})
    wrong = DicomDestination(ae_title="NOT-ORTHANC", host="127.0.0.1", port=orthanc.dicom_port)
    with pytest.raises(DeliveryRefusedError, match="rejected the association permanently: called AE title"):
        send_by_c_store(wrong, one_slice, "SEGNODE", timeout_s=10)

    busy = AE(ae_title="BUSY")
    busy.add_supported_context(VERIFICATION)
    busy.add_supported_context(CTImageStorage)
    busy.maximum_associations = 1
    server = busy.start_server(("127.0.0.1", 0), block=False)
    assert server is not None
    port = server.server_address[1]
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(VERIFICATION)
    held = holder.associate("127.0.0.1", port, ae_title="BUSY")
    try:
        assert held.is_established
        full = DicomDestination(ae_title="BUSY", host="127.0.0.1", port=port)
        with pytest.raises(
            DestinationUnavailableError, match="rejected the association for now: local limit"
        ):
            send_by_c_store(full, one_slice, "SEGNODE", timeout_s=10)
    finally:
        held.release()
        server.shutdown()


def test_a_job_to_a_pacs_that_will_never_take_it_fails_after_one_attempt(
    segnode_factory: Callable[..., SegnodeProcesses],
    orthanc_factory: Callable[..., peers.Orthanc],
    tmp_path: Path,
) -> None:
    orthanc = orthanc_factory(config={"DicomCheckCalledAet": True})
    node = segnode_factory(
        destinations={"pacs": {"ae_title": "NOT-ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}},
        rules=[{"name": "ct", "min_slices": 3, "destinations": ["pacs"]}],
    )
    node.serve()
    paths = factory.make_ct_series(tmp_path / "series", n_slices=8)
    assert peers.storescu(paths, node.port, aet="SEGNODE").returncode == 0
    (job,) = node.wait_for_state(JobState.FAILED, timeout=120)
    assert "rejected the association permanently: called AE title not recognised" in job.reason
    assert "after 1 attempt(s)" in job.reason


def test_a_job_whose_delivery_attempts_run_out_fails_with_every_attempt_recorded(
    segnode_factory: Callable[..., SegnodeProcesses], tmp_path: Path
) -> None:
    down = peers.free_port()  # nothing listens there: every attempt is refused
    node = segnode_factory(
        worker={"delivery_max_attempts": 2},
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": down}},
        rules=[{"name": "ct", "min_slices": 3, "destinations": ["pacs"]}],
    )
    node.serve()
    paths = factory.make_ct_series(tmp_path / "series", n_slices=8)
    assert peers.storescu(paths, node.port, aet="SEGNODE").returncode == 0
    (job,) = node.wait_for_state(JobState.FAILED, timeout=120)
    assert "did not accept the SEG after 2 attempt(s)" in job.reason
    assert "connection refused or timed out" in job.reason and "retry the job" in job.reason
    shown = node.cli("jobs", "show", str(job.id)).stdout
    assert "attempt 1: " in shown and "next attempt in" in shown and "attempt 2: " in shown


def test_a_pacs_that_does_not_take_a_storage_class_is_a_refusal_that_says_which(
    one_slice: list[Path], tmp_path: Path
) -> None:
    """A PACS that accepts the association but not the SEG's presentation context: refused at
    once, naming the class (not an error the worker cannot record, tried again for ever); files
    that are gone are refused too, by the worker, with a reason."""
    ct_only = AE(ae_title="CTONLY")
    ct_only.add_supported_context(CTImageStorage, "1.2.840.10008.1.2")  # implicit VR only
    server = ct_only.start_server(("127.0.0.1", 0), block=False)
    assert server is not None
    try:
        pacs = DicomDestination(ae_title="CTONLY", host="127.0.0.1", port=server.server_address[1])
        with pytest.raises(
            DeliveryRefusedError, match="does not take CT Image Storage in Explicit VR Little"
        ):
            send_by_c_store(pacs, one_slice, "SEGNODE", timeout_s=10)
        settings = Settings(data_dir=tmp_path, destinations={"pacs": pacs.model_dump()})
        outcome = _deliver(settings, "pacs", [tmp_path / "gone.dcm"])
        assert not outcome.delivered and outcome.permanent
        assert outcome.answer == (
            "internal error while sending (FileNotFoundError); the worker's log has the details"
        )
    finally:
        server.shutdown()


def test_a_delivery_being_sent_to_a_slow_pacs_stays_held_however_long_it_takes(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Six images to a PACS that answers each after 0.9 s take longer than the first hold (four
    times the 1 s timeout): the hold is renewed while they go, so no other worker sends them too."""
    received: list[int] = []
    slow = AE(ae_title="SLOW")
    slow.add_supported_context(CTImageStorage)

    def store(event: evt.Event) -> int:
        received.append(1)
        time.sleep(0.9)
        return 0x0000

    server = slow.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    assert server is not None
    settings = load_settings(
        None,
        data_dir=str(tmp_path),
        destinations={"pacs": {"ae_title": "SLOW", "host": "127.0.0.1", "port": server.server_address[1]}},
        rules=[{"name": "ct", "min_slices": 1, "destinations": ["pacs"], "outputs": ["overlay"]}],
        worker={"delivery_timeout_s": 1},
    )
    storage = Storage(settings.storage_dir, sessions.kw["bind"], min_free_bytes=0)
    (ct,) = factory.make_ct_series(tmp_path / "ct", n_slices=1, rows=32, cols=32)
    ds = pydicom.dcmread(ct)
    storage.store([ct.read_bytes()], instance_facts(ds, ds.file_meta.TransferSyntaxUID), "CT01")
    storage.close()
    with sessions.begin() as session:
        (job_id,) = assemble(session, settings, utcnow() + timedelta(seconds=60))
    runs = JobRuns(sessions, "w@a/1", lease_s=60)
    assert runs.claim(job_id) is not None
    folder = tmp_path / "results"
    factory.make_ct_series(folder / "overlay", n_slices=6, rows=32, cols=32)
    assert runs.segmented(job_id, folder, ["overlay"], "", "6 images", 1)
    ctx = WorkerContext(settings=settings, sessions=sessions, queue=JobQueue(make_celery(settings), settings))
    sending = threading.Thread(target=run_deliver_job, args=(ctx, job_id, "w@a/1"))
    sending.start()
    try:
        assert eventually(lambda: len(received) >= 6, timeout=60)  # past the first hold of 4 s
        other = JobRuns(sessions, "w@b/2", lease_s=60).claim_due_deliveries(job_id, hold_s=4)
        assert other == (folder, [])  # still held by the worker sending it
    finally:
        sending.join(60)
        server.shutdown()
    with sessions() as session:
        assert session.get_one(Job, job_id).state == JobState.DELIVERED
    assert len(received) == 6  # each image once
