"""The DICOM listener: C-ECHO and C-STORE, one handler per event.

The C-STORE handler validates, stores durably and records, then answers with a named status. Nothing
else happens on the association thread: assembly and routing run elsewhere.
"""

from __future__ import annotations

import enum
import logging
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pydicom import uid as tsuid
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.transport import ThreadedAssociationServer

from node.core.config import ScpSettings
from node.core.dicom import CT_IMAGE_CLASSES, VERIFICATION, rejection_reason
from node.core.outages import Outage
from node.core.uids import is_valid_uid
from node.receive.part10 import InflatesTooFarError, TruncatedDataSetError, read_header
from node.receive.paths import ReceivePath, choose_path
from node.receive.slots import AssociationSlots, Semaphore
from node.receive.spool_files import StagedFile, StorageFullError
from node.receive.storage import InstanceFacts, RefusedInstanceError, Storage, StoreOutcome

log = logging.getLogger(__name__)

# How often a stopping listener looks whether its associations ended, and how long it waits for
# the aborted ones to go.
STOP_POLL_S = 0.05
ABORT_WAIT_S = 5.0

# Every transfer syntax the node accepts and can decode; stored as received, never transcoded.
ACCEPTED_TRANSFER_SYNTAXES = [
    tsuid.ExplicitVRLittleEndian,
    tsuid.ImplicitVRLittleEndian,
    tsuid.DeflatedExplicitVRLittleEndian,
    tsuid.ExplicitVRBigEndian,
    tsuid.JPEGBaseline8Bit,
    tsuid.JPEGExtended12Bit,
    tsuid.JPEGLossless,
    tsuid.JPEGLosslessSV1,
    tsuid.JPEGLSLossless,
    tsuid.JPEGLSNearLossless,
    tsuid.JPEG2000Lossless,
    tsuid.JPEG2000,
    tsuid.RLELossless,
]

# Private storage classes a CT scanner commonly sends with a study (Siemens CSA non-image).
PRIVATE_STORAGE_CLASSES = ["1.3.12.2.1107.5.9.1"]


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses (PS3.4 GG.4-1 and PS3.7 C)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110


