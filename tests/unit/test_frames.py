"""WADO-RS frames: what a viewer's Accept asks for, how each stored syntax answers it, and the
bytes of a frame (encoded as stored, decoded, native, and one-bit frames that share bytes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi import HTTPException
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.pixels import pack_bits
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from node.api.dicomweb.frames import (
    Accepted,
    Answer,
    accepted_frame_types,
    answer_for,
    frame_bytes,
    frame_numbers,
)
from tests import dicom_factory as factory

J2K = str(JPEG2000Lossless)
LE = str(ExplicitVRLittleEndian)
CORNERSTONE = "multipart/related; type=application/octet-stream; transfer-syntax=*"


def test_accept_headers_of_viewers_and_the_standards_defaults() -> None:
    assert accepted_frame_types(CORNERSTONE) == [Accepted("application/octet-stream", "*")]
    assert accepted_frame_types("") == [Accepted("application/octet-stream", LE)]
    assert accepted_frame_types('multipart/related; type="image/jp2", application/json') == [
        Accepted("image/jp2", "*")
    ]
    assert accepted_frame_types("multipart/related") == [Accepted("application/octet-stream", LE)]


def test_each_stored_syntax_goes_as_stored_or_decoded_or_not_at_all() -> None:
    any_octets = [Accepted("application/octet-stream", "*")]
    assert answer_for(J2K, any_octets) == Answer("image/jp2", J2K, decode=False)
    assert answer_for(LE, any_octets) == Answer("application/octet-stream", LE, decode=False)
    default = accepted_frame_types("")
    assert answer_for(J2K, default) == Answer("application/octet-stream", LE, decode=True)
    assert answer_for("1.2.840.10008.1.2", default) == Answer("application/octet-stream", LE, decode=False)
    deflated = "1.2.840.10008.1.2.1.99"  # the data set deflated, its frames' bytes plain
    assert answer_for(deflated, any_octets) == Answer("application/octet-stream", LE, decode=False)
    assert answer_for(J2K, [Accepted("image/jpeg", "*")]) is None  # another codec: 406
    assert answer_for("1.2.840.10008.1.2.2", default) is None  # big endian: the node does not swap


def test_frame_lists_are_checked_against_the_instance() -> None:
    assert frame_numbers("3,1", 3) == [3, 1]
    with pytest.raises(HTTPException) as beyond:
        frame_numbers("1,4", 3)
    assert beyond.value.status_code == 404 and "frame 4" in beyond.value.detail
    with pytest.raises(HTTPException) as garbled:
        frame_numbers("1;2", 3)
    assert garbled.value.status_code == 400


def test_a_compressed_frame_goes_as_stored_or_decoded(tmp_path: Path) -> None:
    (native,) = factory.make_ct_series(tmp_path / "ct", n_slices=1)
    (compressed,) = factory.transcode([native], J2K, tmp_path / "j2k")
    ds = pydicom.dcmread(compressed)
    (encoded,) = generate_frames(ds.PixelData, number_of_frames=1)
    assert frame_bytes(ds, 1, Answer("image/jp2", J2K, decode=False)) == encoded
    decoded = frame_bytes(ds, 1, Answer("application/octet-stream", LE, decode=True))
    assert decoded == pydicom.dcmread(native).PixelData  # lossless: the native bytes again


def test_native_frames_of_a_multiframe_instance(tmp_path: Path) -> None:
    ds = pydicom.dcmread(factory.make_enhanced_ct(tmp_path, n_frames=3))
    size = ds.Rows * ds.Columns * 2
    second = frame_bytes(ds, 2, Answer("application/octet-stream", LE, decode=False))
    assert second == ds.PixelData[size : 2 * size]
    assert np.array_equal(np.frombuffer(second, "<i2").reshape(ds.Rows, ds.Columns), ds.pixel_array[1])


def test_one_bit_frames_start_on_a_byte_of_their_own() -> None:
    """A binary SEG packs its frames bit after bit: 3 x 5 pixels a frame is no whole byte."""
    frames = np.random.default_rng(1).integers(0, 2, size=(3, 3, 5), dtype=np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = 3, 5, 3, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.PixelData = pack_bits(frames)
    for number in (1, 2, 3):
        got = frame_bytes(ds, number, Answer("application/octet-stream", LE, decode=False))
        assert got == pack_bits(frames[number - 1])
