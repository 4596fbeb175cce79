"""An admin's "test destination": C-ECHO to a DICOM peer, a QIDO-RS search to a DICOMweb archive;
the answer in words."""

from __future__ import annotations

import time

import requests
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.core.config import DicomDestination, DicomWebDestination
from node.core.dicom import rejection_reason
from node.core.dicomweb import dicomweb_client
from node.core.tls import TlsFileError, client_context


def test_destination(
    destination: DicomDestination | DicomWebDestination, calling_ae: str, timeout_s: float
) -> tuple[bool, str]:
    """(answered success, what happened), no wait longer than ``timeout_s``."""
    if isinstance(destination, DicomWebDestination):
        return _search(destination, timeout_s)
    return echo(destination, calling_ae, timeout_s)


def _search(destination: DicomWebDestination, timeout_s: float) -> tuple[bool, str]:
    started = time.monotonic()
    try:
        dicomweb_client(destination, timeout_s).search_for_studies(limit=1)
    except requests.HTTPError as err:
        status = err.response.status_code if err.response is not None else 0
        return False, f"{destination.url}: QIDO-RS answered HTTP {status}"
    except (requests.ConnectionError, requests.Timeout) as err:
        return False, f"{destination.url}: no answer ({type(err).__name__})"
    took = (time.monotonic() - started) * 1000
    return True, f"{destination.url} answered a QIDO-RS search in {took:.0f} ms"


def echo(destination: DicomDestination, calling_ae: str, timeout_s: float) -> tuple[bool, str]:
    """(answered success, what happened) for one C-ECHO, no wait longer than ``timeout_s``."""
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    try:
        context = client_context(destination.tls, where) if destination.tls is not None else None
    except TlsFileError as err:
        return False, str(err)
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(Verification)
    started = time.monotonic()
    tls_args = (context, destination.host) if context is not None else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        if assoc.is_rejected and assoc.acceptor.primitive is not None:
            rejection = assoc.acceptor.primitive
            why = rejection_reason(rejection.result_source, rejection.diagnostic)
            return False, f"{where} rejected the association: {why}"
        over = " over TLS" if context is not None else ""
        return False, f"{where}: no answer{over} (connection refused, timed out or closed)"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    took = (time.monotonic() - started) * 1000
    if "Status" not in status:
        return False, f"{where}: no C-ECHO response within {timeout_s:g} s"
    code = int(status.Status)
    if code != 0:
        return False, f"{where}: C-ECHO status 0x{code:04X}"
    return True, f"{where} answered C-ECHO in {took:.0f} ms"
