"""QIDO-RS and WADO-RS (PS3.18 10.4, 10.6): what the node holds and what it produced, for viewers
and remote workers. Instances are sent as stored; a request for Explicit VR Little Endian gets a
compressed or other little endian one converted (the standard's default), any other transfer syntax
is refused (406) naming the stored one, as is a conversion the node cannot make (from big endian);
transfer-syntax=* takes them as stored. Everything that can be checked is checked before the 200."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations.
import logging
import re
from collections import defaultdict
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Annotated, Any
from uuid import uuid4

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.api.deps import Config, Db, Reader
from node.api.dicomweb.held import Held, held, produced
from node.api.dicomweb.multipart import accepted_parts
from node.api.dicomweb.stow import DICOM, DICOM_JSON, public_base
from node.core.config import Settings
from node.core.identifiers import node_key, read_identifiers, search_key
from node.db.models import Instance, Series, Study

log = logging.getLogger(__name__)
router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
CHUNK = 1 << 20
BULK_THRESHOLD = 1024  # larger binary elements are named by URI in metadata, not inlined
MAX_LIMIT = 1000  # a larger limit is capped, with the Warning PS3.18 prescribes (TOO_MANY)
TOO_MANY = (
    "The number of results exceeded the maximum supported by the server. Additional results can be requested."
)
EXPLICIT_LE = str(ExplicitVRLittleEndian)
QIDO_MATCHING = frozenset({"StudyInstanceUID", "PatientID", "AccessionNumber"})
# A key is a keyword or its tag (PS3.18 8.3.4.1); viewers send both (OHIF: 00100020=...).
QIDO_TAGS = {"0020000D": "StudyInstanceUID", "00100020": "PatientID", "00080050": "AccessionNumber"}
# Keys that ask for no matching: paging, and attributes or fuzziness the answer may ignore.
QIDO_KEYS = QIDO_MATCHING | {"limit", "offset", "includefield", "fuzzymatching"}


def _attr(vr: str, *values: Any) -> dict[str, Any]:
    found = [v for v in values if v not in (None, "")]
    return {"vr": vr, "Value": found} if found else {"vr": vr}


def _uids(value: str | None) -> set[str]:
    """A UID key's values: one UID, or a list of them separated by commas or backslashes (UID list
    matching, PS3.18 8.3.4.1); empty for no matching."""
    return {uid.strip() for uid in re.split(r"[,\\]", value or "") if uid.strip()}


def _exact(name: str, value: str | None) -> str | None:
    """A key matched by its keyed hash: only the exact value can be found, so a wildcard is refused
    rather than answered with nothing."""
    if value and ("*" in value or "?" in value):
        raise HTTPException(
            400,
            f"{name} is matched exactly (the node keeps only a keyed hash of it); "
            "wildcards (* and ?) cannot be matched",
        )
    return value


# --- QIDO-RS -------------------------------------------------------------------------------------


@router.get("/studies")
def search_studies(
    request: Request,
    user: Reader,
    db: Db,
    settings: Config,
    limit: Annotated[int, Query(ge=1)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JSONResponse:
    """Studies, newest first; patient and study attributes as their first instance names them.
    Matching: StudyInstanceUID (one or a list), and PatientID or AccessionNumber exactly (the
    database keeps only keyed hashes of those); any other key is refused rather than ignored."""
    keys = {QIDO_TAGS.get(key.upper(), key): value for key, value in request.query_params.items()}
    unsupported = sorted(set(keys) - QIDO_KEYS)
    if unsupported:
        raise HTTPException(
            400,
            f"the node matches on {', '.join(sorted(QIDO_MATCHING))} only, not on {', '.join(unsupported)}",
        )
    study, patient_id, accession = (keys.get(k) for k in ("StudyInstanceUID", "PatientID", "AccessionNumber"))
    page = min(limit, MAX_LIMIT)
    # One row more than the page when the limit was capped: it tells whether results were left out.
    query = select(Study).order_by(Study.id.desc()).limit(page + 1 if limit > page else page).offset(offset)
    if uids := _uids(study):
        query = query.where(Study.study_instance_uid.in_(uids))
    for name, value, column in (
        ("PatientID", patient_id, Series.patient_key),
        ("AccessionNumber", accession, Series.accession_key),
    ):
        if _exact(name, value):
            key = search_key(node_key(settings.data_dir), value or "")
            query = query.where(Study.id.in_(select(Series.study_id).where(column == key)))
    rows = list(db.scalars(query))
    base = public_base(request, settings) + "/dicomweb"
    found = [_study_attributes(db, settings, row, f"{base}/studies") for row in rows[:page]]
    headers = {"Warning": f'299 {base}: "{TOO_MANY}"'} if len(rows) > page else {}
    return JSONResponse(found, media_type=DICOM_JSON, headers=headers)


def _study_attributes(db: Session, settings: Settings, row: Study, base: str) -> dict[str, Any]:
    """A study's QIDO-RS attributes: counts from the database, names from its first instance."""
    counts = db.execute(
        select(Series.modality, func.count(Instance.id))
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == row.id)
        .group_by(Series.id, Series.modality)
    ).all()
    made = produced(db, row.study_instance_uid)
    first = db.scalar(
        select(Instance.path).join(Series).where(Series.study_id == row.id).order_by(Instance.id).limit(1)
    )
    names = read_identifiers(settings.storage_dir / first) if first else {}
    modalities = sorted({m for m, _ in counts} | {h.modality for h in made} - {""})
    return {
        "0020000D": _attr("UI", row.study_instance_uid),
        "00080020": _attr("DA", names.get("StudyDate")),
        "00080050": _attr("SH", names.get("AccessionNumber")),
        "00080061": _attr("CS", *modalities),
        "00081030": _attr("LO", names.get("StudyDescription")),
        "00100010": _attr(
            "PN", *([{"Alphabetic": names["PatientName"]}] if names.get("PatientName") else [])
        ),
        "00100020": _attr("LO", names.get("PatientID")),
        "00201206": _attr("IS", len(counts) + len({h.series for h in made})),
        "00201208": _attr("IS", sum(n for _, n in counts) + len(made)),
        "00081190": _attr("UR", f"{base}/{row.study_instance_uid}"),
    }


