"""STOW-RS (PS3.18 10.5): instances POSTed as multipart/related; type="application/dicom", each
part spooled as it arrives and stored as a C-STORE'd instance is (file and row synced before the
answer), then routed and completed alike. Every part gets its own verdict in the answer."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations.
import asyncio
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydicom.errors import BytesLengthException
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID

from node.api.deps import Config, Stower
from node.api.dicomweb.multipart import (
    MultipartError,
    MultipartReader,
    PartData,
    PartEnd,
    PartStart,
    parse_content_type,
)
from node.core.config import Settings
from node.core.dicom import CT_IMAGE_CLASSES
from node.core.uids import is_valid_uid
from node.db.models import User
from node.receive.listener import ACCEPTED_TRANSFER_SYNTAXES, instance_facts
from node.receive.part10 import InflatesTooFarError, TruncatedDataSetError, read_header
from node.receive.spool_files import Spool, StagedFile, StorageFullError
from node.receive.storage import RefusedInstanceError, Storage

log = logging.getLogger(__name__)
router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
# Failure reasons (PS3.18 Table 10.5.3-2, from PS3.4 C-STORE statuses).
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
PROCESSING_FAILURE = 0x0110
TRANSIENT = frozenset({OUT_OF_RESOURCES, PROCESSING_FAILURE})
STORING_AT_ONCE = 4  # parts stored on threads while the next are read
PREAMBLE = 132  # 128 bytes and "DICM"
GROUP_LENGTH_ELEMENT = 12  # (0002,0000) UL in explicit VR: tag, VR, length, value
ACCEPTED = frozenset(str(uid) for uid in ACCEPTED_TRANSFER_SYNTAXES)


@dataclass
class Verdict:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str = ""
    series_uid: str = ""
    failure: int | None = None
    reason: str = ""


def store_part(storage: Storage, spool: Spool, who: str, study: str | None) -> Verdict:
    """Store one part (a Part 10 file in ``spool``) or say why not; nothing of a refused part stays,
    whatever goes wrong (an unforeseen fault is that part's failure, never the request's)."""
    staged = spool.finish()
    verdict: Verdict | None = None
    try:
        verdict = _store_staged(storage, staged, who, study)
    except Exception as err:  # noqa: BLE001 - answered by name; the sender may send it again
        log.warning("STOW-RS from %s: part not stored (%s)", who, type(err).__name__)
        verdict = Verdict("", "", failure=PROCESSING_FAILURE, reason=f"not stored: {type(err).__name__}")
    finally:
        if verdict is None or verdict.failure is not None:
            staged.discard()
    return verdict


def _store_staged(storage: Storage, staged: StagedFile, who: str, study: str | None) -> Verdict:
    try:
        verdict, facts = _check(staged.wait(), study)
    except StorageFullError:
        return Verdict("", "", failure=OUT_OF_RESOURCES, reason="the node's storage is full")
    except OSError as err:
        return Verdict(
            "", "", failure=PROCESSING_FAILURE, reason=f"the part could not be written: {err.strerror}"
        )
    if facts is None:
        return verdict
    try:
        storage.store(staged, facts, who)
    except RefusedInstanceError as err:
        verdict.failure, verdict.reason = CANNOT_UNDERSTAND, str(err)
    except StorageFullError:
        verdict.failure, verdict.reason = OUT_OF_RESOURCES, "the node's storage is full"
    except Exception as err:  # noqa: BLE001 - answered by name; the sender may send it again
        log.warning("STOW-RS from %s: instance not stored (%s)", who, type(err).__name__)
        verdict.failure, verdict.reason = PROCESSING_FAILURE, f"not stored: {type(err).__name__}"
    return verdict


@dataclass(frozen=True)
class _Meta:
    syntax: str
    start: int  # where the data set begins
    sop_class: str
    sop_instance: str


def _read_meta(path: Path) -> _Meta:
    """The part's File Meta Information; raises whatever pydicom raises on a malformed one."""
    meta = read_file_meta_info(path)
    return _Meta(
        str(meta.TransferSyntaxUID),
        PREAMBLE + GROUP_LENGTH_ELEMENT + int(meta.FileMetaInformationGroupLength),
        str(meta.get("MediaStorageSOPClassUID", "")),
        str(meta.get("MediaStorageSOPInstanceUID", "")),
    )


def _unreadable(err: Exception) -> str:
    """Why pydicom could not read a part, in words; its messages can quote values, so not repeated."""
    if isinstance(err, NotImplementedError):
        return "an element has an unknown value representation"
    if isinstance(err, BytesLengthException):
        return "an element's length does not fit its value representation"
    if isinstance(err, EOFError | struct.error):
        return "it ends inside an element"
    if isinstance(err, AttributeError | KeyError):
        return "a required element is missing"
    return f"it is malformed ({type(err).__name__})"


