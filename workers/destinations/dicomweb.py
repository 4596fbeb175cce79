"""STOW-RS to a DICOMweb archive, with the same retry rules as C-STORE: an archive that is away or
busy is tried again, one that refuses what it was sent is not.

The request and its answer are handled here rather than by dicomweb-client, which reads the answer
only when its media type is exactly ``application/dicom+json`` (a ``charset`` parameter made a
refusal look like success); a delivery counts only for what the archive says it stored."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import requests
from pydicom import Dataset, dcmread

from node.core.config import DicomWebDestination
from node.core.dicomweb import dicomweb_session
from workers.errors import DeliveryRefusedError, DestinationUnavailableError

# HTTP answers worth trying again: the archive is busy, restarting or rate-limiting.
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
OUT_OF_RESOURCES = 0xA700
STORE_ANSWERS = {200, 202, 409}  # PS3.18 10.5.3: all, some, none stored; each with a response body


def send_by_stow(
    destination: DicomWebDestination, paths: list[Path], calling_ae: str, timeout_s: float
) -> str:
    """Store every file in one STOW-RS request; success only if the archive took them all."""
    where = destination.url
    sent = [
        str(dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        for p in paths
    ]
    boundary = secrets.token_hex(16)
    try:
        response = dicomweb_session(destination).post(
            f"{destination.url.rstrip('/')}/studies",
            data=_multipart(paths, boundary),
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": "application/dicom+json",
            },
            timeout=timeout_s,
        )
    except (requests.ConnectionError, requests.Timeout) as err:
        raise DestinationUnavailableError(f"{where}: no answer ({type(err).__name__})") from err
    status = response.status_code
    text = f"{where}: STOW-RS answered HTTP {status}"
    if status in TRANSIENT_HTTP:
        raise DestinationUnavailableError(text)
    if status not in STORE_ANSWERS:
        raise DeliveryRefusedError(f"{text} ({_why(status)})")
    answer = _answer(response)
    failed = list(answer.get("FailedSOPSequence", [])) if answer is not None else []
    if failed:
        codes = sorted({int(item.get("FailureReason", 0)) for item in failed})
        text = f"{where} refused {len(failed)} of {len(paths)} instance(s): reasons " + ", ".join(
            f"0x{c:04X}" for c in codes
        )
        if codes == [OUT_OF_RESOURCES]:
            raise DestinationUnavailableError(text)
        raise DeliveryRefusedError(text)
    if status == 409:
        raise DeliveryRefusedError(f"{text} ({_why(status)})")
    if answer is not None:
        stored = {
            str(item.get("ReferencedSOPInstanceUID", "")) for item in answer.get("ReferencedSOPSequence", [])
        }
        missing = [uid for uid in sent if uid not in stored]
        if missing:
            raise DeliveryRefusedError(
                f"{where} answered HTTP {status} but did not list {len(missing)} of the {len(sent)} "
                "instance(s) sent as stored"
            )
    elif status != 200:
        # Only 200 says "all stored" by itself; a 202 must say which.
        raise DeliveryRefusedError(f"{text} without a readable list of what it stored")
    return f"{where} stored {len(sent)} instance(s) (STOW-RS)"


def _sop_instance_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def _multipart(paths: list[Path], boundary: str) -> Iterator[bytes]:
    """The request body, one file at a time (sent chunked: no whole copy in memory)."""
    for path in paths:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield path.read_bytes()
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _answer(response: requests.Response) -> Dataset | None:
    """The Store Instances Response as a data set, whatever parameters its media type carries;
    None when there is none that can be read."""
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media_type != "application/dicom+json" or not response.content:
        return None
    try:
        found = response.json()
        if isinstance(found, list) and len(found) == 1:
            found = found[0]
        return Dataset.from_json(found) if isinstance(found, dict) else None
    except (ValueError, TypeError, KeyError):  # not the module the standard describes
        return None


def _why(status: int) -> str:
    return {
        400: "it found the request malformed",
        401: "the credentials are missing or wrong",
        403: "the credentials may not store",
        404: "no STOW-RS service at that URL",
        409: "it stored none of them",
        413: "the request is too large for it",
        415: "it does not take application/dicom",
    }.get(status, "a refusal")
