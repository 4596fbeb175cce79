"""The facts read from undecoded elements are the values pydicom's conversion gives, in both VR encodings."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from node.receive.listener import _ascii, _text, instance_facts

CASES = [
    ("StudyInstanceUID", "1.2.3"),  # odd length: padded with a null on the wire
    ("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2"),
    ("Modality", "CT"),
    ("Modality", "C"),  # padded with a space
    ("Modality", ""),
    ("ImageType", ["ORIGINAL", "PRIMARY", "AXIAL"]),
    ("ImageType", ["DERIVED", "SECONDARY", "LOCALIZER"]),
    ("BodyPartExamined", "ABDOMEN"),
    ("SliceThickness", "0.625"),
    ("SliceThickness", "5"),
]


def _encoded(keyword: str, value: object, implicit: bool) -> bytes:
    ds = Dataset()
    setattr(ds, keyword, value)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize(("keyword", "value"), CASES)
def test_undecoded_values_read_as_pydicom_converts_them(keyword: str, value: object, implicit: bool) -> None:
    raw = _encoded(keyword, value, implicit)
    assert _ascii(read_dataset(BytesIO(raw), implicit, True), keyword) == _text(
        read_dataset(BytesIO(raw), implicit, True), keyword
    )


def test_facts_of_a_ct_header() -> None:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2.3", "1.2.3.4", "1.2.3.4.5"
    ds.SOPClassUID, ds.Modality, ds.ImageType = (
        "1.2.840.10008.5.1.4.1.1.2",
        "CT",
        ["ORIGINAL", "PRIMARY", "AXIAL"],
    )
    ds.SpecificCharacterSet, ds.SeriesDescription = "ISO_IR 100", "Thorax für Bestrahlung"
    ds.BodyPartExamined, ds.SliceThickness = "CHEST", "1.25"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    ds.ImagePositionPatient = [-100, 42.5, 80]
    ds.ImagesInAcquisition = 300
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    facts = instance_facts(read_dataset(BytesIO(buffer.getvalue()), False, True), "1.2.840.10008.1.2.1")
    assert (facts.study_uid, facts.series_uid, facts.sop_instance_uid) == ("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert facts.image_type == "ORIGINAL\\PRIMARY\\AXIAL"
    assert facts.series_description == "Thorax für Bestrahlung"  # decoded with its character set
    assert (facts.modality, facts.body_part, facts.slice_thickness) == ("CT", "CHEST", 1.25)
    # Row (1, 0, 0) x column (0, 0, -1) = (0, 1, 0): the position along it is y.
    assert facts.orientation == "1.0000\\0.0000\\0.0000\\0.0000\\0.0000\\-1.0000"
    assert facts.slice_position == 42.5
    assert facts.images_in_acquisition == 300
    missing = instance_facts(Dataset(), "1.2.840.10008.1.2")
    assert (missing.study_uid, missing.slice_thickness, missing.image_type) == ("", None, "")
    assert (missing.orientation, missing.slice_position, missing.images_in_acquisition) == ("", None, None)


def test_values_sent_as_un_are_read_as_their_dictionary_vr() -> None:
    # Explicit VR with UN for a UID (some gateways and anonymisers write it): NUL-padded like a UI.
    value = b"1.2.3\x00"
    raw = b"\x20\x00\x0d\x00UN\x00\x00" + len(value).to_bytes(4, "little") + value
    assert _ascii(read_dataset(BytesIO(raw), False, True), "StudyInstanceUID") == "1.2.3"
