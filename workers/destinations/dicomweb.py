"""STOW-RS to a DICOMweb archive (dicomweb-client), with the same retry rules as C-STORE: an
archive that is away or busy is tried again, one that refuses what it was sent is not."""

from __future__ import annotations

from pathlib import Path

import requests
from pydicom import dcmread

from node.core.config import DicomWebDestination
from node.core.dicomweb import dicomweb_client
from workers.errors import DeliveryRefusedError, DestinationUnavailableError

# HTTP answers worth trying again: the archive is busy, restarting or rate-limiting.
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
OUT_OF_RESOURCES = 0xA700


def send_by_stow(
    destination: DicomWebDestination, paths: list[Path], calling_ae: str, timeout_s: float
) -> str:
    """Store every file in one STOW-RS request; success only if the archive took them all."""
    where = destination.url
    client = dicomweb_client(destination, timeout_s)
    try:
        answer = client.store_instances([dcmread(p) for p in paths])
    except requests.HTTPError as err:
        status = err.response.status_code if err.response is not None else 0
        text = f"{where}: STOW-RS answered HTTP {status}"
        if status in TRANSIENT_HTTP:
            raise DestinationUnavailableError(text) from err
        raise DeliveryRefusedError(f"{text} ({_why(status)})") from err
    except (requests.ConnectionError, requests.Timeout) as err:
        raise DestinationUnavailableError(f"{where}: no answer ({type(err).__name__})") from err
    failed = list(answer.get("FailedSOPSequence", [])) if answer is not None else []
    if failed:
        codes = sorted({int(item.get("FailureReason", 0)) for item in failed})
        text = f"{where} refused {len(failed)} of {len(paths)} instance(s): reasons " + ", ".join(
            f"0x{c:04X}" for c in codes
        )
        if codes == [OUT_OF_RESOURCES]:
            raise DestinationUnavailableError(text)
        raise DeliveryRefusedError(text)
    stored = len(answer.get("ReferencedSOPSequence", [])) if answer is not None else len(paths)
    return f"{where} stored {stored} instance(s) (STOW-RS)"


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