def _status(status: StoreStatus, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = int(status)
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _ascii(ds: Dataset, keyword: str) -> str:
    """A UI or CS value (ASCII by definition) as pydicom would give it, values joined by ``\\``,
    read from the undecoded element: pydicom's conversion and validation of the ten values the
    node keeps cost 0.2 ms an instance, more than the rest of reading the header."""
    element = ds.get_item(keyword)
    if not isinstance(element, RawDataElement):
        return _text(ds, keyword)
    vr = element.VR or dictionary_VR(element.tag)  # implicit VR: the dictionary's
    if vr not in ("UI", "CS", "DS", "IS"):  # UN (some gateways send it) and anything odd: pydicom decides
        return _text(ds, keyword)
    if not element.value:
        return ""
    text = element.value.decode("latin-1")  # pydicom's default for these VRs
    if vr == "UI":
        return "\\".join(v.rstrip("\0 ") for v in text.split("\\"))
    return "\\".join(v.strip(" ") for v in text.split("\\"))


def instance_facts(ds: Dataset, transfer_syntax_uid: str) -> InstanceFacts:
    thickness = _ascii(ds, "SliceThickness").split("\\")[0].strip()
    orientation, position = geometry(
        _ascii(ds, "ImageOrientationPatient"), _ascii(ds, "ImagePositionPatient")
    )
    images = _ascii(ds, "ImagesInAcquisition").split("\\")[0].strip()
    return InstanceFacts(
        study_uid=_ascii(ds, "StudyInstanceUID"),
        series_uid=_ascii(ds, "SeriesInstanceUID"),
        sop_instance_uid=_ascii(ds, "SOPInstanceUID"),
        sop_class_uid=_ascii(ds, "SOPClassUID"),
        transfer_syntax_uid=transfer_syntax_uid,
        modality=_ascii(ds, "Modality"),
        image_type=_ascii(ds, "ImageType"),
        series_description=_text(ds, "SeriesDescription"),  # LO: its character set decides
        body_part=_ascii(ds, "BodyPartExamined"),
        slice_thickness=float(thickness) if thickness else None,
        orientation=orientation,
        slice_position=position,
        images_in_acquisition=int(images) if images.isdigit() and int(images) > 0 else None,
    )


def geometry(orientation: str, position: str) -> tuple[str, float | None]:
    """An image's orientation (rounded, to compare) and its position along the orientation's normal;
    ("", None) when either is missing or malformed."""
    try:
        cosines = [float(v) for v in orientation.split("\\")]
        point = [float(v) for v in position.split("\\")]
    except ValueError:
        return "", None
    if len(cosines) != 6 or len(point) != 3:
        return "", None
    (a, b, c), (d, e, f) = cosines[:3], cosines[3:]
    normal = (b * f - c * e, c * d - a * f, a * e - b * d)
    if not 0.8 < sum(n * n for n in normal) < 1.2:  # not two orthogonal unit vectors
        return "", None
    rounded = "\\".join(f"{v:.4f}" for v in cosines).replace("-0.0000", "0.0000")
    return rounded, sum(n * p for n, p in zip(normal, point, strict=True))


@dataclass
class _Sent:
    """What one association has sent: the series it stored instances of, and whether the node
    refused any instance."""

    thread: threading.Thread
    series: set[str] = field(default_factory=set)
    refused: bool = False


class StoreHandler:
    """The C-STORE handler bound to ``evt.EVT_C_STORE``."""

    def __init__(self, storage: Storage, path: ReceivePath) -> None:
        self.storage = storage
        self.path = path
        self.storing = Outage(log, "storing instances")
        self.disk_full = Outage(log, "the storage disk (full)")
        # What each open association has sent so far, for fast completion.
        self._sent: dict[int, _Sent] = {}
        self._sent_lock = threading.Lock()

    def released(self, event: evt.Event) -> None:
        """Bound to ``EVT_RELEASED``: the sender says it is done, which fast completion heeds
        unless the node refused one of its instances (the sender will send it again)."""
        sent = self._forget(event)
        self._count("released")
        if sent is not None and sent.series and not sent.refused:
            try:
                self.storage.mark_released(sent.series)
            except Exception as err:  # noqa: BLE001 - the quiet period completes these series instead
                log.warning(
                    "association released but not recorded (%s): its series wait out the quiet period", err
                )

    def aborted(self, event: evt.Event) -> None:
        """Bound to ``EVT_ABORTED``: an aborted association says nothing about its series."""
        self._forget(event)
        self._count("aborted")

    def rejected(self, event: evt.Event) -> None:
        """Bound to ``EVT_REJECTED``: said in the log, counted for the metrics."""
        _log_rejection(event)
        self._count("rejected")

    def _count(self, result: str) -> None:
        try:
            self.storage.count_association(result)
        except Exception as err:  # noqa: BLE001 - a metric is not worth failing an association over
            log.debug("association %s not counted (%s)", result, type(err).__name__)

    def _forget(self, event: evt.Event) -> _Sent | None:
        """What ``event``'s association sent, forgotten with what every association that ended
        without a word (its thread died) sent."""
        with self._sent_lock:
            sent = self._sent.pop(id(event.assoc), None)
            for key in [k for k, other in self._sent.items() if not other.thread.is_alive()]:
                del self._sent[key]
        return sent

    def _of(self, event: evt.Event) -> _Sent:
        """Call with ``_sent_lock`` held."""
        return self._sent.setdefault(id(event.assoc), _Sent(event.assoc))

    def __call__(self, event: evt.Event) -> Dataset:
        request_uid = str(getattr(event.request, "AffectedSOPInstanceUID", ""))
        calling_ae = event.assoc.requestor.ae_title
        try:  # the file is flushed while the header is read
            staged = self.path.staged(event)
        except StorageFullError as err:
            status = self._not_stored(err)
        else:
            status = self._store(staged, event, calling_ae, request_uid)
            if int(status.Status) != StoreStatus.SUCCESS:
                staged.discard()  # refused before or while storing: nothing of it is kept
        if int(status.Status) != StoreStatus.SUCCESS:
            with self._sent_lock:
                self._of(event).refused = True
        return status

    def _store(
        self,
        staged: StagedFile,
        event: evt.Event,
        calling_ae: str,
        request_uid: str,
    ) -> Dataset:
        syntax = event.context.transfer_syntax
        try:
            with self.path.data_set(event) as (source, start):
                ds, has_pixels = read_header(source, syntax, start)
            facts = instance_facts(ds, str(syntax))
        except OSError:  # its spool file could not be written: the staged file says why
            return self._write_failure(staged)
        except TruncatedDataSetError:
            log.warning("C-STORE from %s: instance %s is truncated", calling_ae, request_uid)
            return _status(StoreStatus.CANNOT_UNDERSTAND, "data set is truncated")
        except InflatesTooFarError as err:
            log.warning("C-STORE from %s: instance %s refused: %s", calling_ae, request_uid, err)
            return _status(StoreStatus.CANNOT_UNDERSTAND, str(err))  # for good: not "try later"
        except Exception as err:  # noqa: BLE001 - any decoding fault means the data set is unreadable
            log.warning("C-STORE from %s: data set cannot be parsed (%s)", calling_ae, type(err).__name__)
            return _status(StoreStatus.CANNOT_UNDERSTAND, "data set cannot be parsed")
        if facts.sop_instance_uid != request_uid:
            log.warning(
                "C-STORE from %s: instance %s refused: the data set names another SOPInstanceUID",
                calling_ae,
                request_uid,
            )
            return _status(StoreStatus.CANNOT_UNDERSTAND, "SOPInstanceUID differs from the C-STORE request")
        if not is_valid_uid(facts.sop_class_uid):  # recorded, and routed on: a UID like the others
            log.warning("C-STORE from %s: instance %s has an invalid SOPClassUID", calling_ae, request_uid)
            return _status(StoreStatus.CANNOT_UNDERSTAND, "SOPClassUID is not a valid DICOM UID")
        if facts.sop_class_uid in CT_IMAGE_CLASSES and not has_pixels:
            log.warning("C-STORE from %s: image %s has no Pixel Data", calling_ae, request_uid)
            return _status(StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "image has no Pixel Data")
        try:
            outcome = self.storage.store(staged, facts, calling_ae)
        except RefusedInstanceError as err:
            log.warning("C-STORE from %s refused: %s", calling_ae, err)
            return _status(StoreStatus.CANNOT_UNDERSTAND, str(err))
        except Exception as err:  # noqa: BLE001 - every fault of the storage is answered by name
            return self._not_stored(err)
        self.storing.succeeded()
        self.disk_full.succeeded()
        with self._sent_lock:
            self._of(event).series.add(facts.series_uid)
        if outcome is StoreOutcome.DUPLICATE:
            log.info("C-STORE from %s: instance %s already stored; kept once", calling_ae, request_uid)
        elif outcome is StoreOutcome.OTHER_SYNTAX_DUPLICATE:
            log.info(
                "C-STORE from %s: instance %s already stored, now sent in another transfer syntax; "
                "the first copy is kept",
                calling_ae,
                request_uid,
            )
        elif outcome is StoreOutcome.CHANGED_DUPLICATE:
            log.warning(
                "C-STORE from %s: instance %s came again with other contents; the first copy is kept "
                "(a changed image needs a new SOPInstanceUID)",
                calling_ae,
                request_uid,
            )
        return _status(StoreStatus.SUCCESS)

    def _write_failure(self, staged: StagedFile) -> Dataset:
        """The answer for a spool file that cannot be read back: why its write failed."""
        try:
            staged.wait()
        except Exception as err:  # noqa: BLE001 - answered by name below
            return self._not_stored(err)
        return self._not_stored(OSError("written but not readable"))

    def _not_stored(self, err: Exception) -> Dataset:
        """The answer for an instance the storage could not keep: out of resources when it is
        full. Logged as an outage: one line when it starts, one with the count when it ends."""
        if isinstance(err, StorageFullError):
            self.disk_full.failed(err)
            return _status(StoreStatus.OUT_OF_RESOURCES, "storage full")
        self.storing.failed(err)
        return _status(StoreStatus.PROCESSING_FAILURE, "instance could not be stored")


def _log_rejection(event: evt.Event) -> None:
    """pynetdicom rejects (calling AE not allowed, association limit) without a log line at the
    node's level: say who was refused and why."""
    request, answer = event.assoc.requestor.primitive, event.assoc.acceptor.primitive
    calling = request.calling_ae_title if request is not None else "?"
    why = rejection_reason(answer.result_source, answer.diagnostic) if answer is not None else "rejected"
    log.warning("association from %s at %s refused: %s", calling, event.assoc.requestor.address, why)


def configure_pynetdicom() -> None:
    """pynetdicom's documented process-wide switches, set once where the node starts.

    Its default logs request identifiers (patient name and id), and its standard handlers decode
    and describe every PDU and DIMSE message for debug lines the WARNING level below throws away.
    """
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    # Its own writing of received data sets to files would bypass the node's storage.
    _config.STORE_RECV_CHUNKED_DATASET = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


REQUEST_WAIT_S = 10.0


def build_ae(settings: ScpSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    # pynetdicom counts a connection from its accept, the node (AssociationSlots) from its request:
    # connections that never ask (port probes, health checks) must not lock the senders out.
    ae.maximum_associations = max(4 * settings.max_associations, 64)
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.network_timeout = settings.network_timeout_s
    # How long a connection may take to ask for its association (a modality asks at once): pynetdicom
    # holds a connection that closed before asking until this runs out.
    ae.acse_timeout = min(settings.network_timeout_s, REQUEST_WAIT_S)
    ae.require_calling_aet = list(settings.allowed_calling_aes)
    ae.add_supported_context(VERIFICATION)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    for sop_class in PRIVATE_STORAGE_CLASSES:
        ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with every accepted socket tuned: TCP_NODELAY (pynetdicom
    leaves Nagle's algorithm on, which stalls each small PDU by ~40 ms on loopback), and the
    network timeout on every read and write, a TLS handshake included (pynetdicom bounds only the
    wait between PDUs: a peer that stalls inside one held its thread and its slot for good)."""

    reuse_port = False

    def server_bind(self) -> None:
        if self.reuse_port and self.socket is not None:  # the kernel spreads connections over them
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None  # a server that accepts is bound
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context is not None:
            try:
                client = self.ssl_context.wrap_socket(client, server_side=True)
            except OSError as err:  # no handshake, or a failed one: socketserver drops the request
                client.close()
                _log_tls_refusal(err, address)
                raise
        return client, address

    def shutdown(self) -> None:
        """Stop serving and close the socket. pynetdicom's own also removes the server from its
        AE's list, which only ``AE.start_server`` fills."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def stop_listening(server: ThreadedAssociationServer, grace_s: float) -> None:
    """Stop as a sender would want: new associations refused at once, open ones go on for up to
    ``grace_s`` (a study half sent may finish), then those left are aborted (A-ABORT). Only after
    this may the storage close: no instance is answered "not stored" because the node stops."""
    server.shutdown()  # accepts nothing more; the listening socket is closed
    deadline = time.monotonic() + grace_s
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(STOP_POLL_S)
    left = server.active_associations
    for assoc in left:
        assoc.abort()
    deadline = time.monotonic() + ABORT_WAIT_S
    while any(assoc.is_alive() for assoc in left) and time.monotonic() < deadline:
        time.sleep(STOP_POLL_S)
    if left:
        log.warning("listener stopped: %d association(s) still open after %g s aborted", len(left), grace_s)
    else:
        log.info("listener stopped; every association had ended")


def _log_tls_refusal(err: OSError, address: tuple[str, int]) -> None:
    """A handshake that failed on a certificate or a protocol is a refusal, logged as one; a caller
    that hung up or went silent (a port probe) is not."""
    if isinstance(err, ssl.SSLError) and not isinstance(err, ssl.SSLEOFError | ssl.SSLSyscallError):
        if isinstance(err, ssl.SSLCertVerificationError):
            why = f"certificate verify failed: {err.verify_message}"
        else:
            why = (err.reason or str(err)).lower().replace("_", " ")
        log.warning("TLS connection from %s refused: %s", address[0], why)


def _ssl_context(settings: ScpSettings) -> ssl.SSLContext | None:
    if settings.tls_certificate is None or settings.tls_private_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
    if settings.tls_ca_bundle is not None:  # mutual TLS: no certificate it vouches for, no handshake
        context.load_verify_locations(cafile=settings.tls_ca_bundle)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class SharedPortServer(NodeServer):
    """One of the node's several listener processes on the same port."""

    reuse_port = True


def start_scp(
    settings: ScpSettings,
    storage: Storage,
    path: ReceivePath | None = None,
    slots: Semaphore | None = None,
) -> ThreadedAssociationServer:
    """Start listening in background threads; call ``shutdown()`` on the result to stop.

    ``path`` is how instances are received, by default the one the settings choose; ``slots``
    counts the associations of every listener process of the node (then the port is shared),
    else this listener counts its own.
    """
    configure_pynetdicom()
    path = path or choose_path(settings, storage)
    ae = build_ae(settings)
    limits = AssociationSlots(
        slots or threading.BoundedSemaphore(settings.max_associations),
        settings.max_associations,
        settings.caller_limit,
        settings.address_limit,
    )
    store = StoreHandler(storage, path)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, store),
        (evt.EVT_RELEASED, store.released),
        (evt.EVT_ABORTED, store.aborted),
        (evt.EVT_REQUESTED, limits.requested),
        (evt.EVT_CONN_CLOSE, limits.closed),
        (evt.EVT_REJECTED, store.rejected),
        *path.handlers(),
    ]
    server = ae.make_server(
        (settings.host, settings.port),
        evt_handlers=handlers,
        ssl_context=_ssl_context(settings),
        server_class=NodeServer if slots is None else SharedPortServer,
    )
    thread = threading.Thread(target=server.serve_forever, name="segnode-listener", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    log.info("DICOM listener %s on %s:%d, receiving with %s", settings.ae_title, host, port, path.name)
    return server
