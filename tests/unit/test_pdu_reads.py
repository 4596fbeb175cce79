"""PDUs read whole from a real socket however the network splits them, cut where the peer closed,
and middle data set fragments diverted away from pynetdicom in order, nothing else."""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from types import SimpleNamespace
from typing import Any, cast

from pynetdicom.transport import AssociationSocket

from node.pdu_reads import PduReader, data_fragments

CONTEXT = 1
MIDDLE, LAST, COMMAND_LAST = 0x00, 0x02, 0x03


def _send_in_pieces(sock: socket.socket, data: bytes, piece: int, close: bool) -> threading.Thread:
    def run() -> None:
        for start in range(0, len(data), piece):
            sock.sendall(data[start : start + piece])
            time.sleep(0.001)
        if close:
            sock.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _transport(sock: socket.socket, network_timeout: float | None = 5.0) -> AssociationSocket:
    """The parts of pynetdicom's association the reader uses, around a real socket."""
    restarts: list[float] = []
    dul = SimpleNamespace(
        event_queue=queue.Queue(),
        _idle_timer=SimpleNamespace(restart=lambda: restarts.append(time.monotonic())),
        _kill_thread=False,
        restarts=restarts,
    )
    assoc = SimpleNamespace(dul=dul, network_timeout=network_timeout)
    return cast(AssociationSocket, SimpleNamespace(socket=sock, assoc=assoc))


def _pdv(context: int, control: int, value: bytes) -> bytes:
    return struct.pack(">IBB", len(value) + 2, context, control) + value


def _p_data(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


def test_a_pdu_arriving_in_small_pieces_is_read_whole() -> None:
    ours, theirs = socket.socketpair()
    data = bytes(range(256)) * 512  # 128 KiB
    sender = _send_in_pieces(theirs, data + b"next", piece=1000, close=False)
    reader = PduReader(_transport(ours))
    assert reader.recv(len(data)) == data
    assert reader.recv(4) == b"next"  # nothing beyond the requested bytes was taken
    sender.join()
    ours.close()
    theirs.close()


def test_a_peer_closing_mid_pdu_gives_what_arrived() -> None:
    ours, theirs = socket.socketpair()
    sender = _send_in_pieces(theirs, b"x" * 5000, piece=700, close=True)
    received = PduReader(_transport(ours)).recv(10_000)
    sender.join()
    ours.close()
    assert received == b"x" * 5000  # pynetdicom sees the short read and closes the association


def test_middle_fragments_are_diverted_in_order_and_every_other_pdu_reaches_pynetdicom() -> None:
    ours, theirs = socket.socketpair()
    first, second, last = b"a" * 70_000, b"b" * 131_000, b"c" * 999
    release = struct.pack(">BBI", 0x05, 0, 4) + b"\x00" * 4
    stream = (
        _p_data(_pdv(CONTEXT, COMMAND_LAST, b"command"))
        + _p_data(_pdv(CONTEXT, MIDDLE, first))
        + _p_data(_pdv(CONTEXT, MIDDLE, second[:65_000]), _pdv(CONTEXT, MIDDLE, second[65_000:]))
        + _p_data(_pdv(CONTEXT + 2, MIDDLE, b"other context"))
        + _p_data(_pdv(CONTEXT, LAST, last))
        + release
    )
    sender = _send_in_pieces(theirs, stream, piece=4096, close=False)
    diverted: list[bytes] = []

    def divert(body: memoryview) -> bool:
        fragments = data_fragments(body, CONTEXT)
        if fragments is None:
            return False
        diverted.extend(bytes(f) for f in fragments)
        return True

    transport = _transport(ours)
    reader = PduReader(transport, divert)
    seen = []
    for _ in range(4):  # pynetdicom's two calls a PDU: header, then body
        header = reader.recv(6)
        (length,) = struct.unpack_from(">I", header, 2)
        seen.append(bytes(header) + bytes(reader.recv(length)))
    sender.join()
    assert seen[0] == _p_data(_pdv(CONTEXT, COMMAND_LAST, b"command"))
    assert seen[1] == _p_data(_pdv(CONTEXT + 2, MIDDLE, b"other context"))
    assert seen[2] == _p_data(_pdv(CONTEXT, LAST, last))
    assert seen[3] == release
    assert b"".join(diverted) == first + second
    assert len(cast(Any, transport.assoc.dul).restarts) == 2  # the idle timer ran on for each diverted PDU
    ours.close()
    theirs.close()


def test_nothing_is_diverted_while_pynetdicom_has_pdus_to_act_on() -> None:
    ours, theirs = socket.socketpair()
    middle = _p_data(_pdv(CONTEXT, MIDDLE, b"m" * 100))
    theirs.sendall(middle)
    transport = _transport(ours)
    transport.assoc.dul.event_queue.put("Evt10")  # an earlier PDU not yet acted on
    reader = PduReader(transport, lambda body: data_fragments(body, CONTEXT) is not None)
    header = reader.recv(6)
    assert bytes(header) + bytes(reader.recv(len(middle) - 6)) == middle
    ours.close()
    theirs.close()


def test_a_sender_silent_after_a_diverted_fragment_ends_the_association_at_the_network_timeout() -> None:
    ours, theirs = socket.socketpair()
    theirs.sendall(_p_data(_pdv(CONTEXT, MIDDLE, b"m" * 100)))
    reader = PduReader(_transport(ours, network_timeout=0.3), lambda body: True)
    started = time.monotonic()
    assert reader.recv(6) == b""  # to pynetdicom: the connection closed (Evt17), the spool is removed
    assert 0.3 <= time.monotonic() - started < 2
    ours.close()
    theirs.close()


def test_malformed_or_mixed_pdv_items_are_not_fragments() -> None:
    def body(*pdvs: bytes) -> memoryview:
        return memoryview(b"".join(pdvs))

    fragments = data_fragments(body(_pdv(CONTEXT, MIDDLE, b"ab"), _pdv(CONTEXT, MIDDLE, b"")), CONTEXT)
    assert fragments is not None and [bytes(f) for f in fragments] == [b"ab", b""]
    assert data_fragments(body(_pdv(CONTEXT, MIDDLE, b"ab"), _pdv(CONTEXT, LAST, b"c")), CONTEXT) is None
    assert data_fragments(body(_pdv(CONTEXT, 0x01, b"command part")), CONTEXT) is None
    assert data_fragments(body(_pdv(CONTEXT + 2, MIDDLE, b"ab")), CONTEXT) is None
    assert data_fragments(body(_pdv(CONTEXT, MIDDLE, b"ab")[:-1]), CONTEXT) is None  # item cut short
    assert data_fragments(body(struct.pack(">IBB", 1, CONTEXT, MIDDLE)), CONTEXT) is None  # length < 2
    assert data_fragments(body(b"\x00\x00"), CONTEXT) is None
    assert data_fragments(body(), CONTEXT) is None
