"""The pynetdicom internals the fast path leans on, checked on the installed pynetdicom with real
associations over loopback: each test fails when a seam moved (a method renamed, a queue replaced,
a poll no longer made), instead of the fast path silently doing nothing or breaking a transfer.

Run them before adding a pynetdicom version to ``node.receive.fastpath.TESTED_PYNETDICOM``.
"""

from __future__ import annotations

import inspect
import queue
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, association, dul, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.transport import AssociationSocket

from node.core.config import ScpSettings
from node.db import engine as db
from node.receive import fastpath
from node.receive.fastpath import pdu_reads, reactor_pace, spooling, store_response
from node.receive.fastpath.path import FastPath
from node.receive.listener import start_scp
from node.receive.paths import Handler
from node.receive.storage import Storage
from tests import dicom_factory as factory

CT = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class Served:
    """The listener's side: the associations it served, and what the fast path did for them."""

    port: int
    associations: list[Association] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)


class _RecordingFastPath(FastPath):
    def __init__(self, storage: Storage, served: Served) -> None:
        super().__init__(storage)
        self.served = served

    def handlers(self) -> list[Handler]:
        return [*super().handlers(), (evt.EVT_CONN_OPEN, lambda e: self.served.associations.append(e.assoc))]


def _counting(calls: Counter[str], name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        calls[name if result is not None or name != "diverted" else "not diverted"] += 1
        return result

    return counted


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    url = f"sqlite:///{tmp_path / 'segnode.sqlite'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    result = Served(0)
    calls = result.calls
    # Each of the fast path's own functions that a seam leads to, counted where pynetdicom calls it.
    monkeypatch.setattr(spooling, "data_fragments", _counting(calls, "diverted", spooling.data_fragments))
    monkeypatch.setattr(
        store_response,
        "encode_store_response",
        _counting(calls, "packed", store_response.encode_store_response),
    )
    monkeypatch.setattr(
        spooling.Spooler, "_complete", _counting(calls, "spooled", spooling.Spooler._complete)
    )
    wakeups = reactor_pace.Wakeups
    monkeypatch.setattr(wakeups, "reactor_wait", _counting(calls, "reactor woken", wakeups.reactor_wait))
    monkeypatch.setattr(wakeups, "dul_wait", _counting(calls, "dul woken", wakeups.dul_wait))
    settings = ScpSettings(port=0, min_free_bytes=0, fast_path=True)
    storage = Storage(tmp_path / "store", engine, 0)
    server = start_scp(settings, storage, _RecordingFastPath(storage, result))
    result.port = server.server_address[1]
    try:
        yield result
    finally:
        server.shutdown()
        storage.close()
        engine.dispose()


def _store_a_large_slice(port: int, tmp_path: Path) -> None:
    (path,) = factory.make_ct_series(tmp_path / "ct", n_slices=1, rows=512, cols=512)  # ~0.5 MB
    ae = AE(ae_title="CONTRACT")
    ae.add_requested_context(CT, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="SEGNODE")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(dcmread(path)).Status == 0
    finally:
        assoc.release()


def test_the_installed_pynetdicom_is_one_the_fast_path_was_tested_with() -> None:
    assert fastpath.unavailable() is None


def test_the_replaced_methods_keep_their_signatures() -> None:
    def parameters(function: Callable[..., Any]) -> list[str]:
        return list(inspect.signature(function).parameters)

    # Replaced per association by instance attributes of the same call shape.
    assert parameters(DIMSEServiceProvider.receive_primitive) == ["self", "primitive"]
    assert parameters(DIMSEServiceProvider.send_msg) == ["self", "primitive", "context_id"]
    assert parameters(AssociationSocket.recv) == ["self", "nr_bytes"]


def test_a_served_association_has_the_internals_the_fast_path_reads(served: Served, tmp_path: Path) -> None:
    _store_a_large_slice(served.port, tmp_path)
    (assoc,) = served.associations
    # Waited on instead of polled: the modules' own ``time``, and the DUL's two queues.
    assert association.time.sleep is reactor_pace.reactor_sleep
    assert dul.time.sleep is reactor_pace.dul_sleep
    provider = assoc.dul
    assert isinstance(provider.to_user_queue, reactor_pace._Doorbell)
    assert isinstance(provider.to_provider_queue, reactor_pace._Doorbell)
    assert isinstance(provider.event_queue, queue.Queue)
    assert callable(provider._idle_timer.restart)
    assert isinstance(assoc.dimse.msg_queue, queue.Queue)
    assert hasattr(assoc.dimse, "message") and callable(assoc.kill)
    assert provider.socket is not None
    assert isinstance(getattr(provider.socket.recv, "__self__", None), pdu_reads.PduReader)


def test_data_transfer_is_the_state_the_fast_path_knows(served: Served) -> None:
    ae = AE(ae_title="CONTRACT")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", served.port, ae_title="SEGNODE")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
        (acceptor,) = served.associations
        assert acceptor.dul.state_machine.current_state == pdu_reads.DATA_TRANSFER
    finally:
        assoc.release()


def test_each_part_is_called_by_pynetdicom_for_a_real_instance(served: Served, tmp_path: Path) -> None:
    _store_a_large_slice(served.port, tmp_path)
    calls = served.calls
    assert calls["spooled"] == 1  # receive_primitive: the data set went to its file as it arrived
    assert calls["diverted"] >= 2  # recv: middle fragments went past pynetdicom's decoding
    assert calls["packed"] == 1  # send_msg: the response was packed here
    assert calls["reactor woken"] > 0  # association.time.sleep(0.001): the reactor waited on its queue
    assert calls["dul woken"] > 0  # dul.time.sleep: the DUL thread waited on its socket
