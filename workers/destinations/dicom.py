"""C-STORE to a DICOM peer (a PACS), with the association's socket tuned for small PDUs."""

from __future__ import annotations

import socket
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.status import code_to_category

from node.core.config import DicomDestination
from node.core.dicom import rejection_reason
from workers.errors import DeliveryRefusedError, DestinationUnavailableError

SUCCESS_CATEGORIES = {"Success", "Warning"}
PERMANENT = 0x01  # A-ASSOCIATE-RJ result: rejected-permanent


def send_by_c_store(
    destination: DicomDestination, paths: list[Path], calling_ae: str, timeout_s: float
) -> str:
    """Store every file on ``destination`` in one association; success only if all are accepted.

    Every wait (the association, each response, each read) ends after ``timeout_s``: a PACS that
    does not answer costs that and a retry, not a worker. A permanent rejection of the association
    (an AE title it does not know) raises :class:`DeliveryRefusedError` at once.
    """
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    datasets = [dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = timeout_s
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    for sop_class, syntax in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        rejection = assoc.acceptor.primitive if assoc.is_rejected else None
        if rejection is None:
            raise DestinationUnavailableError(f"{where}: no answer (connection refused or timed out)")
        why = rejection_reason(rejection.result_source, rejection.diagnostic)
        if rejection.result == PERMANENT:
            raise DeliveryRefusedError(f"{where} rejected the association permanently: {why}")
        raise DestinationUnavailableError(f"{where} rejected the association for now: {why}")
    try:
        sock = assoc.dul.socket.socket if assoc.dul.socket else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        answers = []
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if "Status" not in status:
                raise DestinationUnavailableError(
                    f"{where}: no C-STORE response within {timeout_s:g} s (connection lost or timed out)"
                )
            code = int(status.Status)
            category = code_to_category(code)
            if category not in SUCCESS_CATEGORIES:
                answer = f"{where}: C-STORE status 0x{code:04X} ({category}) {status.get('ErrorComment', '')}"
                if code & 0xFF00 == 0xA700:  # out of resources: worth trying again later
                    raise DestinationUnavailableError(answer.strip())
                raise DeliveryRefusedError(answer.strip())
            answers.append(f"0x{code:04X}")
    finally:
        assoc.release()
    return f"{where} answered {', '.join(answers)}"
