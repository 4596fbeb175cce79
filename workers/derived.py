"""What every object the node derives from a series shares (SEG, RTSTRUCT, SR, overlay images):
UIDs that are a function of the series and the algorithm, a content date taken from the source, the
source's de-identification, the software that made it, and a durable write. Derived so, a retry
writes the same bytes and a corrected result of a grown series replaces the earlier one under the
same UIDs.
"""

from __future__ import annotations

import copy
import datetime
import os
import tempfile
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, TM

from node.core.files import fsync_dir
from node.core.uids import derive_uid
from segmenters.base import AlgorithmInfo, Structure
from segmenters.ct_series import SeriesVolume
from workers.errors import ProcessingFailedError

# De-identification Method (LO) for a de-identified source that does not say how (as some public
# collections do): a derived object must give a method when Patient Identity Removed is YES.
UNRECORDED_DEIDENTIFICATION = "Source images de-identified; method not recorded"


def derived_uid(series: SeriesVolume, algorithm: AlgorithmInfo, what: str) -> str:
    """A UID for ``what`` (e.g. "seg-series", "rtstruct-instance") of ``series`` by ``algorithm``.

    The instances are left out on purpose: a series that grew gets a corrected object under the
    same UIDs. The algorithm name and version are in, so a new model never overwrites an old result.
    """
    return derive_uid(series.series_instance_uid, algorithm.name, algorithm.version, what)


# Per source instance, the first date (and time) present, content first: when its pixels were made.
_DATE_TIME_KEYWORDS = (
    ("ContentDate", "ContentTime"),
    ("AcquisitionDate", "AcquisitionTime"),
    ("SeriesDate", "SeriesTime"),
    ("StudyDate", "StudyTime"),
)
_NO_DATE = datetime.datetime(1900, 1, 1)  # a series with no date at all (some de-identified ones)


def content_date_time(datasets: Sequence[Dataset]) -> tuple[datetime.date, datetime.time]:
    """Content Date and Time of a derived object: the latest content date-time of the source
    instances. Not the time of writing, so that a retry writes the same bytes; the object's content
    is a function of the source images alone, and cannot predate the newest of them.
    """
    latest: datetime.datetime | None = None
    for ds in datasets:
        for date_keyword, time_keyword in _DATE_TIME_KEYWORDS:
            moment = _moment(ds.get(date_keyword), ds.get(time_keyword))
            if moment is not None:
                latest = moment if latest is None else max(latest, moment)
                break
    moment = latest or _NO_DATE
    return moment.date(), moment.time()


def _moment(date: object, time: object) -> datetime.datetime | None:
    """``date`` (DA) and ``time`` (TM, midnight when absent) as one naive date-time; None without a
    valid date. A malformed time counts as absent: the date alone still says when."""
    try:
        day = DA(str(date).strip()) if date else None
    except ValueError:
        return None
    if day is None:
        return None
    try:
        clock = TM(str(time).strip()) if time else None
    except ValueError:
        clock = None
    return datetime.datetime.combine(day, clock.replace(tzinfo=None) if clock else datetime.time())


# Dates and times the outputs copy from the CT (Patient and General Study modules), all Type 2.
COPIED_MOMENTS = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM, "PatientBirthTime": TM}


def blank_invalid_moments(datasets: Sequence[Dataset]) -> list[str]:
    """Empty the copied dates and times a CT wrote against the standard (1961-07-04 for 19610704):
    the writers would refuse them and fail the job. Returns the names emptied, never their values
    (a birth date identifies a patient)."""
    emptied: set[str] = set()
    for ds in datasets:
        for keyword, kind in COPIED_MOMENTS.items():
            value = ds.get(keyword)
            if value in (None, ""):
                continue
            try:
                kind(str(value))
            except ValueError:
                setattr(ds, keyword, "")
                emptied.add(keyword)
    return sorted(emptied)