@router.get("/studies/{study}/series")
def search_series(
    study: str,
    request: Request,
    user: Reader,
    db: Db,
    settings: Config,
    series_uids: Annotated[str | None, Query(alias="SeriesInstanceUID")] = None,
) -> JSONResponse:
    """The study's series: received ones and those the node wrote (SEG, RTSTRUCT, SR, overlays);
    SeriesInstanceUID (one or a list) picks some of them."""
    by_series: dict[str, list[Held]] = defaultdict(list)
    for item in held(db, settings, study):
        by_series[item.series].append(item)
    if not by_series:
        raise HTTPException(404, f"the node holds no study {study}")
    if wanted := _uids(series_uids):
        by_series = {uid: items for uid, items in by_series.items() if uid in wanted}
    base = public_base(request, settings) + f"/dicomweb/studies/{study}/series"
    found = []
    for series, items in by_series.items():
        named = _series_header(items[0].path)
        found.append(
            {
                "0020000D": _attr("UI", study),
                "0020000E": _attr("UI", series),
                "00080060": _attr("CS", items[0].modality),
                "0008103E": _attr("LO", items[0].description),
                "00200011": _attr("IS", named.get("SeriesNumber")),
                "00080021": _attr("DA", named.get("SeriesDate")),
                "00080031": _attr("TM", named.get("SeriesTime")),
                "00201209": _attr("IS", len(items)),
                "00081190": _attr("UR", f"{base}/{series}"),
            }
        )
    return JSONResponse(found, media_type=DICOM_JSON)


