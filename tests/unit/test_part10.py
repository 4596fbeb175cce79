"""The SCP's own PS3.10 handling: the file meta it writes and the header it reads."""

from __future__ import annotations

import mmap
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, cast

import pydicom
import pytest
from pydicom import Dataset
from pydicom.filereader import read_preamble
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from node.core.uids import is_valid_uid
from node.receive.part10 import (
    IMPLEMENTATION_CLASS_UID,
    InflatesTooFarError,
    TruncatedDataSetError,
    file_preamble,
    read_header,
)
from tests import dicom_factory as factory

CT = "1.2.840.10008.5.1.4.1.1.2"


def _data_set_bytes(path: Path) -> tuple[bytes, UID]:
    """What a C-STORE carries: the file without preamble and meta, and its transfer syntax."""
    raw = path.read_bytes()
    stream = BytesIO(raw)
    read_preamble(stream, False)
    syntax = UID(pydicom.filereader._read_file_meta_info(stream).TransferSyntaxUID)
    return raw[stream.tell() :], syntax


@pytest.mark.parametrize("ae", ["", "CT01"])
@pytest.mark.parametrize("instance", ["1.2.3.4", "1.2.3.45"])  # even and odd lengths: padding
def test_file_preamble_matches_pydicom_and_reads_back(ae: str, instance: str) -> None:
    preamble = file_preamble(CT, instance, str(ExplicitVRLittleEndian), ae)
    assert preamble[:132] == b"\x00" * 128 + b"DICM"
    meta = pydicom.dcmread(BytesIO(preamble)).file_meta
    assert meta.MediaStorageSOPClassUID == CT
    assert meta.MediaStorageSOPInstanceUID == instance
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert str(meta.ImplementationVersionName).startswith("SEGNODE")
    assert meta.get("SourceApplicationEntityTitle", "") == ae
    assert meta.FileMetaInformationGroupLength == len(preamble) - 132 - 12
    # The same elements, bar the implementation and source AE, as pydicom would encode them.
    reference = create_file_meta(
        sop_class_uid=UID(CT), sop_instance_uid=UID(instance), transfer_syntax=ExplicitVRLittleEndian
    )
    ours = {e.tag: e.value for e in meta if e.tag.element not in (0x0000, 0x0012, 0x0013, 0x0016)}
    theirs = {e.tag: e.value for e in reference if e.tag.element not in (0x0000, 0x0012, 0x0013)}
    assert ours == theirs
    assert len(encode_file_meta(reference)) % 2 == 0 and len(preamble) % 2 == 0
    assert is_valid_uid(IMPLEMENTATION_CLASS_UID)


def _ct_slice(tmp_path: Path, syntax: str, size: int) -> Path:
    """One CT slice of ``size`` x ``size`` in ``syntax``."""
    (path,) = factory.make_ct_series(tmp_path / "ct", n_slices=1, rows=size, cols=size)
    if syntax != ExplicitVRLittleEndian:
        (path,) = factory.transcode([path], syntax)
    return path


@contextmanager
def _spooled(tmp_path: Path, data_set: bytes) -> Iterator[BinaryIO]:
    """``data_set`` as the handler reads a spooled instance: mapped, after 300 bytes of preamble."""
    spooled = tmp_path / "spooled.part"
    spooled.write_bytes(b"p" * 300 + data_set)
    with spooled.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        yield cast(BinaryIO, mapped)


@pytest.mark.parametrize(
    "syntax",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEG2000Lossless,
    ],
)
def test_read_header_in_every_byte_order_and_encapsulation(tmp_path: Path, syntax: str) -> None:
    path = _ct_slice(tmp_path, syntax, 32)
    body, read_syntax = _data_set_bytes(path)
    assert read_syntax == syntax
    header, has_pixels = read_header(BytesIO(body), read_syntax)
    original = pydicom.dcmread(path)
    assert has_pixels
    assert "PixelData" not in header
    assert header.SOPInstanceUID == original.SOPInstanceUID
    assert header.SeriesInstanceUID == original.SeriesInstanceUID
    assert header.Modality == "CT"


