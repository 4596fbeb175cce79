"""The DICOM file format (PS3.10) around a received data set, cheaply enough for every C-STORE.

The node keeps an instance as received: preamble, File Meta Information, then the data set's bytes
untouched. pynetdicom's ``Event.dataset`` decodes every element, Pixel Data included, and its file
meta tools build a pydicom data set, both on the path of every acknowledgement: :func:`read_header`
stops before the pixel data and only checks that its bytes all arrived, and :func:`file_preamble`
packs group 0002 directly (figures: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import io
import struct
import zlib
from importlib.metadata import PackageNotFoundError, version
from io import BytesIO
from operator import index
from typing import BinaryIO, cast

from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from node.core.uids import derive_uid

# Identifies segnode as the writer of the files it keeps (PS3.7 D.3.3.2); stable across releases.
IMPLEMENTATION_CLASS_UID = derive_uid("segnode", "implementation class")


def _implementation_version() -> str:
    try:
        return f"SEGNODE_{version('segnode')}"[:16]
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "SEGNODE"


IMPLEMENTATION_VERSION_NAME = _implementation_version()

# Float Pixel Data, Double Float Pixel Data and Pixel Data: the first tag at which reading stops.
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)


def _value(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", errors="replace")  # UIDs and AE titles are ASCII; never fail here
    return raw + pad if len(raw) % 2 else raw


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    """An explicit VR little endian element of group 0002 with a 2-byte length."""
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_preamble(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae_title: str = ""
) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (PS3.10 7.1) for one received data set.

    The meta is always explicit VR little endian, whatever the data set's transfer syntax.
    ``source_ae_title`` (the calling AE) is recorded as Source Application Entity Title.
    """
    elements = [
        struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
        _short(0x0002, b"UI", _value(sop_class_uid, b"\x00")),
        _short(0x0003, b"UI", _value(sop_instance_uid, b"\x00")),
        _short(0x0010, b"UI", _value(transfer_syntax_uid, b"\x00")),
        _short(0x0012, b"UI", _value(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _short(0x0013, b"SH", _value(IMPLEMENTATION_VERSION_NAME, b" ")),
    ]
    title = source_ae_title.strip()
    if title:
        elements.append(_short(0x0016, b"AE", _value(title[:16], b" ")))
    body = b"".join(elements)
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


class TruncatedDataSetError(EOFError):
    """The data set ends before the length one of its elements announced."""


# A deflated data set is inflated in memory to be checked: a few kilobytes of zeros can announce
# gigabytes, so beyond this it is refused for good (an Enhanced CT of 300 frames is about 160 MiB).
MAX_INFLATED_BYTES = 256 * 1024**2


class InflatesTooFarError(ValueError):
    """A deflated data set that inflates beyond what the node takes."""


_ITEM, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF  # the length of a value that ends at its delimiter


def read_header(
    source: BinaryIO | BytesIO, transfer_syntax: UID, start: int = 0, max_inflated: int = MAX_INFLATED_BYTES
) -> tuple[Dataset, bool]:
    """The elements of the data set in ``source`` from ``start`` to its end, before its pixel
    data, and whether pixel data is present.

    ``source`` is a seekable stream: the data set in memory, or a received file mapped into
    memory (the data set after its preamble and File Meta Information). Every element's length is
    checked against the bytes received, without reading or decoding the pixel data: a data set cut
    short raises :class:`TruncatedDataSetError` (a broken element: pydicom's own error), one that
    inflates beyond ``max_inflated`` bytes :class:`InflatesTooFarError`.
    """
    if transfer_syntax.is_deflated:
        source, start = _inflated(source, start, max_inflated), 0
    source.seek(0, io.SEEK_END)
    size = source.tell()
    implicit, little = transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
    source.seek(start)
    head = read_dataset(cast(BinaryIO, source), implicit, little, stop_when=_at_pixels)
    pixels_at = source.tell()
    if pixels_at + 4 <= size and (tag := _tag(source, pixels_at, little)) in _PIXEL_TAGS:
        end, length = _skip_pixel_element(source, size, pixels_at, implicit, little)
        image = _image_bytes(head)
        if tag == _PIXEL_TAGS[-1] and length is not None and image is not None and length < image:
            raise TruncatedDataSetError(f"the pixel data holds {length} bytes, its image {image}")
        source.seek(end)
        _skim(source, size, implicit, little)
        return head, True
    # No pixel data: pydicom returns a short value where the bytes run out, so a data set cut
    # short in its header would pass unnoticed; walk it again, checking every length.
    source.seek(start)
    _skim(source, size, implicit, little)
    return head, False


def _inflated(source: BinaryIO | BytesIO, start: int, limit: int) -> BytesIO:
    """The deflated data set from ``start``, inflated a chunk at a time up to ``limit`` bytes."""
    source.seek(start)
    inflater, out = zlib.decompressobj(-zlib.MAX_WBITS), BytesIO()

    def past_limit() -> bool:
        return out.tell() > limit or bool(inflater.unconsumed_tail)

    while chunk := source.read(1 << 20):
        out.write(inflater.decompress(chunk, limit + 1 - out.tell()))
        if past_limit():
            break
    else:
        out.write(inflater.flush())
    if past_limit():
        raise InflatesTooFarError(f"deflated data set inflates past {limit // 1024**2} MiB")
    if not inflater.eof:
        raise TruncatedDataSetError("the deflated data set ends inside its compressed stream")
    return out


def _at_pixels(tag: int, _vr: str | None, _length: int) -> bool:
    # index(): pydicom's tag type compares through Python methods, ten times slower than an int.
    return index(tag) >= _PIXEL_TAGS[0]


def _skim(stream: BinaryIO | BytesIO, size: int, implicit: bool, little: bool) -> None:
    """Walk the elements from the stream's position to its end, skipping every value.

    pydicom seeks past a skipped value, so a value longer than what is left leaves the position
    beyond the end; and it ends quietly on a partial element header, so the last element must
    end where the bytes do.
    """
    last = [stream.tell(), 0]  # where the last element's value starts, and its length

    def note(_tag: int, _vr: str | None, length: int) -> bool:
        last[:] = [stream.tell(), length]
        return False

    try:
        read_dataset(cast(BinaryIO, stream), implicit, little, defer_size=0, stop_when=note)
    except ValueError as err:  # a mapped file refuses to seek past its end, where a stream goes
        if "seek out of range" not in str(err):
            raise
        raise TruncatedDataSetError("the data set is shorter than its elements announce") from err
    end = stream.tell()
    if end > size:
        raise TruncatedDataSetError(f"the data set is {end - size} bytes shorter than its elements announce")
    start, length = last
    if length != _UNDEFINED and start + length != size:
        raise TruncatedDataSetError(
            f"the data set ends inside an element header ({size - start - length} bytes)"
        )


def _unpack(source: BinaryIO | BytesIO, at: int, layout: str) -> tuple[int, ...]:
    source.seek(at)
    raw = source.read(struct.calcsize(layout))
    if len(raw) < struct.calcsize(layout):
        raise TruncatedDataSetError("the data set ends inside an element header")
    return struct.unpack(layout, raw)


def _tag(source: BinaryIO | BytesIO, at: int, little: bool) -> int:
    group, element = _unpack(source, at, "<HH" if little else ">HH")
    return group << 16 | element


def _image_bytes(head: Dataset) -> int | None:
    """How many bytes of native Pixel Data the image attributes call for (pydicom's reckoning:
    packed bits, YBR_FULL_422, frames); None where they do not say or cannot be read."""
    try:
        return int(get_expected_length(head, unit="bytes"))
    except Exception:  # noqa: BLE001 - absent or unreadable attributes: the length is not checked
        return None


def _skip_pixel_element(
    source: BinaryIO | BytesIO, size: int, at: int, implicit: bool, little: bool
) -> tuple[int, int | None]:
    """The position after the pixel data element at ``at``, and its length when it is native
    (None when encapsulated, PS3.5 A.4)."""
    order = "<" if little else ">"
    if implicit:
        (length,) = _unpack(source, at + 4, order + "I")
        position = at + 8
    else:  # OB, OW, OF or OD: the long form, with two reserved bytes
        (length,) = _unpack(source, at + 8, order + "I")
        position = at + 12
    if length != _UNDEFINED:
        if position + length > size:
            raise TruncatedDataSetError(
                f"the pixel data is {position + length - size} bytes shorter than announced"
            )
        return position + length, length
    while position + 8 <= size:  # items of fragments up to the sequence delimiter
        tag = _tag(source, position, little)
        (length,) = _unpack(source, position + 4, order + "I")
        position += 8
        if tag == _SEQUENCE_DELIMITER:
            return position, None
        if tag != _ITEM:
            raise ValueError(f"tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) inside encapsulated pixel data")
        position += length
    raise TruncatedDataSetError("the encapsulated pixel data ends before its sequence delimiter")