def _check(path: Path, study: str | None) -> tuple[Verdict, Any]:
    """The part's verdict so far and its facts (None when it is refused)."""
    with path.open("rb") as source:
        head = source.read(PREAMBLE)
    if len(head) < PREAMBLE or head[128:] != b"DICM":
        return Verdict(
            "", "", failure=CANNOT_UNDERSTAND, reason="not a DICOM Part 10 file (no DICM prefix)"
        ), None
    try:
        meta = _read_meta(path)
    except Exception as err:  # noqa: BLE001 - pydicom raises many kinds; all mean an unreadable part
        reason = f"its File Meta Information cannot be read: {_unreadable(err)}"
        return Verdict("", "", failure=CANNOT_UNDERSTAND, reason=reason), None
    verdict = Verdict(meta.sop_class, meta.sop_instance)
    if meta.syntax not in ACCEPTED:
        verdict.failure, verdict.reason = (
            TRANSFER_SYNTAX_NOT_SUPPORTED,
            f"transfer syntax {meta.syntax} is not one the node accepts",
        )
        return verdict, None
    try:
        with path.open("rb") as source:
            ds, has_pixels = read_header(source, UID(meta.syntax), meta.start)
        facts = instance_facts(ds, meta.syntax)
    except TruncatedDataSetError:
        verdict.failure, verdict.reason = CANNOT_UNDERSTAND, "the data set is truncated"
        return verdict, None
    except InflatesTooFarError as err:
        verdict.failure, verdict.reason = CANNOT_UNDERSTAND, f"{err}; send it in another transfer syntax"
        return verdict, None
    except Exception as err:  # noqa: BLE001 - any decoding fault means the data set is unreadable
        verdict.failure, verdict.reason = (
            CANNOT_UNDERSTAND,
            f"the data set cannot be parsed: {_unreadable(err)}",
        )
        return verdict, None
    return _judge(verdict, facts, meta.sop_instance, has_pixels, study)


def _judge(
    verdict: Verdict, facts: Any, sop_instance: str, has_pixels: bool, study: str | None
) -> tuple[Verdict, Any]:
    """The verdict on a readable part: its data set must agree with its meta and the URL's study."""
    verdict.sop_class_uid, verdict.sop_instance_uid = facts.sop_class_uid, facts.sop_instance_uid
    verdict.study_uid, verdict.series_uid = facts.study_uid, facts.series_uid
    problem = ""
    if facts.sop_instance_uid != sop_instance:
        problem = "the data set names another SOPInstanceUID than its File Meta Information"
    elif not is_valid_uid(facts.sop_class_uid):
        problem = "SOPClassUID is not a valid DICOM UID"
    elif facts.sop_class_uid in CT_IMAGE_CLASSES and not has_pixels:
        verdict.failure, verdict.reason = DOES_NOT_MATCH, "the image has no Pixel Data"
        return verdict, None
    elif study is not None and facts.study_uid != study:
        verdict.failure, verdict.reason = (
            DOES_NOT_MATCH,
            f"it belongs to study {facts.study_uid}, not to {study} of the URL",
        )
        return verdict, None
    if problem:
        verdict.failure, verdict.reason = CANNOT_UNDERSTAND, problem
        return verdict, None
    return verdict, facts


def _storage(request: Request) -> Storage:
    found: Storage = request.app.state.storage
    return found


async def _receive(request: Request, settings: Config, user: User, study: str | None) -> JSONResponse:
    content_type = parse_content_type(request.headers.get("content-type", ""))
    if content_type.media_type != "multipart/related":
        raise HTTPException(
            415, f'STOW-RS takes multipart/related; type="{DICOM}", not {content_type.media_type}'
        )
    part_type = content_type.params.get("type", DICOM).lower()
    if part_type != DICOM:
        raise HTTPException(
            415, f"the node stores whole instances ({DICOM}); {part_type} parts are not taken"
        )
    limit = settings.dicomweb.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the request has {int(declared)} bytes; the node takes at most {limit}")
    try:
        reader = MultipartReader(content_type.params.get("boundary", ""))
    except MultipartError as err:
        raise HTTPException(400, str(err)) from err
    if study is not None and not is_valid_uid(study):
        raise HTTPException(400, "the study in the URL is not a valid DICOM UID")
    storage, who = _storage(request), user.name[:16]
    whole = False  # the body came to its closing boundary
    # Each part is stored on a thread while the next one is read (no per-instance answer makes
    # the sender wait, as C-STORE's does); a few at a time, verdicts kept in the parts' order.
    storing: list[asyncio.Future[Verdict]] = []
    spool: Spool | None = None
    refused_part: str | None = None
    received = 0

    async def stored_so_far() -> int:
        return sum(v.failure is None for v in await asyncio.gather(*storing))

    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise HTTPException(
                    413,
                    f"the request is larger than the {limit} bytes the node takes; "
                    f"{await stored_so_far()} instance(s) before the limit are stored",
                )
            for event in reader.feed(chunk):
                if isinstance(event, PartStart):
                    refused_part = _refused_part(event.headers)
                    if refused_part is None:
                        try:
                            spool = storage.open_spool()
                        except StorageFullError:
                            refused_part = "the node's storage is full"
                elif isinstance(event, PartData) and spool is not None:
                    spool.write(event.data)
                elif isinstance(event, PartEnd):
                    if spool is not None:
                        done, spool = spool, None
                        storing.append(
                            asyncio.ensure_future(run_in_threadpool(store_part, storage, done, who, study))
                        )
                        if len(storing) > STORING_AT_ONCE:
                            await storing[-STORING_AT_ONCE - 1]
                    else:
                        code = (
                            OUT_OF_RESOURCES
                            if refused_part == "the node's storage is full"
                            else DOES_NOT_MATCH
                        )
                        storing.append(_settled(Verdict("", "", failure=code, reason=refused_part or "")))
        reader.close()
        whole = True
    except MultipartError as err:
        raise HTTPException(400, f"{err}; {await stored_so_far()} instance(s) before it are stored") from err
    finally:
        if spool is not None:
            spool.discard()
        verdicts = list(await asyncio.gather(*storing))  # every part started is stored before any answer
        stored = {v.series_uid for v in verdicts if v.failure is None}
        # Like an association's release, only for a whole request that lost nothing: a sender told
        # of a refusal sends again, and a series cut short waits out its quiet period.
        if stored and whole and all(v.failure is None for v in verdicts):
            await run_in_threadpool(storage.mark_released, stored)
    if not verdicts:
        raise HTTPException(400, "the body holds no part")
    return _answer(request, settings, verdicts, study)


