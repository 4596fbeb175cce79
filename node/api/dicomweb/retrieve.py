"""QIDO-RS and WADO-RS (PS3.18 10.4, 10.6): what the node holds and what it produced, for viewers
and remote workers. Instances are sent as stored; a request for Explicit VR Little Endian gets a
compressed one decoded (the standard's default), any other transfer syntax is refused (406) naming
the stored one; transfer-syntax=* takes them as stored."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations.
from collections import defaultdict
from collections.abc import Iterator
from io import BytesIO
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import func, select

from node.api.deps import Config, Db, Reader
from node.api.dicomweb.held import Held, held, produced
from node.api.dicomweb.multipart import parse_content_type
from node.api.dicomweb.stow import DICOM, DICOM_JSON, public_base
from node.core.identifiers import node_key, read_identifiers, search_key
from node.db.models import Instance, Series, Study

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
BOUNDARY = "segnode-wado-boundary"
CHUNK = 1 << 20
BULK_THRESHOLD = 1024  # larger binary elements are named by URI in metadata, not inlined
MAX_LIMIT = 1000
QIDO_MATCHING = frozenset({"StudyInstanceUID", "PatientID", "AccessionNumber"})
# Keys that ask for no matching: paging, and attributes or fuzziness the answer may ignore.
QIDO_KEYS = QIDO_MATCHING | {"limit", "offset", "includefield", "fuzzymatching"}


def _attr(vr: str, *values: Any) -> dict[str, Any]:
    found = [v for v in values if v not in (None, "")]
    return {"vr": vr, "Value": found} if found else {"vr": vr}


# --- QIDO-RS -------------------------------------------------------------------------------------


@router.get("/studies")
def search_studies(
    request: Request,
    user: Reader,
    db: Db,
    settings: Config,
    study: Annotated[str | None, Query(alias="StudyInstanceUID")] = None,
    patient_id: Annotated[str | None, Query(alias="PatientID")] = None,
    accession: Annotated[str | None, Query(alias="AccessionNumber")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JSONResponse:
    """Studies, newest first; patient and study attributes as their first instance names them.
    Matching: StudyInstanceUID, and PatientID or AccessionNumber exactly (the database keeps only
    keyed hashes of those); any other key is refused rather than silently ignored."""
    unsupported = sorted(set(request.query_params) - QIDO_KEYS)
    if unsupported:
        raise HTTPException(
            400,
            f"the node matches on {', '.join(sorted(QIDO_MATCHING))} only, not on {', '.join(unsupported)}",
        )
    query = select(Study).order_by(Study.id.desc()).limit(limit).offset(offset)
    if study:
        query = query.where(Study.study_instance_uid == study)
    for value, column in ((patient_id, Series.patient_key), (accession, Series.accession_key)):
        if value:
            key = search_key(node_key(settings.data_dir), value)
            query = query.where(Study.id.in_(select(Series.study_id).where(column == key)))
    base = public_base(request, settings) + "/dicomweb/studies"
    found = []
    for row in db.scalars(query):
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
        found.append(
            {
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
        )
    return JSONResponse(found, media_type=DICOM_JSON)


@router.get("/studies/{study}/series")
def search_series(study: str, request: Request, user: Reader, db: Db, settings: Config) -> JSONResponse:
    """The study's series: received ones and those the node wrote (SEG, RTSTRUCT, SR, overlays)."""
    by_series: dict[str, list[Held]] = defaultdict(list)
    for item in held(db, settings, study):
        by_series[item.series].append(item)
    if not by_series:
        raise HTTPException(404, f"the node holds no study {study}")
    base = public_base(request, settings) + f"/dicomweb/studies/{study}/series"
    return JSONResponse(
        [
            {
                "0020000D": _attr("UI", study),
                "0020000E": _attr("UI", series),
                "00080060": _attr("CS", items[0].modality),
                "0008103E": _attr("LO", items[0].description),
                "00201209": _attr("IS", len(items)),
                "00081190": _attr("UR", f"{base}/{series}"),
            }
            for series, items in by_series.items()
        ],
        media_type=DICOM_JSON,
    )


@router.get("/studies/{study}/series/{series}/instances")
def search_instances(
    study: str, series: str, request: Request, user: Reader, db: Db, settings: Config
) -> JSONResponse:
    items = held(db, settings, study, series)
    if not items:
        raise HTTPException(404, f"the node holds no series {series} of study {study}")
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


def _wanted_syntax(request: Request) -> str | None:
    """The transfer syntax the client asks for; None for "as stored" (transfer-syntax=*). Without
    one the standard's default holds: Explicit VR Little Endian (PS3.18 8.7.3.5.2)."""
    for accepted in request.headers.get("accept", "").split(","):
        media = parse_content_type(accepted.strip()) if accepted.strip() else None
        if media is None or media.media_type not in ("multipart/related", "*/*"):
            continue
        if media.params.get("type", DICOM).lower() not in (DICOM, "*/*"):
            raise HTTPException(406, f"instances are sent as {DICOM}; {media.params['type']} is not")
        syntax = media.params.get("transfer-syntax", str(ExplicitVRLittleEndian))
        return None if syntax == "*" else syntax
    return str(ExplicitVRLittleEndian)


def _instances(items: list[Held], wanted: str | None) -> Iterator[bytes]:
    for item in items:
        decode = wanted is not None and wanted != item.transfer_syntax  # to Explicit VR LE: checked
        syntax = str(ExplicitVRLittleEndian) if decode else item.transfer_syntax
        yield f"--{BOUNDARY}\r\nContent-Type: {DICOM}; transfer-syntax={syntax}\r\n\r\n".encode()
        if decode:
            ds = dcmread(item.path)
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress()
            else:  # another uncompressed encoding: written again in this one
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            out = BytesIO()
            ds.save_as(out, enforce_file_format=True)
            yield out.getvalue()
        else:
            with item.path.open("rb") as source:
                while chunk := source.read(CHUNK):
                    yield chunk
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def _retrieve(request: Request, items: list[Held], what: str) -> StreamingResponse:
    if not items:
        raise HTTPException(404, f"the node holds no {what}")
    wanted = _wanted_syntax(request)
    if wanted is not None and wanted != str(ExplicitVRLittleEndian):
        stored = sorted({i.transfer_syntax for i in items if i.transfer_syntax != wanted})
        if stored:
            raise HTTPException(
                406,
                f"stored as {', '.join(stored)}; the node sends that (transfer-syntax=*) "
                f"or {ExplicitVRLittleEndian}",
            )
    media = f'multipart/related; type="{DICOM}"; boundary={BOUNDARY}'
    return StreamingResponse(_instances(items, wanted), media_type=media)


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