def _series_header(path: Path) -> dict[str, Any]:
    """Number, date and time of a series as its first instance names them (viewers sort by them)."""
    keywords = ("SeriesNumber", "SeriesDate", "SeriesTime")
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=list(keywords))
    except (OSError, InvalidDicomError):
        return {}
    number = ds.get("SeriesNumber")
    return {
        "SeriesNumber": int(number) if number not in (None, "") else None,  # IS goes as a JSON number
        "SeriesDate": str(ds.get("SeriesDate", "")),
        "SeriesTime": str(ds.get("SeriesTime", "")),
    }


@router.get("/studies/{study}/series/{series}/instances")
def search_instances(
    study: str,
    series: str,
    request: Request,
    user: Reader,
    db: Db,
    settings: Config,
    sop_uids: Annotated[str | None, Query(alias="SOPInstanceUID")] = None,
) -> JSONResponse:
    """The series' instances; SOPInstanceUID (one or a list) picks some of them."""
    items = held(db, settings, study, series)
    if not items:
        raise HTTPException(404, f"the node holds no series {series} of study {study}")
    if wanted := _uids(sop_uids):
        items = [item for item in items if item.sop in wanted]
    base = public_base(request, settings) + f"/dicomweb/studies/{study}/series/{series}/instances"
    return JSONResponse(
        [
            {
                "0020000D": _attr("UI", study),
                "0020000E": _attr("UI", series),
                "00080016": _attr("UI", item.sop_class),
                "00080018": _attr("UI", item.sop),
                "00020010": _attr("UI", item.transfer_syntax),
                "00081190": _attr("UR", f"{base}/{item.sop}"),
            }
            for item in items
        ],
        media_type=DICOM_JSON,
    )


# --- WADO-RS --------------------------------------------------------------------------------------


def _accepted_syntaxes(request: Request) -> list[str]:
    """The transfer syntaxes the client takes, in its order; "*" for any (as stored). Without one
    the standard's default holds: Explicit VR Little Endian (PS3.18 8.7.3.5.2)."""
    found: list[str] = []
    refused: list[str] = []
    for part in accepted_parts(request.headers.get("accept", "")):
        if part.type is None or part.type in (DICOM, "*/*"):
            found.append(EXPLICIT_LE if part.syntax is None else part.syntax)
        else:
            refused.append(part.type)
    if refused and not found:
        raise HTTPException(406, f"instances are sent as {DICOM}; {', '.join(refused)} is not")
    return found or [EXPLICIT_LE]


def can_make_explicit_le(stored: str) -> bool:
    """Whether pydicom can convert an instance stored in ``stored`` to Explicit VR Little Endian:
    a compressed one it has a decoder for, or another little endian one (it cannot swap bytes)."""
    uid = UID(stored)
    if not uid.is_transfer_syntax:
        return False
    if not uid.is_compressed:
        return bool(uid.is_little_endian)
    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:  # pydicom knows no decoder for it at all
        return False


def _syntax_to_send(stored: str, accepted: list[str]) -> str | None:
    """The first of the client's transfer syntaxes the node can send the instance in; None if none."""
    for syntax in accepted:
        if syntax in ("*", stored):
            return stored
        if syntax == EXPLICIT_LE and can_make_explicit_le(stored):
            return EXPLICIT_LE
    return None


def _plan(items: list[Held], accepted: list[str]) -> list[tuple[Held, str]]:
    """Each instance with the transfer syntax it will be sent in, decided before the answer starts:
    a 406 (or a 500 for a lost file) is still possible here, and never after the 200."""
    plan = [(item, _syntax_to_send(item.transfer_syntax, accepted)) for item in items]
    unmakeable = sorted({item.transfer_syntax for item, syntax in plan if syntax is None})
    if unmakeable:
        raise HTTPException(
            406,
            f"stored as {', '.join(unmakeable)}, which the node cannot send as {', '.join(accepted)}; "
            "transfer-syntax=* takes instances as stored",
        )
    missing = [item for item in items if not item.path.is_file()]
    if missing:
        log.error("WADO-RS: the files of %d instance(s) are missing, %s first", len(missing), missing[0].sop)
        raise HTTPException(500, f"the file of instance {missing[0].sop} is missing from the node's storage")
    return [(item, syntax) for item, syntax in plan if syntax is not None]


