"""PDUs read whole from a real socket however the network splits them, cut where the peer closed,
and middle data set fragments diverted away from pynetdicom in order, nothing else."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

from node.receive.fastpath.pdu_reads import PduReader, data_fragments

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


RESTARTS: dict[int, list[float]] = {}  # the idle timer's restarts, by transport


def _transport(sock: socket.socket, state: str = "Sta6") -> AssociationSocket:
    """A real pynetdicom association (never started) around a real socket, in ``state``; its
    idle timer's restarts are counted in ``RESTARTS``."""
    assoc = Association(AE(), "acceptor")
    assoc.dul.state_machine.current_state = state
    transport = AssociationSocket(assoc, client_socket=sock)
    assert assoc.dul.event_queue.get_nowait() == "Evt5"  # the connection, as its DUL thread takes it
    restarts = RESTARTS.setdefault(id(transport), [])
    timer = assoc.dul._idle_timer
    restart = timer.restart

    def counted() -> None:
        restarts.append(time.monotonic())
        restart()

    timer.restart = counted  # type: ignore[method-assign]
    return transport


def _roomy_socketpair() -> tuple[socket.socket, socket.socket]:
    """A socket pair whose buffers hold a whole test stream: what is sent has arrived."""
    ours, theirs = socket.socketpair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return ours, theirs


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
    ours, theirs = _roomy_socketpair()
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
    theirs.sendall(stream)  # all arrived: each diverted P-DATA has the next one behind it
    diverted: list[bytes] = []

    def divert(body: memoryview) -> Callable[[], None] | None:
        fragments = data_fragments(body, CONTEXT)
        if fragments is None:
            return None
        return lambda: diverted.extend(bytes(f) for f in fragments)

    transport = _transport(ours)
    reader = PduReader(transport, divert)
    seen = []
    for _ in range(4):  # pynetdicom's two calls a PDU: header, then body
        header = reader.recv(6)
        (length,) = struct.unpack_from(">I", header, 2)
        seen.append(bytes(header) + bytes(reader.recv(length)))
    assert seen[0] == _p_data(_pdv(CONTEXT, COMMAND_LAST, b"command"))
    assert seen[1] == _p_data(_pdv(CONTEXT + 2, MIDDLE, b"other context"))
    assert seen[2] == _p_data(_pdv(CONTEXT, LAST, last))
    assert seen[3] == release
    assert b"".join(diverted) == first + second
    assert len(RESTARTS[id(transport)]) == 2  # the idle timer ran on for each diverted PDU
    ours.close()
    theirs.close()


def _handed_over(transport: AssociationSocket, pdu: bytes) -> bool:
    """Whether a reader that would divert any P-DATA gives ``pdu`` to pynetdicom instead."""
    reader = PduReader(transport, lambda body: (lambda: None) if data_fragments(body, CONTEXT) else None)
    header = reader.recv(6)
    return bytes(header) + bytes(reader.recv(len(pdu) - 6)) == pdu


def test_nothing_is_diverted_unless_pynetdicom_would_only_decode_it() -> None:
    middle = _p_data(_pdv(CONTEXT, MIDDLE, b"m" * 100))
    for stuck in ("event_queue", "to_provider_queue", "state"):
        ours, theirs = _roomy_socketpair()
        theirs.sendall(middle + middle)  # the next PDU is there: only the condition under test holds it
        transport = _transport(ours, state="Sta13" if stuck == "state" else "Sta6")
        if stuck != "state":
            getattr(transport.assoc.dul, stuck).put("an earlier PDU or an A-ABORT")
        assert _handed_over(transport, middle), stuck
        ours.close()
        theirs.close()


def test_a_fragment_whose_next_pdu_is_not_arriving_goes_to_pynetdicom_without_waiting() -> None:
    ours, theirs = _roomy_socketpair()
    middle = _p_data(_pdv(CONTEXT, MIDDLE, b"m" * 100))
    theirs.sendall(middle)  # and then the sender is silent: no wait in pynetdicom's place
    started = time.monotonic()
    assert _handed_over(_transport(ours), middle)
    assert time.monotonic() - started < 1
    ours.close()
    theirs.close()


def test_a_forged_pdu_length_allocates_only_what_arrives() -> None:
    ours, theirs = socket.socketpair()
    theirs.sendall(b"x" * 1000)
    theirs.close()
    assert PduReader(_transport(ours)).recv(0xFFFFFFF0) == b"x" * 1000  # not a 4 GiB buffer
    ours.close()


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
