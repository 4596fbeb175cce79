"""The DICOM listener against real senders: DCMTK storescu/echoscu and a pynetdicom SCU."""

from __future__ import annotations

import gc
import logging
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, _config, association, dul
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.core.config import ScpSettings
from node.db import engine as db
from node.db.models import Instance, Series
from node.receive.fastpath import reactor_pace
from node.receive.fastpath.path import FastPath
from node.receive.listener import StoreStatus, start_scp, stop_listening
from node.receive.paths import ReceivePath, choose_path
from node.receive.storage import Storage
from tests import dicom_factory as factory
from tests import peers
from tests.shared_data import ABDOMEN_J2K, real_j2k_copy
from tests.waiting import eventually

# Real programs end to end: run by ./dev test and CI, left out of the edit loop's -m 'not slow'.
pytestmark = pytest.mark.slow

CT = "1.2.840.10008.5.1.4.1.1.2"

# storescu's option that proposes each syntax (it otherwise decompresses to what it proposes).
PROPOSE: dict[str, str] = {
    ImplicitVRLittleEndian: "-xi",
    ExplicitVRLittleEndian: "-xe",
    DeflatedExplicitVRLittleEndian: "-xd",
    JPEGLosslessSV1: "-xs",
    JPEGLSLossless: "-xt",
    JPEG2000Lossless: "-xv",
    RLELossless: "-xr",
}


@dataclass
class RunningScp:
    port: int
    root: Path
    sessions: sessionmaker[Session]
    server: ThreadedAssociationServer

    def instance_count(self) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count(Instance.id))) or 0