def _instances(plan: list[tuple[Held, str]], boundary: str) -> Iterator[bytes]:
    """The multipart body, no more than one instance in memory. A failure here raises, so the server
    breaks the connection: the client must not take a short body for a whole one."""
    for item, syntax in plan:
        yield f"--{boundary}\r\nContent-Type: {DICOM}; transfer-syntax={syntax}\r\n\r\n".encode()
        try:
            yield from (_file(item.path) if syntax == item.transfer_syntax else _converted(item.path))
        except Exception as err:
            log.error("WADO-RS: instance %s not sent, answer broken off (%s)", item.sop, type(err).__name__)
            raise
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _file(path: Path) -> Iterator[bytes]:
    with path.open("rb") as source:
        while chunk := source.read(CHUNK):
            yield chunk


def _converted(path: Path) -> Iterator[bytes]:
    """The instance in Explicit VR Little Endian: compressed pixel data decoded, any other little
    endian encoding written again."""
    ds = dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed and "PixelData" in ds:
        ds.decompress()
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    yield out.getvalue()


def _retrieve(request: Request, items: list[Held], what: str) -> StreamingResponse:
    if not items:
        raise HTTPException(404, f"the node holds no {what}")
    plan = _plan(items, _accepted_syntaxes(request))
    boundary = uuid4().hex  # a fixed one could occur in an instance's bytes and cut it short
    media = f'multipart/related; type="{DICOM}"; boundary={boundary}'
    return StreamingResponse(_instances(plan, boundary), media_type=media)


@router.get("/studies/{study}")
def retrieve_study(study: str, request: Request, user: Reader, db: Db, settings: Config) -> StreamingResponse:
    return _retrieve(request, held(db, settings, study), f"study {study}")


@router.get("/studies/{study}/series/{series}")
def retrieve_series(
    study: str, series: str, request: Request, user: Reader, db: Db, settings: Config
) -> StreamingResponse:
    return _retrieve(request, held(db, settings, study, series), f"series {series}")


@router.get("/studies/{study}/series/{series}/instances/{sop}")
def retrieve_instance(
    study: str, series: str, sop: str, request: Request, user: Reader, db: Db, settings: Config
) -> StreamingResponse:
    return _retrieve(request, held(db, settings, study, series, sop), f"instance {sop}")


def _metadata(request: Request, settings: Config, items: list[Held], what: str) -> JSONResponse:
    if not items:
        raise HTTPException(404, f"the node holds no {what}")
    base = public_base(request, settings) + "/dicomweb/studies"
    found = []
    for item in items:
        uri = f"{base}/{item.study}/series/{item.series}/instances/{item.sop}"

        def bulk(element: DataElement, uri: str = uri) -> str:
            return uri

        ds = dcmread(item.path, stop_before_pixels=True)
        found.append(ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=bulk))
    return JSONResponse(found, media_type=DICOM_JSON)


@router.get("/studies/{study}/metadata")
def study_metadata(study: str, request: Request, user: Reader, db: Db, settings: Config) -> JSONResponse:
    return _metadata(request, settings, held(db, settings, study), f"study {study}")


@router.get("/studies/{study}/series/{series}/metadata")
def series_metadata(
    study: str, series: str, request: Request, user: Reader, db: Db, settings: Config
) -> JSONResponse:
    return _metadata(request, settings, held(db, settings, study, series), f"series {series}")


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata")
def instance_metadata(
    study: str, series: str, sop: str, request: Request, user: Reader, db: Db, settings: Config
) -> JSONResponse:
    return _metadata(request, settings, held(db, settings, study, series, sop), f"instance {sop}")
