"""C-STORE to a DICOM peer (a PACS), with the association's socket tuned for small PDUs."""

from __future__ import annotations

import socket
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.status import code_to_category

from node.core.config import DicomDestination
from workers.errors import DeliveryRefusedError, DestinationUnavailableError

SUCCESS_CATEGORIES = {"Success", "Warning"}


def send_by_c_store(destination: DicomDestination, paths: list[Path], calling_ae: str) -> str:
    """Store every file on ``destination`` in one association; success only if all are accepted."""
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    datasets = [dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = 30
    ae.dimse_timeout = 120
    ae.network_timeout = 120
    for sop_class, syntax in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "no answer (connection refused or timed out)"
        raise DestinationUnavailableError(f"{where}: {why}")
    try:
        sock = assoc.dul.socket.socket if assoc.dul.socket else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        answers = []
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if "Status" not in status:
                raise DestinationUnavailableError(
                    f"{where}: no C-STORE response (connection lost or timed out)"
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
