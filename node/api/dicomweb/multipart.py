"""multipart/related bodies (RFC 2387), read as they arrive: a STOW-RS request of hundreds of
megabytes goes part by part to spool files, never whole into memory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message

MAX_HEADER_BYTES = 16 * 1024
PADDING = b" \t"  # transport padding: the white space a boundary line may end with


class MultipartError(ValueError):
    """The body is not the multipart/related its Content-Type announced; the message says how."""


@dataclass
class ContentType:
    media_type: str
    params: dict[str, str] = field(default_factory=dict)


def parse_content_type(value: str) -> ContentType:
    """A Content-Type header's media type (lower case) and parameters (names lower case, quotes off)."""
    message = Message()
    message["content-type"] = value
    params = {k.lower(): v for k, v in message.get_params(failobj=[])[1:]}
    return ContentType(message.get_content_type(), params)


@dataclass(frozen=True)
class AcceptedPart:
    type: str | None  # lower case; None where the entry names none
    syntax: str | None


def accepted_parts(accept: str) -> list[AcceptedPart]:
    """The multipart/related (or */*) entries of an Accept header, in its order, each with the part
    type and transfer syntax it names; each route applies the standard's defaults for what it sends."""
    found = []
    for entry in accept.split(","):
        media = parse_content_type(entry.strip()) if entry.strip() else None
        if media is not None and media.media_type in ("multipart/related", "*/*"):
            part = media.params.get("type")
            found.append(AcceptedPart(part.lower() if part else None, media.params.get("transfer-syntax")))
    return found


@dataclass
class PartStart:
    headers: dict[str, str]  # names in lower case


@dataclass
class PartData:
    data: bytes


@dataclass
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd


class MultipartReader:
    """Feed the body's bytes as they come; each call yields what they complete."""

    def __init__(self, boundary: str) -> None:
        if not boundary or len(boundary) > 70:
            raise MultipartError("the boundary parameter is missing or longer than 70 characters")
        self._dash = b"--" + boundary.encode("latin-1")
        self._delimiter = b"\r\n" + self._dash
        self._buffer = bytearray()
        self._state = "preamble"
        self.parts = 0

    def feed(self, chunk: bytes) -> Iterator[Event]:
        self._buffer += chunk
        while True:
            if self._state == "preamble":
                at = self._buffer.find(self._dash)
                if at < 0:
                    self._keep_tail(len(self._dash))
                    return
                del self._buffer[: at + len(self._dash)]
                self._state = "after-boundary"
            elif self._state == "after-boundary":
                if len(self._buffer) < 2:
                    return
                if self._buffer[:2] == b"--":
                    self._state = "end"
                    return
                self._state = "boundary-line"
            elif self._state == "boundary-line":
                # Transport padding (RFC 2046 5.1.1) may follow a boundary; receivers must skip it.
                del self._buffer[: _padding(self._buffer)]
                if len(self._buffer) < 2:
                    return
                if self._buffer[:2] != b"\r\n":
                    raise MultipartError("a boundary is not followed by a line break")
                del self._buffer[:2]
                self._state = "headers"
            elif self._state == "headers":
                at = self._buffer.find(b"\r\n\r\n")
                if at < 0:
                    if len(self._buffer) > MAX_HEADER_BYTES:
                        raise MultipartError(f"a part's headers are longer than {MAX_HEADER_BYTES} bytes")
                    return
                headers = _headers(bytes(self._buffer[:at]))
                del self._buffer[: at + 4]
                self.parts += 1
                self._state = "data"
                yield PartStart(headers)
            elif self._state == "data":
                at = self._buffer.find(self._delimiter)
                if at < 0:
                    keep = len(self._delimiter) - 1
                    if len(self._buffer) > keep:
                        yield PartData(bytes(self._buffer[:-keep]))
                        del self._buffer[:-keep]
                    return
                if at:
                    yield PartData(bytes(self._buffer[:at]))
                del self._buffer[: at + len(self._delimiter)]
                self._state = "after-boundary"
                yield PartEnd()
            else:  # end: the epilogue is ignored
                self._buffer.clear()
                return

    def close(self) -> None:
        """The body ended; an error unless its closing boundary came."""
        if self._state != "end":
            raise MultipartError("the body ends before its closing boundary")

    def _keep_tail(self, length: int) -> None:
        if len(self._buffer) > length:
            del self._buffer[: len(self._buffer) - length]


def _padding(buffer: bytearray) -> int:
    """How many spaces and tabs the buffer starts with."""
    count = 0
    while count < len(buffer) and buffer[count] in PADDING:
        count += 1
    return count


def _headers(raw: bytes) -> dict[str, str]:
    found = {}
    for line in raw.decode("latin-1").split("\r\n"):
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise MultipartError(f"a part's header line has no colon: {line[:60]!r}")
        found[name.strip().lower()] = value.strip()
    return found