@pytest.fixture(params=[False, True], ids=["plain", "fast-path"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    """Every listener test runs on both receive paths; fast-path-only tests parametrize it."""
    return bool(request.param)


def _receive_path(settings: ScpSettings, storage: Storage) -> ReceivePath:
    """The path the settings choose, checked: the fast path must not fall back silently here."""
    path = choose_path(settings, storage)
    assert isinstance(path, FastPath) == settings.fast_path, f"asked fast_path={settings.fast_path}"
    return path


@pytest.fixture
def scp_factory(tmp_path: Path, fast_path: bool) -> Iterator[Callable[..., RunningScp]]:
    url = f"sqlite:///{tmp_path / 'segnode.sqlite'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    sessions = db.make_sessionmaker(engine)
    servers = []

    def start(**scp: object) -> RunningScp:
        settings = ScpSettings.model_validate({"port": 0, "fast_path": fast_path, **scp})  # 0: no port race
        root = tmp_path / "store"
        storage = Storage(root, engine, settings.min_free_bytes)
        server = start_scp(settings, storage, _receive_path(settings, storage))
        servers.append(server)
        return RunningScp(server.server_address[1], root, sessions, server)

    yield start
    for server in servers:
        server.shutdown()
    engine.dispose()


@pytest.fixture
def scp(scp_factory: Callable[..., RunningScp]) -> RunningScp:
    return scp_factory(min_free_bytes=0)


def test_echo(scp: RunningScp) -> None:
    result = peers.echoscu(scp.port, aet="SEGNODE")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "syntax",
    [
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEG2000Lossless,
        RLELossless,
    ],
)
def test_series_in_each_syntax_is_stored_as_received(scp: RunningScp, tmp_path: Path, syntax: str) -> None:
    paths = factory.make_ct_series(tmp_path / "ct", n_slices=3, transfer_syntax=syntax)
    result = peers.storescu(paths, scp.port, aet="SEGNODE", extra_args=["-R", PROPOSE[syntax]])
    assert result.returncode == 0, result.stdout + result.stderr
    assert scp.instance_count() == 3
    for sent in paths:
        original = dcmread(sent)
        stored_path = (
            scp.root
            / original.StudyInstanceUID
            / original.SeriesInstanceUID
            / f"{original.SOPInstanceUID}.dcm"
        )
        stored = dcmread(stored_path)
        assert stored.file_meta.TransferSyntaxUID == syntax
        assert stored.PixelData == original.PixelData


def _data_set_bytes(path: Path) -> bytes:
    """A Part 10 file's bytes after its File Meta Information (whose group length is at 140)."""
    raw = path.read_bytes()
    (meta_length,) = struct.unpack_from("<I", raw, 140)
    return raw[144 + meta_length :]


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_slices_of_many_pdus_are_kept_byte_for_byte(scp: RunningScp, tmp_path: Path, syntax: str) -> None:
    # 0.5 MB a slice: four or five P-DATA each, whose middle fragments bypass pynetdicom's decoding.
    paths = factory.make_ct_series(tmp_path / "ct", n_slices=3, rows=512, cols=512, transfer_syntax=syntax)
    result = peers.storescu(paths, scp.port, aet="SEGNODE", extra_args=["-R", PROPOSE[syntax]])
    assert result.returncode == 0, result.stdout + result.stderr
    assert scp.instance_count() == 3
    for sent in paths:
        original = dcmread(sent, stop_before_pixels=True)
        stored = (
            scp.root
            / original.StudyInstanceUID
            / original.SeriesInstanceUID
            / f"{original.SOPInstanceUID}.dcm"
        )
        assert _data_set_bytes(stored) == _data_set_bytes(sent)
    assert not list((scp.root / ".incoming").iterdir())


def test_real_jpeg2000_series_is_stored(scp: RunningScp, tmp_path: Path) -> None:
    # The shared series was anonymised by emptying its UIDs; a copy with them restored is sent.
    paths = real_j2k_copy(tmp_path / "j2k")
    result = peers.storescu(paths, scp.port, aet="SEGNODE", extra_args=["-R", "-xv"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert scp.instance_count() == 20
    stored = sorted(p for p in scp.root.rglob("*.dcm"))
    assert len(stored) == 20
    assert {dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID for p in stored} == {
        JPEG2000Lossless
    }


def test_instance_with_empty_uids_is_refused(scp: RunningScp) -> None:
    # As shared, the real series has an empty SOPInstanceUID in its data set: not storable.
    assert _send(scp.port, sorted(ABDOMEN_J2K.iterdir())[0], chunked=True) == StoreStatus.CANNOT_UNDERSTAND
    assert scp.instance_count() == 0


def test_duplicate_instance_is_stored_once(scp: RunningScp, tmp_path: Path) -> None:
    paths = factory.make_ct_series(tmp_path / "ct", n_slices=2)
    for _ in range(2):
        assert peers.storescu(paths, scp.port, aet="SEGNODE").returncode == 0
    assert scp.instance_count() == 2
    with scp.sessions() as session:
        assert session.scalars(select(Series.instance_count)).one() == 2


def test_calling_ae_not_allowed_is_rejected(
    scp_factory: Callable[..., RunningScp], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scp = scp_factory(min_free_bytes=0, allowed_calling_aes=["CT01"])
    paths = factory.make_ct_series(tmp_path / "ct", n_slices=1)
    refused = peers.storescu(paths, scp.port, aet="SEGNODE", calling_aet="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert "association from INTRUDER at 127.0.0.1 refused: calling AE title not recognised" in caplog.text
    assert scp.instance_count() == 0
    assert peers.storescu(paths, scp.port, aet="SEGNODE", calling_aet="CT01").returncode == 0
    assert scp.instance_count() == 1


def _send(port: int, path: Path, *, chunked: bool = False) -> int:
    """C-STORE one file with pynetdicom; chunked sends the file's bytes as they are, even if corrupt."""
    ae = AE(ae_title="TESTSCU")
    meta = dcmread(path, stop_before_pixels=True, force=True).file_meta
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="SEGNODE")
    assert assoc.is_established
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = chunked
    try:
        status = assoc.send_c_store(path if chunked else dcmread(path))
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()
    return int(status.Status)


@pytest.mark.parametrize("keyword", ["SeriesInstanceUID", "SOPClassUID"])
def test_hostile_uid_is_refused_and_never_becomes_a_path(
    scp: RunningScp, tmp_path: Path, keyword: str
) -> None:
    (path,) = factory.make_ct_series(tmp_path / "ct", n_slices=1)
    factory.set_hostile_uid(path, keyword, "../../etc")
    ds = dcmread(path)
    ds.file_meta.MediaStorageSOPClassUID = UID(CT)  # proposed and requested as CT; only the data set lies
    ds.save_as(path)
    assert _send(scp.port, path, chunked=True) == StoreStatus.CANNOT_UNDERSTAND
    assert scp.instance_count() == 0
    assert not (scp.root.parent / "etc").exists()
    assert not [p for p in scp.root.rglob("*") if p.is_file()]


def test_truncated_data_set_is_refused(scp: RunningScp, tmp_path: Path) -> None:
    (path,) = factory.make_ct_series(tmp_path / "ct", n_slices=1)
    factory.truncate(path, keep=0.05)
    assert _send(scp.port, path, chunked=True) == StoreStatus.CANNOT_UNDERSTAND
    assert scp.instance_count() == 0


def test_ct_image_without_pixel_data_is_refused(scp: RunningScp, tmp_path: Path) -> None:
    (path,) = factory.make_ct_series(tmp_path / "ct", n_slices=1)
    factory.strip_pixel_data(path)
    assert _send(scp.port, path) == StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert scp.instance_count() == 0


def test_non_ct_objects_of_a_study_are_stored(scp: RunningScp, tmp_path: Path) -> None:
    paths = [factory.make_basic_sr(tmp_path / "sr"), factory.make_secondary_capture(tmp_path / "sc")]
    result = peers.storescu(paths, scp.port, aet="SEGNODE")
    assert result.returncode == 0, result.stdout + result.stderr
    assert scp.instance_count() == 2


def test_unknown_transfer_syntax_is_not_accepted(scp: RunningScp) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT, ["1.2.840.10008.1.2.4.110"])  # JPEG XL Lossless: not decodable here
    ae.add_requested_context(CT, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="SEGNODE")
    assert assoc.is_established
    accepted = {str(c.transfer_syntax[0]) for c in assoc.accepted_contexts}
    rejected = {str(c.transfer_syntax[0]) for c in assoc.rejected_contexts}
    assoc.release()
    assert accepted == {ExplicitVRLittleEndian}
    assert rejected == {"1.2.840.10008.1.2.4.110"}


def test_full_disk_answers_out_of_resources(scp_factory: Callable[..., RunningScp], tmp_path: Path) -> None:
    scp = scp_factory(min_free_bytes=1 << 62)
    (path,) = factory.make_ct_series(tmp_path / "ct", n_slices=1)
    assert _send(scp.port, path) == StoreStatus.OUT_OF_RESOURCES
    assert scp.instance_count() == 0
    assert not [p for p in scp.root.rglob("*") if p.is_file()]


def _echo_ae(title: str) -> AE:
    ae = AE(ae_title=title)
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae


def test_association_limit(scp_factory: Callable[..., RunningScp], caplog: pytest.LogCaptureFixture) -> None:
    scp = scp_factory(min_free_bytes=0, max_associations=1, max_associations_per_address=2)
    first = _echo_ae("TESTSCU").associate("127.0.0.1", scp.port, ae_title="SEGNODE")
    second = _echo_ae("ANOTHER").associate("127.0.0.1", scp.port, ae_title="SEGNODE")
    try:
        assert first.is_established
        assert second.is_rejected
        assert "rejected: the node's 1 associations are all in use" in caplog.text
    finally:
        first.release()


def test_one_caller_cannot_take_every_slot(
    scp_factory: Callable[..., RunningScp], caplog: pytest.LogCaptureFixture
) -> None:
    scp = scp_factory(
        min_free_bytes=0, max_associations=4, max_associations_per_caller=2, max_associations_per_address=4
    )
    hog = _echo_ae("HOG")
    held = [hog.associate("127.0.0.1", scp.port, ae_title="SEGNODE") for _ in range(2)]
    others = _echo_ae("MODALITY").associate("127.0.0.1", scp.port, ae_title="SEGNODE")
    try:
        assert all(a.is_established for a in held)
        third = hog.associate("127.0.0.1", scp.port, ae_title="SEGNODE")
        assert third.is_rejected
        rejection = third.acceptor.primitive
        assert rejection is not None and (rejection.result, rejection.result_source) == (2, 3)
        assert others.is_established and others.send_c_echo().Status == 0  # the others still get in
        assert "HOG holds 2 associations already, as many as one caller may" in caplog.text
    finally:
        for assoc in [*held, others]:
            assoc.release()
    again = hog.associate("127.0.0.1", scp.port, ae_title="SEGNODE")  # its slots came back
    assert again.is_established
    again.release()


def test_one_address_cannot_take_every_slot_under_many_ae_titles(
    scp_factory: Callable[..., RunningScp], caplog: pytest.LogCaptureFixture
) -> None:
    scp = scp_factory(min_free_bytes=0, max_associations=6, max_associations_per_address=2)
    held = [_echo_ae(f"HOG{i}").associate("127.0.0.1", scp.port, ae_title="SEGNODE") for i in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = _echo_ae("HOG3").associate("127.0.0.1", scp.port, ae_title="SEGNODE")
        assert third.is_rejected  # a new AE title, but the same address
        rejection = third.acceptor.primitive
        assert rejection is not None and (rejection.result, rejection.result_source) == (2, 3)
        assert "127.0.0.1 holds 2 associations already, as many as one address may" in caplog.text
        # The same caller from another address of this machine still gets in.
        other = _echo_ae("HOG3")
        elsewhere = other.associate("127.0.0.1", scp.port, ae_title="SEGNODE", bind_address=("127.0.0.2", 0))
        assert elsewhere.is_established and elsewhere.send_c_echo().Status == 0
        elsewhere.release()
    finally:
        for assoc in held:
            assoc.release()
    again = _echo_ae("HOG3").associate("127.0.0.1", scp.port, ae_title="SEGNODE")  # the slots came back
    assert again.is_established
    again.release()


def test_disk_filling_up_mid_study_answers_out_of_resources_and_keeps_nothing_partial(
    tmp_path: Path, tiny_disk: Path, fast_path: bool
) -> None:
    url = f"sqlite:///{tmp_path / 'segnode.sqlite'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    sessions = db.make_sessionmaker(engine)
    settings = ScpSettings(port=0, min_free_bytes=0, fast_path=fast_path)
    storage = Storage(tiny_disk, engine, 0)
    server = start_scp(settings, storage, _receive_path(settings, storage))
    port = server.server_address[1]
    try:
        paths = factory.make_ct_series(tmp_path / "ct", n_slices=40, rows=128, cols=128)  # ~33 kB each
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(CT, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", port, ae_title="SEGNODE")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(dcmread(p)).Status) for p in paths]
        assoc.release()
    finally:
        server.shutdown()
    stored = statuses.count(StoreStatus.SUCCESS)
    assert 0 < stored < len(paths)
    assert set(statuses) == {StoreStatus.SUCCESS, StoreStatus.OUT_OF_RESOURCES}
    with sessions() as session:
        recorded = session.scalars(select(Instance.path)).all()
    engine.dispose()
    assert len(recorded) == stored
    files = sorted(p for p in tiny_disk.rglob("*.dcm"))
    assert len(files) == stored
    for path in files:  # every kept file is whole
        assert dcmread(path).pixel_array.shape == (128, 128)
    assert not list((tiny_disk / ".incoming").iterdir())


def test_tls_listener_accepts_dicom_over_tls_only(
    scp_factory: Callable[..., RunningScp], tmp_path: Path
) -> None:
    key, cert = tmp_path / "tls.key", tmp_path / "tls.crt"
    openssl = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=segnode-test".split()
    made = subprocess.run(
        [*openssl, "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    scp = scp_factory(min_free_bytes=0, tls_certificate=cert, tls_private_key=key)
    # 0.5 MB slices: several P-DATA each, some of them read ahead into the TLS layer's buffer.
    paths = factory.make_ct_series(tmp_path / "ct", n_slices=3, rows=512, cols=512)
    started = time.monotonic()
    secure = peers.storescu(paths, scp.port, aet="SEGNODE", extra_args=["+tla", "+cf", str(cert)])
    assert secure.returncode == 0, secure.stdout + secure.stderr
    assert scp.instance_count() == 3
    assert time.monotonic() - started < 20  # no slice waited on the socket for data already decrypted
    plain = peers.storescu(paths, scp.port, aet="SEGNODE", timeout=60)
    assert plain.returncode != 0


@pytest.mark.parametrize("fast_path", [True], ids=["fast-path"])
def test_listener_threads_are_woken_by_what_they_wait_for(
    scp: RunningScp, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert association.time.sleep == reactor_pace.reactor_sleep  # the reactor's 1 ms poll is a wait
    assert dul.time.sleep == reactor_pace.dul_sleep  # the DUL thread's too
    # Were anything not rung (the acceptance, an echo response, the release), it would wait 60 s.
    monkeypatch.setattr(reactor_pace, "WOKEN_WAIT_S", 60.0)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT, [ExplicitVRLittleEndian])
    ae.add_requested_context("1.2.840.10008.1.1")
    started = time.monotonic()
    for _ in range(2):
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="SEGNODE")
        assert assoc.is_established
        for _ in range(3):
            assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert assoc.is_released
    assert time.monotonic() - started < 30  # not one of the eight steps waited out its 60 s bound
    assert eventually(lambda: not scp.server.active_associations)


def test_ended_associations_leave_no_descriptor_open(scp: RunningScp) -> None:
    # pynetdicom's association and DUL refer to each other: what is not closed when an association
    # ends stays open until a full garbage collection, which may not come for a long time.
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.1.1")

    def echo_once() -> None:
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="SEGNODE")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()

    def open_descriptors() -> int:
        assert eventually(lambda: not scp.server.active_associations)
        return len(os.listdir("/proc/self/fd"))

    gc.disable()
    try:
        echo_once()
        before = open_descriptors()
        for _ in range(10):
            echo_once()
        after = open_descriptors()
    finally:
        gc.enable()
    assert after - before < 5, f"{after - before} descriptors left open by 10 associations"


def test_an_association_aborted_by_the_node_ends_at_once(
    scp: RunningScp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reactor_pace, "WOKEN_WAIT_S", 60.0)  # were its reactor not rung: 60 s
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="SEGNODE")
    assert assoc.is_established
    assert eventually(lambda: len(scp.server.active_associations) == 1)
    (served,) = scp.server.active_associations
    started = time.monotonic()
    served.abort()  # as the listener does to each association when it shuts down
    assert eventually(lambda: not served.is_alive(), timeout=10)
    assert time.monotonic() - started < 30
    assert eventually(lambda: assoc.is_aborted)


def test_an_association_whose_receiving_thread_died_ends_and_others_go_on(
    scp: RunningScp, tmp_path: Path
) -> None:
    # pynetdicom raises no EVT_CONN_CLOSE when its receiving thread ends on an exception; its
    # reactor must notice within its wait's bound, without a ring.
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT, [ExplicitVRLittleEndian])
    first = ae.associate("127.0.0.1", scp.port, ae_title="SEGNODE")
    assert first.is_established
    assert eventually(lambda: len(scp.server.active_associations) == 1)
    (served,) = scp.server.active_associations
    served.dul.kill_dul()  # its receiving thread stops without closing anything
    assert eventually(lambda: not served.is_alive())
    second = ae.associate("127.0.0.1", scp.port, ae_title="SEGNODE")
    try:
        assert second.is_established
        (path,) = factory.make_ct_series(tmp_path / "ct", n_slices=1)
        assert second.send_c_store(dcmread(path)).Status == 0
    finally:
        second.release()
        first.abort()


@pytest.mark.parametrize("fast_path", [True], ids=["fast-path"])
def test_instance_is_written_while_it_arrives_and_removed_when_its_sender_aborts(
    scp: RunningScp, tmp_path: Path
) -> None:
    (path,) = factory.make_ct_series(tmp_path / "ct", n_slices=1, rows=512, cols=512)  # ~0.5 MB
    ds = dcmread(path)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="SEGNODE")
    assert assoc.is_established
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CT
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    encoded = encode(ds, False, True)
    assert encoded is not None
    request.DataSet = BytesIO(encoded)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context_id, max_pdu = assoc.accepted_contexts[0].context_id, assoc.acceptor.maximum_length
    assert context_id is not None and max_pdu is not None
    pdatas = list(message.encode_msg(context_id, max_pdu))
    assert len(pdatas) > 2  # the command, then the data set in several P-DATA
    for pdata in pdatas[:-1]:  # all but the last fragment
        assoc.dul.send_pdu(pdata)
    incoming = scp.root / ".incoming"

    def spooled_bytes() -> int:
        return sum(p.stat().st_size for p in incoming.glob("*.part"))

    # Everything that arrived is already in a temporary file; nothing is recorded or in place.
    assert eventually(lambda: spooled_bytes() >= 400_000), spooled_bytes()
    assert scp.instance_count() == 0
    assoc.abort()
    assert eventually(lambda: not list(incoming.glob("*.part")))
    assert scp.instance_count() == 0
    assert not list(scp.root.rglob("*.dcm"))


def _stall_inside_a_pdu(port: int, pdu_type: int, sent: int, announced: int) -> float:
    """Connect, send a PDU's header announcing ``announced`` bytes and only ``sent`` of them,
    then wait: seconds until the node closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as peer:
        peer.sendall(struct.pack(">BBL", pdu_type, 0, announced) + b"\0" * sent)
        started = time.monotonic()
        while peer.recv(4096):  # an A-ABORT, if any, then the close
            pass
        return time.monotonic() - started


def test_a_peer_stalling_inside_a_pdu_is_cut_off_and_frees_its_slot(
    scp_factory: Callable[..., RunningScp],
) -> None:
    scp = scp_factory(min_free_bytes=0, max_associations=1, network_timeout_s=1.0)
    # Inside the first PDU (the association request), before any association exists.
    assert _stall_inside_a_pdu(scp.port, pdu_type=0x01, sent=10, announced=1000) < 20
    assert eventually(lambda: not scp.server.active_associations, timeout=20)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT, [ExplicitVRLittleEndian])
    ae.add_requested_context("1.2.840.10008.1.1")
    # Inside a P-DATA of an established association: its slot is the only one.
    stalled = ae.associate("127.0.0.1", scp.port, ae_title="SEGNODE")
    assert stalled.is_established
    assert stalled.dul.socket is not None and stalled.dul.socket.socket is not None
    stalled.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 100_000) + b"\0" * 1000)
    assert eventually(lambda: not scp.server.active_associations, timeout=20)
    assert eventually(lambda: not stalled.is_alive(), timeout=20)
    after = ae.associate("127.0.0.1", scp.port, ae_title="SEGNODE")  # the one slot is free again
    try:
        assert after.is_established
        assert after.send_c_echo().Status == 0
    finally:
        after.release()


def test_port_probes_do_not_lock_the_senders_out(scp_factory: Callable[..., RunningScp]) -> None:
    """Connections that close without asking for an association (port scanners, TCP health checks)
    took pynetdicom's slots for the whole network timeout: every sender was refused meanwhile."""
    scp = scp_factory(min_free_bytes=0, max_associations=2)
    for _ in range(10):
        socket.create_connection(("127.0.0.1", scp.port), timeout=5).close()
    result = peers.echoscu(scp.port, aet="SEGNODE")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_database_outage_is_logged_when_it_starts_and_when_it_ends(
    fresh_pg_url: str, tmp_path: Path, fast_path: bool, caplog: pytest.LogCaptureFixture
) -> None:
    db.upgrade(fresh_pg_url)
    engine = db.make_engine(fresh_pg_url)
    settings = ScpSettings(port=0, min_free_bytes=0, fast_path=fast_path)
    storage = Storage(tmp_path / "store", engine, 0)
    server = start_scp(settings, storage, _receive_path(settings, storage))
    port = server.server_address[1]
    paths = factory.make_ct_series(tmp_path / "ct", n_slices=12, rows=32, cols=32)
    try:
        assert _send(port, paths[0]) == StoreStatus.SUCCESS
        with peers.pg_outage(fresh_pg_url):
            refused = [_send(port, path) for path in paths[1:11]]
        assert refused == [StoreStatus.PROCESSING_FAILURE] * 10
        assert _send(port, paths[11]) == StoreStatus.SUCCESS  # back: nothing to restart
    finally:
        server.shutdown()
        storage.close()
        engine.dispose()
    lines = [r for r in caplog.records if r.name == "node.receive.listener"]
    started = [r for r in lines if "storing instances failing" in r.getMessage()]
    ended = [r.getMessage() for r in lines if "storing instances working again" in r.getMessage()]
    assert len(started) == 1 and "not currently accepting connections" in started[0].getMessage()
    assert len(ended) == 1 and "10 failure(s) meanwhile" in ended[0]
    assert [r for r in lines if r.exc_info] == []  # a database outage is understood: no traceback


def test_a_stop_lets_an_open_association_finish_and_refuses_new_ones(
    scp_factory: Callable[..., RunningScp], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node.receive.listener")
    scp = scp_factory(min_free_bytes=0)
    paths = factory.make_ct_series(tmp_path / "ct", n_slices=6, rows=32, cols=32)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT, [ExplicitVRLittleEndian])
    sending = ae.associate("127.0.0.1", scp.port, ae_title="SEGNODE")
    assert sending.is_established
    assert sending.send_c_store(dcmread(paths[0])).Status == StoreStatus.SUCCESS
    stopping = threading.Thread(target=stop_listening, args=(scp.server, 60.0))
    stopping.start()
    assert eventually(lambda: not peers.port_open(scp.port))  # a new sender is refused at once
    statuses = [int(sending.send_c_store(dcmread(p)).Status) for p in paths[1:]]
    sending.release()
    stopping.join(timeout=30)  # the association ended: the stop does not wait out the grace period
    assert not stopping.is_alive()
    assert statuses == [StoreStatus.SUCCESS] * 5
    assert scp.instance_count() == 6
    assert "listener stopped; every association had ended" in caplog.text


def test_a_stop_aborts_what_is_still_open_after_the_grace_period(
    scp_factory: Callable[..., RunningScp], caplog: pytest.LogCaptureFixture
) -> None:
    scp = scp_factory(min_free_bytes=0)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    idle = ae.associate("127.0.0.1", scp.port, ae_title="SEGNODE")
    assert idle.is_established
    stop_listening(scp.server, 0.5)
    assert eventually(lambda: idle.is_aborted)
    assert not scp.server.active_associations
    assert "1 association(s) still open after 0.5 s aborted" in caplog.text
    assert not [r for r in caplog.records if r.name.startswith("node") and r.exc_info]
