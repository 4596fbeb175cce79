"""C-STORE to a DICOM peer (a PACS), over TLS where configured, with the association's socket
tuned for small PDUs."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.status import code_to_category

from node.core.config import DicomDestination
from node.core.dicom import rejection_reason
from node.core.tls import TlsFileError, client_context, tls_reason
from workers.errors import DeliveryRefusedError, DestinationUnavailableError

SUCCESS_CATEGORIES = {"Success", "Warning"}
PERMANENT = 0x01  # A-ASSOCIATE-RJ result: rejected-permanent
# A-ABORT PDU (PS3.8 9.3.8), source: service user: what a TLS probe says once its handshake is done.
A_ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])
# The network, not the peer's judgement of a certificate: worth trying again.
SSL_NETWORK_ERRORS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def _tls_refusal(destination: DicomDestination, context: ssl.SSLContext, timeout_s: float) -> str | None:
    """Why TLS with ``destination`` fails, or None where it works (then the fault lies elsewhere).

    pynetdicom only logs why its handshake failed, so this handshake is made again with the same
    context to learn it. Under TLS 1.3 the server judges the client's certificate after the
    handshake is done on the client's side: its verdict is the answer to the first bytes sent, an
    A-ABORT, which a server that accepted the certificate answers by closing the connection.
    """
    host = destination.host
    try:
        with (
            socket.create_connection((host, destination.port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            try:
                tls.sendall(A_ABORT)
            except (BrokenPipeError, ConnectionResetError, *SSL_NETWORK_ERRORS):
                pass  # it hung up at once: its alert, if any, is read next
            tls.recv(1)
    except ssl.SSLCertVerificationError as err:
        return f"the destination's certificate is refused, certificate verify failed: {err.verify_message}"
    except SSL_NETWORK_ERRORS:
        return None
    except ssl.SSLError as err:
        words = tls_reason(err)  # an alert from the destination, e.g. "tlsv1 alert unknown ca"
        offered = destination.tls is not None and destination.tls.certificate is not None
        if "certificate" in words or "unknown ca" in words:
            if not offered:
                return f"the destination wants a client certificate and tls.certificate is not set: {words}"
            return f"the destination refused the node's client certificate (tls.certificate): {words}"
        if not offered:  # TLS 1.2 peers refuse a missing client certificate with a bare "handshake failure"
            return f"the handshake failed: {words} (tls.certificate is not set: does it want one?)"
        return f"the handshake failed: {words}"
    except OSError:  # refused, reset, timed out: the network
        return None
    return None


def send_by_c_store(
    destination: DicomDestination, paths: list[Path], calling_ae: str, timeout_s: float
) -> str:
    """Store every file on ``destination`` in one association; success only if all are accepted.

    Every wait (the association, each response, each read) ends after ``timeout_s``: a PACS that
    does not answer costs that and a retry, not a worker. A permanent rejection of the association
    (an AE title it does not know) raises :class:`DeliveryRefusedError` at once, and so does a TLS
    handshake that fails on a certificate (ours or the destination's), with the TLS reason.
    """
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    try:
        context = client_context(destination.tls, where) if destination.tls is not None else None
    except TlsFileError as err:
        raise DeliveryRefusedError(str(err)) from err
    datasets = [dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = timeout_s
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    for sop_class, syntax in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        ae.add_requested_context(sop_class, [syntax])
    # pynetdicom makes the TCP connection and the TLS handshake within connection_timeout.
    tls_args = (context, destination.host) if context is not None else None
    started = time.monotonic()
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
        # It answered, but took none of what is to be sent (pynetdicom then aborts).
        _refuse_contexts(
            where, {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.rejected_contexts}
        )
    if not assoc.is_established:
        rejection = assoc.acceptor.primitive if assoc.is_rejected else None
        if rejection is None and context is not None:
            # A failure that took the whole timeout was a wait, not a verdict on a certificate.
            quick = time.monotonic() - started < timeout_s
            refusal = _tls_refusal(destination, context, timeout_s) if quick else None
            if refusal is not None:
                raise DeliveryRefusedError(f"{where}: TLS: {refusal}")
            raise DestinationUnavailableError(
                f"{where}: no answer over TLS (connection refused, timed out, or closed in the handshake)"
            )
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
            # pynetdicom leaves the connected socket with no timeout: a peer stalling inside a PDU
            # would hold the worker for good.
            sock.settimeout(timeout_s)
        accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
        wanted = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
        _refuse_contexts(where, wanted - accepted)
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


def _refuse_contexts(where: str, refused: set[tuple[str, str]]) -> None:
    """A PACS that does not take a storage class (or its transfer syntax) will not take it on a
    retry either: refused at once, naming what it lacks."""
    if refused:
        abstract, transfer = (UID(uid) for uid in sorted(refused)[0])
        raise DeliveryRefusedError(
            f"{where} does not take {abstract.name} in {transfer.name} (it answered, but not for that "
            "presentation context): enable that storage class on it, or send it other outputs"
        )
