"""PDUs read whole from the socket, and the middle fragments of a data set kept from pynetdicom's
Python path (figures: benchmarks/RESULTS.md, "spooling").

:class:`PduReader` replaces pynetdicom's ``AssociationSocket.recv`` (4 KiB reads appended one by one)
with one ``recv_into`` a PDU. Given a ``divert`` function it offers every P-DATA to it first: a
fragment it takes (the spooler's middle fragments, spooling.py) goes from this buffer to the file
and pynetdicom never sees that PDU. A PDU is diverted only in data transfer, with nothing queued on
pynetdicom's side, and when the next PDU begins to arrive within ``NEXT_PDU_WAIT_S``, so aborts,
releases and stalled senders reach pynetdicom as before; the idle timer is kept running.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
from collections.abc import Callable

from pynetdicom.transport import AssociationSocket

P_DATA_TF = 0x04
PDU_HEADER = 6  # type, reserved, 4-byte length
# Message control header bits of a PDV (PS3.8 E.2): bit 0 command, bit 1 last fragment.
COMMAND_OR_LAST = 0x03
# The upper layer's state in which P-DATA flows both ways (PS3.8 9.2): "Sta6" in pynetdicom.
DATA_TRANSFER = "Sta6"
# How long the reader waits for the next PDU before it lets pynetdicom have the current one.
NEXT_PDU_WAIT_S = 0.02
# A PDU's buffer is allocated whole up to this size; a larger announced length (beyond any
# maximum PDU the node negotiates) is read as it arrives, so a forged header allocates nothing.
PREALLOCATE_LIMIT = 4 * 1024 * 1024

# Given a P-DATA-TF body: None to leave it to pynetdicom, or the function that takes it.
Divert = Callable[[memoryview], Callable[[], None] | None]


class PduReader:
    """A ``recv(nr_bytes)`` for an association's socket, as pynetdicom's DUL calls it.

    pynetdicom reads a PDU's 6-byte header, then its body; a reader that diverts a P-DATA has read
    that whole PDU already, so it hands the next undiverted PDU over in the same two calls.
    """

    def __init__(self, transport: AssociationSocket, divert: Divert | None = None) -> None:
        self.transport = transport
        self.divert = divert
        self._body: bytearray | None = None  # the body of a PDU whose header pynetdicom has

    def recv(self, nr_bytes: int) -> bytearray:
        """Exactly ``nr_bytes``, or what came before the peer closed (as pynetdicom's own)."""
        body, self._body = self._body, None
        if body is not None:
            return body  # pynetdicom asks for the length the header gave; short if the peer closed
        if nr_bytes != PDU_HEADER or self.divert is None:
            return self._read(nr_bytes)
        while True:
            header = self._read(PDU_HEADER)
            if len(header) < PDU_HEADER or header[0] != P_DATA_TF:
                return header
            (length,) = struct.unpack_from(">I", header, 2)
            body = self._read(length)
            take = self.divert(memoryview(body)) if len(body) == length else None
            if take is None or not self._may_divert():
                self._body = body
                return header
            take()
            self.transport.assoc.dul._idle_timer.restart()  # traffic too (pynetdicom restarts it per PDU)

    def _may_divert(self) -> bool:
        """Whether pynetdicom would do nothing but decode this PDU, and the next one is arriving."""
        dul = self.transport.assoc.dul
        return (
            dul.event_queue.empty()  # it acted on every PDU it read before: fragments stay in order
            and dul.to_provider_queue.empty()  # nothing of its own to send (an abort, a response)
            and dul.state_machine.current_state == DATA_TRANSFER
            and self._next_pdu_arriving()
        )

    def _read(self, nr_bytes: int) -> bytearray:
        sock = self.transport.socket
        assert sock is not None  # pynetdicom reads only from a connected socket
        if nr_bytes > PREALLOCATE_LIMIT:
            return self._read_as_it_arrives(sock, nr_bytes)
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        try:
            while received < nr_bytes:
                count = sock.recv_into(view[received:], nr_bytes - received)
                if not count:  # the peer closed: what arrived so far, as pynetdicom returns it
                    break
                received += count
        finally:
            view.release()
        if received < nr_bytes:
            del buffer[received:]
        return buffer

    @staticmethod
    def _read_as_it_arrives(sock: socket.socket, nr_bytes: int) -> bytearray:
        buffer = bytearray()
        while len(buffer) < nr_bytes:
            piece = sock.recv(min(nr_bytes - len(buffer), PREALLOCATE_LIMIT))
            if not piece:
                break
            buffer += piece
        return buffer

    def _next_pdu_arriving(self) -> bool:
        sock = self.transport.socket
        if sock is None:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted already: select sees only what is still on the socket
        try:
            readable, _, _ = select.select([sock], [], [], NEXT_PDU_WAIT_S)
        except (OSError, ValueError):  # closed by another thread (an abort)
            return False
        return bool(readable)


def install_reader(transport: AssociationSocket, divert: Divert | None = None) -> PduReader:
    """Make pynetdicom read ``transport``'s PDUs through a :class:`PduReader`."""
    reader = PduReader(transport, divert)
    # An instance attribute: pynetdicom's DUL calls ``self.socket.recv(nr_bytes)``.
    transport.recv = reader.recv  # type: ignore[method-assign]
    return reader


def data_fragments(body: memoryview, context_id: int) -> list[memoryview] | None:
    """The values of a P-DATA-TF body's PDV items when every one is a data set fragment of
    ``context_id`` that is not its message's last; None otherwise (or when malformed)."""
    fragments = []
    at, end = 0, len(body)
    while at < end:
        if at + 6 > end:
            return None
        (length,) = struct.unpack_from(">I", body, at)
        if length < 2 or at + 4 + length > end:
            return None
        if body[at + 4] != context_id or body[at + 5] & COMMAND_OR_LAST:
            return None
        fragments.append(body[at + 6 : at + 4 + length])
        at += 4 + length
    return fragments or None
