"""A PDU is read whole from a real socket however the network splits it, or cut where the peer closed."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace
from typing import cast

from pynetdicom.transport import AssociationSocket

from node.pdu_reads import whole_pdu_reader


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


def test_a_pdu_arriving_in_small_pieces_is_read_whole() -> None:
    ours, theirs = socket.socketpair()
    data = bytes(range(256)) * 512  # 128 KiB
    sender = _send_in_pieces(theirs, data + b"next", piece=1000, close=False)
    recv = whole_pdu_reader(cast(AssociationSocket, SimpleNamespace(socket=ours)))
    assert recv(len(data)) == data
    assert recv(4) == b"next"  # nothing beyond the requested bytes was taken
    sender.join()
    ours.close()
    theirs.close()


def test_a_peer_closing_mid_pdu_gives_what_arrived() -> None:
    ours, theirs = socket.socketpair()
    sender = _send_in_pieces(theirs, b"x" * 5000, piece=700, close=True)
    recv = whole_pdu_reader(cast(AssociationSocket, SimpleNamespace(socket=ours)))
    received = recv(10_000)
    sender.join()
    ours.close()
    assert received == b"x" * 5000  # pynetdicom sees the short read and closes the association
