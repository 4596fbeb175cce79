"""The streaming multipart/related reader: the same parts whatever sizes the body arrives in, and
a body that breaks the format refused by name."""

from __future__ import annotations

import random

import pytest

from node.api.dicomweb.multipart import (
    MultipartError,
    MultipartReader,
    PartData,
    PartEnd,
    PartStart,
    parse_content_type,
)

BOUNDARY = "b0und4ry"


def _body(parts: list[bytes]) -> bytes:
    out = b"a preamble to ignore\r\n"
    for data in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\nan epilogue".encode()


def _read(body: bytes, sizes: random.Random | None) -> list[tuple[dict[str, str], bytes]]:
    reader, found, at = MultipartReader(BOUNDARY), [], 0
    while at < len(body):
        step = sizes.randint(1, 40) if sizes else len(body)
        for event in reader.feed(body[at : at + step]):
            if isinstance(event, PartStart):
                found.append((event.headers, b""))
            elif isinstance(event, PartData):
                found[-1] = (found[-1][0], found[-1][1] + event.data)
            else:
                assert isinstance(event, PartEnd)
        at += step
    reader.close()
    return found


@pytest.mark.parametrize("seed", [None, 1, 2, 3, 4])
def test_parts_come_out_whole_whatever_the_chunks(seed: int | None) -> None:
    parts = [
        b"DICM" + bytes(range(256)) * 3,
        b"",  # an empty part
        b"\r\n--b0und4r not the boundary \r\n--",  # near-misses inside the data
        f"--{BOUNDARY}".encode(),  # the boundary without its line break before it is data
    ]
    found = _read(_body(parts), random.Random(seed) if seed is not None else None)
    assert [data for _, data in found] == parts
    assert all(headers == {"content-type": "application/dicom"} for headers, _ in found)


@pytest.mark.parametrize("seed", [None, 5, 6, 7])
def test_transport_padding_after_a_boundary_is_skipped(seed: int | None) -> None:
    """RFC 2046 5.1.1: spaces and tabs may end a boundary line; receivers must accept them."""
    body = (
        f"--{BOUNDARY} \t \r\nContent-Type: application/dicom\r\n\r\nfirst\r\n"
        f"--{BOUNDARY}\t\r\nContent-Type: application/dicom\r\n\r\nsecond\r\n"
        f"--{BOUNDARY}--  \r\n"
    ).encode()
    found = _read(body, random.Random(seed) if seed is not None else None)
    assert [data for _, data in found] == [b"first", b"second"]
    with pytest.raises(MultipartError, match="not followed by a line break"):
        _read(f"--{BOUNDARY} x\r\n\r\n".encode(), None)


def test_a_broken_body_is_refused_by_name() -> None:
    with pytest.raises(MultipartError, match="before its closing boundary"):
        _read(_body([b"x"])[: -len("--\r\nan epilogue")], None)
    with pytest.raises(MultipartError, match="no colon"):
        _read(f"--{BOUNDARY}\r\nnot a header\r\n\r\nx\r\n--{BOUNDARY}--".encode(), None)
    with pytest.raises(MultipartError, match="longer than"):
        _read(f"--{BOUNDARY}\r\nX: {'y' * 20000}".encode(), None)
    with pytest.raises(MultipartError, match="boundary parameter"):
        MultipartReader("")


def test_content_type_parameters_are_read_as_rfc_2045_says() -> None:
    found = parse_content_type('Multipart/Related; type="application/dicom"; Boundary=abc')
    assert found.media_type == "multipart/related"
    assert found.params == {"type": "application/dicom", "boundary": "abc"}