def copy_deidentification(derived: Dataset, source: Dataset) -> None:
    """An object derived from a de-identified series says so, and how, as its source does.

    Patient Identity Removed YES requires a De-identification Method or its code sequence (type 1C);
    a source that gives neither gets :data:`UNRECORDED_DEIDENTIFICATION` rather than an object that
    fails validation or drops the flag.
    """
    if str(source.get("PatientIdentityRemoved", "")).strip().upper() != "YES":
        return
    derived.PatientIdentityRemoved = "YES"
    method = source.get("DeidentificationMethod")
    codes = source.get("DeidentificationMethodCodeSequence")
    if method:
        derived.DeidentificationMethod = copy.deepcopy(method)
    if codes:
        derived.DeidentificationMethodCodeSequence = copy.deepcopy(codes)
    if not method and not codes:
        derived.DeidentificationMethod = UNRECORDED_DEIDENTIFICATION


def software_version() -> str:
    """What made the object, for its Software Versions."""
    try:
        return f"segnode {version('segnode')}"
    except PackageNotFoundError:  # running from a source checkout
        return "segnode (source)"


def write_dataset(ds: Dataset, path: Path) -> None:
    """Write ``ds`` to ``path`` durably: a temp file beside it, fsync, atomic rename, fsync the folder.

    A crash leaves either the old file or the complete new one, never a partial object.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def check_label_map(
    series: SeriesVolume, label_map: np.ndarray, algorithm: AlgorithmInfo, structures: Sequence[Structure]
) -> None:
    """Raise :class:`ProcessingFailedError` for a label map that does not fit the series or a set of
    structures that cannot name its labels: the segmenter's fault, not the series'."""
    who = f"{algorithm.name} {algorithm.version}"
    if label_map.shape != series.volume.hu.shape:
        raise ProcessingFailedError(
            f"segmenter {who} returned a label map of shape {label_map.shape} for a volume of shape "
            f"{series.volume.hu.shape}"
        )
    if label_map.dtype.kind not in "iu":
        raise ProcessingFailedError(
            f"segmenter {who} returned a label map of type {label_map.dtype}; an integer type "
            "(uint8) is required"
        )
    labels = [s.label for s in structures]
    if len(set(labels)) != len(labels) or any(lab <= 0 for lab in labels):
        raise ProcessingFailedError(
            f"segmenter {who} declares structure labels {labels}; they must be distinct and positive"
        )


def label_counts(
    series: SeriesVolume,
    label_map: np.ndarray,
    algorithm: AlgorithmInfo,
    structures: Sequence[Structure],
    *,
    hu_sums: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Voxels per label value (index 0: background) and, with ``hu_sums``, the sum of their CT
    numbers, after :func:`check_label_map`; raises :class:`ProcessingFailedError` for a negative
    label or one that names no structure. Slice by slice: a whole-map bincount would first copy
    the map into 64-bit integers."""
    check_label_map(series, label_map, algorithm, structures)
    who = f"{algorithm.name} {algorithm.version}"
    labels = [s.label for s in structures]
    counts = np.zeros(max(labels, default=0) + 1, dtype=np.int64)
    sums = np.zeros(counts.size, dtype=np.float64) if hu_sums else None
    for index, plane in enumerate(label_map):
        if label_map.dtype.kind == "i" and plane.min() < 0:
            raise ProcessingFailedError(f"segmenter {who} returned negative labels")
        flat = plane.ravel().astype(np.intp, copy=False)
        c = np.bincount(flat, minlength=counts.size)
        if c.size > counts.size:  # a label no structure has: reported below
            counts = np.pad(counts, (0, c.size - counts.size))
        counts += c
        if sums is not None:
            hu = series.volume.hu[index].ravel().astype(np.float64, copy=False)
            s = np.bincount(flat, weights=hu, minlength=sums.size)
            if s.size > sums.size:
                sums = np.pad(sums, (0, s.size - sums.size))
            sums += s
    unknown = sorted({int(v) for v in np.flatnonzero(counts)} - {0, *labels})
    if unknown:
        raise ProcessingFailedError(
            f"segmenter {who} labelled voxels with value(s) {unknown[:10]} that name none of its structures"
        )
    return counts, sums


def series_description(algorithm: AlgorithmInfo, what: str) -> str:
    """What a technologist reads in the PACS series list (LO: at most 64 characters), e.g.
    "AI segmentation (classical 1.0)": when it does not fit, ``what`` gives way before the name."""
    name = f"{algorithm.name} {algorithm.version}"
    for prefix in (f"AI {what} (", "AI ("):
        if len(prefix) + len(name) + 1 <= 64:
            return f"{prefix}{name})"
    return f"AI ({name[: 64 - len('AI ()')]})"
