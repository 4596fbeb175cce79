"""C-STORE responses packed directly, instead of through pydicom data sets (figures:
benchmarks/RESULTS.md, "responses").

pynetdicom builds every response as a pydicom data set, encodes it twice and wraps it in P-DATA, on
the path of every acknowledgement. A C-STORE-RSP is a fixed command set (PS3.7 9.3.1.2) in implicit
VR little endian: :func:`encode_store_response` packs it with ``struct``, byte for byte what
pynetdicom sends (tests/unit/test_store_response.py compares them). On a plain TCP connection in
data transfer the association's thread writes it to the socket itself (no other thread writes there
while a C-STORE is open); over TLS it goes through the DUL thread, the only one that may touch the
TLS connection. ``EVT_DIMSE_SENT`` is not raised for these responses: it only feeds pynetdicom's
debug logging, which the node turns off.
"""

from __future__ import annotations

import ssl
import struct
from collections.abc import Callable

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE, DimsePrimitiveType
from pynetdicom.pdu_primitives import P_DATA

from node.receive.fastpath.pdu_reads import DATA_TRANSFER, P_DATA_TF

C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101
# Message control header of a PDV: command information, last fragment (PS3.8 E.2).
LAST_COMMAND_FRAGMENT = b"\x03"
# A PDV item's own header: item length (4 bytes), presentation context ID (1 byte).
PDV_ITEM_HEADER = 6


def _element(element: int, value: bytes) -> bytes:
    """A group 0000 element in implicit VR little endian: tag, 4-byte length, value."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


# pydicom writes command set strings as ISO 8859-1 (its default character set); so do we, so that even
# a UID a peer sent with stray non-ASCII bytes comes back as it went.
def _uid(value: object) -> bytes:
    raw = str(value).encode("latin-1")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: object) -> bytes:
    raw = str(value).encode("latin-1")
    return raw + b" " if len(raw) % 2 else raw


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def encode_store_response(response: C_STORE) -> bytes:
    """The command set of a C-STORE-RSP with a Status and no Offending Element, for the wire."""
    elements = [
        _element(0x0002, _uid(response.AffectedSOPClassUID)),
        _element(0x0100, _us(C_STORE_RSP)),
        _element(0x0120, _us(int(response.MessageIDBeingRespondedTo or 0))),
        _element(0x0800, _us(NO_DATA_SET)),
        _element(0x0900, _us(int(response.Status or 0))),
    ]
    if response.ErrorComment is not None:
        elements.append(_element(0x0902, _text(response.ErrorComment)))
    elements.append(_element(0x1000, _uid(response.AffectedSOPInstanceUID)))
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def p_data_tf(context_id: int, pdv_value: bytes) -> bytes:
    """A P-DATA-TF PDU of one PDV item (PS3.8 9.3.5): ``pdv_value`` starts with its control header."""
    item = struct.pack(">IB", len(pdv_value) + 1, context_id) + pdv_value
    return struct.pack(">BBI", P_DATA_TF, 0, len(item)) + item


def _packs(response: C_STORE) -> bool:
    """Whether ``response`` is a C-STORE response this module encodes (all the node sends)."""
    return (
        response.MessageIDBeingRespondedTo is not None
        and response.Status is not None
        and response.OffendingElement is None
    )


def pack_store_responses(event: evt.Event) -> None:
    """Make the association's DIMSE provider pack its C-STORE responses (bind to EVT_CONN_OPEN)."""
    dimse = event.assoc.dimse
    # An instance attribute: pynetdicom's service classes call ``self.dimse.send_msg``.
    dimse.send_msg = _sender(dimse, dimse.send_msg)  # type: ignore[method-assign,assignment]


Sender = Callable[[DimsePrimitiveType, int], None]


def _sender(dimse: DIMSEServiceProvider, send_msg: Sender) -> Sender:
    def send(primitive: DimsePrimitiveType, context_id: int) -> None:
        if not isinstance(primitive, C_STORE) or not _packs(primitive):
            send_msg(primitive, context_id)
            return
        try:
            encoded = LAST_COMMAND_FRAGMENT + encode_store_response(primitive)
        except (UnicodeEncodeError, struct.error):  # beyond latin-1 or 64 KiB: pynetdicom's way decides
            send_msg(primitive, context_id)
            return
        limit = dimse.maximum_pdu_size
        if limit and len(encoded) + PDV_ITEM_HEADER > limit:  # the peer wants it fragmented
            send_msg(primitive, context_id)
            return
        transport = dimse.dul.socket
        sock = transport.socket if transport is not None else None
        if (
            transport is not None
            and sock is not None
            and not isinstance(sock, ssl.SSLSocket)
            and dimse.dul.state_machine.current_state == DATA_TRANSFER
        ):
            transport.send(p_data_tf(context_id, encoded))  # failures reach the DUL as Evt17
            return
        pdata = P_DATA()
        # pynetdicom checks for a list at run time; its annotation says tuple
        pdata.presentation_data_value_list = [[context_id, encoded]]  # type: ignore[list-item]
        dimse.dul.send_pdu(pdata)

    return send