def test_a_deflated_data_set_that_inflates_too_far_is_refused_without_inflating_it(tmp_path: Path) -> None:
    """A megabyte and a half that announces 300 MiB of pixel data: refused at the limit, so no
    sender can make the node hold gigabytes in memory."""
    header = Dataset()
    header.SOPClassUID, header.SOPInstanceUID, header.Modality = CTImageStorage, "1.2.3.4", "CT"
    raw = BytesIO()
    header.save_as(raw, implicit_vr=False, little_endian=True)
    size = 300 * 1024**2
    deflater = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflater.compress(raw.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, size))
    zeros = bytes(1024**2)
    body += b"".join(deflater.compress(zeros) for _ in range(size // len(zeros))) + deflater.flush()
    assert len(body) < 1_500_000
    with pytest.raises(InflatesTooFarError, match="inflates past 256 MiB"):
        read_header(BytesIO(body), UID(DeflatedExplicitVRLittleEndian))
    small, syntax = _data_set_bytes(_ct_slice(tmp_path, DeflatedExplicitVRLittleEndian, 32))
    assert read_header(BytesIO(small), syntax)[1]  # under the limit, as before
    with pytest.raises(InflatesTooFarError):
        read_header(BytesIO(small), syntax, max_inflated=1024)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_native_pixel_data_shorter_than_its_image_is_truncated(tmp_path: Path, syntax: str) -> None:
    """Whole as an element, short of the image its Rows and Columns describe: refused when it
    comes, not a job that fails later on a series its sender was told was stored."""
    path = _ct_slice(tmp_path, syntax, 32)
    ds = pydicom.dcmread(path)
    ds.Rows = 40  # 40 x 32 pixels of 16 bits call for 2,560 bytes; 2,048 are there
    ds.save_as(path)
    body, read_syntax = _data_set_bytes(path)
    with pytest.raises(TruncatedDataSetError, match="the pixel data holds 2048 bytes, its image 2560"):
        read_header(BytesIO(body), read_syntax)
    ds.Rows = 16  # more pixel data than the image needs is read as before
    ds.save_as(path)
    assert read_header(BytesIO(_data_set_bytes(path)[0]), read_syntax)[1]
    # 32 x 32 colour pixels of 8 bits subsampled as YBR_FULL_422 take two bytes each: 2,048 bytes.
    ds.Rows, ds.SamplesPerPixel, ds.PhotometricInterpretation = 32, 3, "YBR_FULL_422"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PlanarConfiguration = 0
    ds.save_as(path)
    assert read_header(BytesIO(_data_set_bytes(path)[0]), read_syntax)[1]


def test_objects_without_pixel_data_have_none(tmp_path: Path) -> None:
    body, syntax = _data_set_bytes(factory.make_basic_sr(tmp_path / "sr"))
    header, has_pixels = read_header(BytesIO(body), syntax)
    assert not has_pixels
    assert header.Modality == "SR"


def test_a_ct_image_stripped_of_pixel_data_has_none(tmp_path: Path) -> None:
    (path,) = factory.make_ct_series(tmp_path / "ct", n_slices=1, rows=32, cols=32)
    body, syntax = _data_set_bytes(factory.strip_pixel_data(path))
    assert read_header(BytesIO(body), syntax)[1] is False


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless])
@pytest.mark.parametrize("keep", [0.999, 0.5, 0.05])
def test_a_data_set_cut_short_is_truncated(tmp_path: Path, syntax: str, keep: float) -> None:
    path = _ct_slice(tmp_path, syntax, 64)
    body, read_syntax = _data_set_bytes(path)
    with pytest.raises(TruncatedDataSetError):
        read_header(BytesIO(body[: int(len(body) * keep)]), read_syntax)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEG2000Lossless, DeflatedExplicitVRLittleEndian])
@pytest.mark.parametrize("keep", [1.0, 0.999, 0.5])
def test_a_received_file_is_read_after_its_preamble(tmp_path: Path, syntax: str, keep: float) -> None:
    # How the handler reads a spooled instance: the file on disk, the data set after 300 bytes.
    path = _ct_slice(tmp_path, syntax, 64)
    body, read_syntax = _data_set_bytes(path)
    with _spooled(tmp_path, body[: int(len(body) * keep)]) as source:
        if keep == 1.0:
            header, has_pixels = read_header(source, read_syntax, start=300)
            assert has_pixels and header.SOPInstanceUID == pydicom.dcmread(path).SOPInstanceUID
        elif syntax == DeflatedExplicitVRLittleEndian:
            with pytest.raises((TruncatedDataSetError, zlib.error)):  # the stream itself is cut
                read_header(source, read_syntax, start=300)
        else:
            with pytest.raises(TruncatedDataSetError):
                read_header(source, read_syntax, start=300)


def test_a_mapped_sr_cut_inside_a_value_is_truncated(tmp_path: Path) -> None:
    body, syntax = _data_set_bytes(factory.make_basic_sr(tmp_path / "sr"))
    with _spooled(tmp_path, body[: len(body) - 3]) as source, pytest.raises(TruncatedDataSetError):
        read_header(source, syntax, start=300)


def test_a_header_cut_inside_a_value_is_truncated(tmp_path: Path) -> None:
    body, syntax = _data_set_bytes(factory.make_basic_sr(tmp_path / "sr"))
    with pytest.raises(TruncatedDataSetError):
        read_header(BytesIO(body[: len(body) - 3]), syntax)


def test_a_stray_tag_inside_encapsulated_pixel_data_is_refused(tmp_path: Path) -> None:
    (path,) = factory.make_ct_series(tmp_path / "ct", n_slices=1, rows=32, cols=32)
    (path,) = factory.transcode([path], JPEG2000Lossless)
    body, syntax = _data_set_bytes(path)
    item = b"\xfe\xff\x00\xe0"  # the first fragment item (the basic offset table) after Pixel Data
    at = body.index(b"\xe0\x7f\x10\x00") + 12
    assert body[at : at + 4] == item
    broken = body[:at] + b"\x08\x00\x18\x00" + body[at + 4 :]
    with pytest.raises(ValueError, match="inside encapsulated pixel data"):
        read_header(BytesIO(broken), syntax)
