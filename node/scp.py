"""The DICOM listener: C-ECHO and C-STORE, one handler per event.

The C-STORE handler validates, stores durably and records, then answers with a named status. Nothing
else happens on the association thread: assembly and routing run elsewhere.
"""

from __future__ import annotations

import enum
import logging
import socket
import ssl
from io import BytesIO
from typing import Any, cast

from pydicom import Dataset
from pydicom import uid as tsuid
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from node import reactor_pace
from node.config import ScpSettings
from node.part10 import TruncatedDataSetError, read_header
from node.spooling import Spooler, received_data_set
from node.storage import (
    InstanceFacts,
    InvalidUIDError,
    StagedFile,
    Storage,
    StorageFullError,
    StoreOutcome,
)
from node.store_response import pack_store_responses
from node.uids import is_valid_uid

log = logging.getLogger(__name__)

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

VERIFICATION = "1.2.840.10008.1.1"

# Private storage classes a CT scanner commonly sends with a study (Siemens CSA non-image).
PRIVATE_STORAGE_CLASSES = ["1.3.12.2.1107.5.9.1"]

# Image storage classes that must carry Pixel Data to be what they claim.
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
}


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
    if vr not in ("UI", "CS", "DS"):  # UN (some gateways send it) and anything odd: pydicom decides
        return _text(ds, keyword)
    if not element.value:
        return ""
    text = element.value.decode("latin-1")  # pydicom's default for these VRs
    if vr == "UI":
        return "\\".join(v.rstrip("\0 ") for v in text.split("\\"))
    return "\\".join(v.strip(" ") for v in text.split("\\"))


def instance_facts(ds: Dataset, transfer_syntax_uid: str) -> InstanceFacts:
    thickness = _ascii(ds, "SliceThickness").split("\\")[0].strip()
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
    )


class StoreHandler:
    """The C-STORE handler bound to ``evt.EVT_C_STORE``."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.spooler = Spooler(storage)

    def __call__(self, event: evt.Event) -> Dataset:
        request_uid = str(getattr(event.request, "AffectedSOPInstanceUID", ""))
        calling_ae = event.assoc.requestor.ae_title
        stream = cast(BytesIO, cast(C_STORE, event.request).DataSet)
        syntax = event.context.transfer_syntax
        try:  # the file is flushed while the header is read
            staged = self.spooler.staged(event)
        except StorageFullError as err:
            return _not_stored(err, calling_ae, request_uid)
        status = self._store(staged, stream, syntax, calling_ae, request_uid)
        if int(status.Status) != StoreStatus.SUCCESS:
            staged.discard()  # refused before or while storing: nothing of it is kept
        return status

    def _store(
        self,
        staged: StagedFile,
        stream: BytesIO,
        syntax: UID,
        calling_ae: str,
        request_uid: str,
    ) -> Dataset:
        try:
            with received_data_set(stream) as (source, start):
                ds, has_pixels = read_header(source, syntax, start)
            facts = instance_facts(ds, str(syntax))
        except OSError:  # its spool file could not be written: the staged file says why
            return self._write_failure(staged, calling_ae, request_uid)
        except TruncatedDataSetError:
            log.warning("C-STORE from %s: instance %s is truncated", calling_ae, request_uid)
            return _status(StoreStatus.CANNOT_UNDERSTAND, "data set is truncated")
        except Exception as err:  # noqa: BLE001 - any decoding fault means the data set is unreadable
            log.warning("C-STORE from %s: data set cannot be parsed (%s)", calling_ae, type(err).__name__)
            return _status(StoreStatus.CANNOT_UNDERSTAND, "data set cannot be parsed")
        if facts.sop_instance_uid != request_uid:
            return _status(StoreStatus.CANNOT_UNDERSTAND, "SOPInstanceUID differs from the C-STORE request")
        if not is_valid_uid(facts.sop_class_uid):  # recorded, and routed on: a UID like the others
            log.warning("C-STORE from %s: instance %s has an invalid SOPClassUID", calling_ae, request_uid)
            return _status(StoreStatus.CANNOT_UNDERSTAND, "SOPClassUID is not a valid DICOM UID")
        if facts.sop_class_uid in IMAGE_SOP_CLASSES and not has_pixels:
            log.warning("C-STORE from %s: image %s has no Pixel Data", calling_ae, request_uid)
            return _status(StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "image has no Pixel Data")
        try:
            outcome = self.storage.store(staged, facts, calling_ae)
        except InvalidUIDError as err:
            log.warning("C-STORE from %s refused: %s", calling_ae, err)
            return _status(StoreStatus.CANNOT_UNDERSTAND, str(err))
        except Exception as err:  # noqa: BLE001 - every fault of the storage is answered by name
            return _not_stored(err, calling_ae, request_uid)
        if outcome is StoreOutcome.DUPLICATE:
            log.info("C-STORE from %s: instance %s already stored; kept once", calling_ae, request_uid)
        return _status(StoreStatus.SUCCESS)

    def _write_failure(self, staged: StagedFile, calling_ae: str, request_uid: str) -> Dataset:
        """The answer for a spool file that cannot be read back: why its write failed."""
        try:
            staged.wait()
        except Exception as err:  # noqa: BLE001 - answered by name below
            return _not_stored(err, calling_ae, request_uid)
        return _not_stored(OSError("written but not readable"), calling_ae, request_uid)


def _not_stored(err: Exception, calling_ae: str, request_uid: str) -> Dataset:
    """The answer for an instance the storage could not keep: out of resources when it is full."""
    if isinstance(err, StorageFullError):
        log.error("C-STORE from %s refused, storage full: %s", calling_ae, err.strerror)
        return _status(StoreStatus.OUT_OF_RESOURCES, "storage full")
    log.error("C-STORE from %s: instance %s could not be stored", calling_ae, request_uid, exc_info=err)
    return _status(StoreStatus.PROCESSING_FAILURE, "instance could not be stored")


def _set_nodelay(event: evt.Event) -> None:
    """pynetdicom leaves Nagle's algorithm on, which stalls each small PDU by ~40 ms on loopback."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def configure_pynetdicom() -> None:
    """pynetdicom's process-wide switches, set once where the node starts.

    Its default logs request identifiers (patient name and id) and describes every message for
    debug logging; its reactor threads poll, and wait as node/reactor_pace.py makes them.
    """
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    # Its standard handlers decode and describe every PDU and DIMSE message for debug logging:
    # ~0.5 ms of CPU an instance, for lines the WARNING level below throws away.
    _config.LOG_HANDLER_LEVEL = "none"
    # Its own writing of received data sets to files would leave node/spooling.py only the preamble.
    _config.STORE_RECV_CHUNKED_DATASET = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    reactor_pace.install()


