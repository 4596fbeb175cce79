"""A seeded, bounded mutation fuzzer for the DICOM listener: what real senders send, recorded
through a proxy, then cut short, bit-flipped, given lying lengths, spliced and reordered."""

from __future__ import annotations

import random
import socket
import struct
import threading
from collections.abc import Callable, Iterator

PDU_HEADER = struct.Struct(">BBL")


def record(port: int, session: Callable[[int], None]) -> bytes:
    """The bytes ``session(proxy_port)`` sends to the listener at ``port``, through a proxy that
    passes both ways and keeps what the sender sent."""
    listener = socket.create_server(("127.0.0.1", 0))
    proxy_port = listener.getsockname()[1]
    sent = bytearray()

    def pump(source: socket.socket, target: socket.socket, keep: bytearray | None) -> None:
        try:
            while chunk := source.recv(65536):
                if keep is not None:
                    keep += chunk
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                target.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def serve() -> None:
        client, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", port))
        back = threading.Thread(target=pump, args=(upstream, client, None))
        back.start()
        pump(client, upstream, sent)
        back.join(10)
        client.close()
        upstream.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        session(proxy_port)
    finally:
        thread.join(30)
        listener.close()
    return bytes(sent)


def pdus(stream: bytes) -> list[bytes]:
    """A recorded stream cut into its PDUs (a short tail is kept as one piece)."""
    pieces, at = [], 0
    while at + PDU_HEADER.size <= len(stream):
        _, _, length = PDU_HEADER.unpack_from(stream, at)
        pieces.append(stream[at : at + PDU_HEADER.size + length])
        at += PDU_HEADER.size + length
    if at < len(stream):
        pieces.append(stream[at:])
    return pieces


def cases(streams: list[bytes], seed: int, count: int) -> Iterator[tuple[str, bytes]]:
    """``count`` mutated streams, the same for the same seed: (what was done, bytes)."""
    rng = random.Random(seed)
    split = [pdus(s) for s in streams]
    for _ in range(count):
        parts = list(rng.choice(split))
        kind = rng.choice(MUTATIONS)
        yield kind.__name__, kind(rng, parts)


def truncated(rng: random.Random, parts: list[bytes]) -> bytes:
    whole = b"".join(parts)
    return whole[: rng.randrange(len(whole) + 1)]


def bit_flips(rng: random.Random, parts: list[bytes]) -> bytes:
    data = bytearray(b"".join(parts))
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def lying_length(rng: random.Random, parts: list[bytes]) -> bytes:
    """One PDU's length field (or a length inside it) changed: shorter, longer, huge or zero."""
    index = rng.randrange(len(parts))
    pdu = bytearray(parts[index])
    if len(pdu) >= PDU_HEADER.size:
        at = 2 if rng.random() < 0.5 or len(pdu) < 12 else rng.randrange(6, len(pdu) - 4)
        (length,) = struct.unpack_from(">L", pdu, at)
        new = rng.choice([0, 1, max(length - 1, 0), length + 1, length * 2, 0xFFFFFFF0, rng.getrandbits(32)])
        struct.pack_into(">L", pdu, at, new & 0xFFFFFFFF)
    parts[index] = bytes(pdu)
    return b"".join(parts)


def reordered(rng: random.Random, parts: list[bytes]) -> bytes:
    """PDUs out of order, dropped or repeated: DIMSE messages in the wrong order."""
    chosen = [rng.choice(parts) for _ in range(rng.randint(1, len(parts) + 2))]
    return b"".join(chosen)


def garbage_after(rng: random.Random, parts: list[bytes]) -> bytes:
    """A valid beginning, then random bytes."""
    keep = parts[: rng.randint(1, len(parts))]
    return b"".join(keep) + rng.randbytes(rng.randint(1, 2048))


def random_bytes(rng: random.Random, parts: list[bytes]) -> bytes:
    return rng.randbytes(rng.randint(0, 4096))


MUTATIONS = [truncated, bit_flips, lying_length, reordered, garbage_after, random_bytes]


def deliver(port: int, data: bytes, timeout_s: float = 5.0) -> None:
    """Send ``data`` as a peer would, then stop sending and read until the listener closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as peer:
        try:
            peer.sendall(data)
            peer.shutdown(socket.SHUT_WR)
            while peer.recv(65536):
                pass
        except OSError:
            pass  # reset by the listener: an answer like any other