def _settled(verdict: Verdict) -> asyncio.Future[Verdict]:
    future: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
    future.set_result(verdict)
    return future


def _refused_part(headers: dict[str, str]) -> str | None:
    given = headers.get("content-type")
    if given is None:
        return None
    media = parse_content_type(given).media_type
    return None if media == DICOM else f"a part of type {media}; the node takes {DICOM} parts"


def public_base(request: Request, settings: Settings) -> str:
    """The node's address as its clients reach it: ``api.public_url``, else the request's Host with
    the server's port where the Host left it out (dicomweb-client sends a Host without it)."""
    if settings.api.public_url:
        return settings.api.public_url.rstrip("/")
    host = request.headers.get("host", "")
    server = request.scope.get("server")
    if host and ":" not in host.rsplit("]", 1)[-1] and server and server[1] not in (80, 443):
        host = f"{host}:{server[1]}"
    return f"{request.url.scheme}://{host or 'localhost'}"


def _answer(request: Request, settings: Settings, verdicts: list[Verdict], study: str | None) -> JSONResponse:
    base = public_base(request, settings) + "/dicomweb/studies"
    stored = [v for v in verdicts if v.failure is None]
    failed = [v for v in verdicts if v.failure is not None]
    body: dict[str, Any] = {}
    studies = {v.study_uid for v in stored} | ({study} if study else set())
    if len(studies) == 1:
        body["00081190"] = {"vr": "UR", "Value": [f"{base}/{next(iter(studies))}"]}
    if stored:
        body["00081199"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": {"vr": "UI", "Value": [v.sop_class_uid]},
                    "00081155": {"vr": "UI", "Value": [v.sop_instance_uid]},
                    "00081190": {
                        "vr": "UR",
                        "Value": [
                            f"{base}/{v.study_uid}/series/{v.series_uid}/instances/{v.sop_instance_uid}"
                        ],
                    },
                }
                for v in stored
            ],
        }
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [_failed_item(v) for v in failed]}
    status = 200 if not failed else (202 if stored else 409)
    headers = {}
    if not stored and all(v.failure in TRANSIENT for v in failed):
        status = 503  # nothing stored, and only for reasons that pass: the sender should try again
        headers["Retry-After"] = "60"
    if failed:  # the reasons in words (the standard's codes say less), without patient identifiers
        headers["Warning"] = ", ".join(f'299 segnode "{_quoted(v)}"' for v in failed[:20])
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON, headers=headers)


def _failed_item(verdict: Verdict) -> dict[str, Any]:
    item: dict[str, Any] = {"00081197": {"vr": "US", "Value": [verdict.failure]}}
    if verdict.sop_class_uid:
        item["00081150"] = {"vr": "UI", "Value": [verdict.sop_class_uid]}
    if verdict.sop_instance_uid:
        item["00081155"] = {"vr": "UI", "Value": [verdict.sop_instance_uid]}
    return item


def _quoted(verdict: Verdict) -> str:
    which = verdict.sop_instance_uid if is_valid_uid(verdict.sop_instance_uid) else "a part"
    return f"{which}: {verdict.reason}".replace('"', "'").replace("\r", " ").replace("\n", " ")


@router.post("/studies")
async def stow(request: Request, settings: Config, user: Stower) -> JSONResponse:
    """Store instances of any studies (STOW-RS); users with the sender or admin role."""
    return await _receive(request, settings, user, None)


@router.post("/studies/{study}")
async def stow_study(study: str, request: Request, settings: Config, user: Stower) -> JSONResponse:
    """Store instances of one study (STOW-RS); an instance of another study is refused."""
    return await _receive(request, settings, user, study)
