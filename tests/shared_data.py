"""The real series in ../shared/data, read-only, and copies of them fit to send."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread

from tests import dicom_factory as factory

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ABDOMEN_J2K = SHARED_DATA / "ct-abdomen-j2k"
THORAX = SHARED_DATA / "ct-thorax-lung1-002"


def real_j2k_copy(folder: Path) -> list[Path]:
    """A copy of the JPEG 2000 series with its emptied UIDs restored.

    It was anonymised by emptying Study/Series/SOP Instance UIDs and the SOP Class UID in the data
    set (the file meta keeps the SOP ones); no PACS stores it as it is. Pixel data stay untouched.
    """
    paths = factory.copy_with_series_uids(sorted(ABDOMEN_J2K.iterdir()), folder)
    for path in paths:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        factory.modify(
            path, SOPClassUID=meta.MediaStorageSOPClassUID, SOPInstanceUID=meta.MediaStorageSOPInstanceUID
        )
    return paths