def build_ae(settings: ScpSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.require_calling_aet = list(settings.allowed_calling_aes)
    ae.add_supported_context(VERIFICATION)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    for sop_class in PRIVATE_STORAGE_CLASSES:
        ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


class _SharedUIDContext(PresentationContext):
    """A supported presentation context whose copy shares its (immutable) UIDs.

    pynetdicom deep-copies the listener's supported contexts for every association it accepts;
    every UID copied is validated again against the UID grammar (pydicom's ``UID.__new__``):
    14 ms of CPU, under the GIL, for each association with the node's ~160 storage classes and 13
    transfer syntaxes, while other associations are storing. Here a copy is an object with its own
    list of transfer syntaxes and the same UID objects: what negotiation changes is still the copy's.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedUIDContext:
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy._transfer_syntax = list(self._transfer_syntax)
        return copy


def supported_contexts(ae: AE) -> list[PresentationContext]:
    """``ae``'s supported presentation contexts, cheap to copy for each association."""
    contexts: list[PresentationContext] = []
    for context in ae.supported_contexts:
        shared = _SharedUIDContext()
        shared.__dict__.update(context.__dict__)
        contexts.append(shared)
    return contexts


def _ssl_context(settings: ScpSettings) -> ssl.SSLContext | None:
    if settings.tls_certificate is None or settings.tls_private_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
    return context


def start_scp(settings: ScpSettings, storage: Storage) -> ThreadedAssociationServer:
    """Start listening in background threads; call ``shutdown()`` on the result to stop."""
    configure_pynetdicom()
    ae = build_ae(settings)
    store = StoreHandler(storage)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, store),
        (evt.EVT_CONN_OPEN, _set_nodelay),
        (evt.EVT_CONN_OPEN, store.spooler.opened),
        (evt.EVT_CONN_OPEN, pack_store_responses),
        (evt.EVT_CONN_CLOSE, store.spooler.closed),
        (evt.EVT_CONN_OPEN, reactor_pace.Wakeups.opened),
    ]
    server = ae.start_server(
        (settings.host, settings.port),
        block=False,
        evt_handlers=handlers,
        ssl_context=_ssl_context(settings),
        contexts=supported_contexts(ae),
    )
    assert server is not None  # non-blocking start returns the server
    log.info("DICOM listener %s on %s:%d", settings.ae_title, settings.host, settings.port)
    return server
