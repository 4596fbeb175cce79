"""C-STORE data sets written to the storage while they arrive, not after.

pynetdicom hands a data set to the handler when its last fragment has arrived; only then could the
node write the file and wait for the disk. Here each C-STORE's data set goes into a
:class:`SpoolingStream` as soon as its command set is decoded: the fragments go to a temporary file
(the middle ones straight from the PDU reader, pdu_reads.py) and the receiving thread fsyncs it as
the last one arrives, while the handler reads the header back (:func:`received_data_set`). A data
set that arrives whole with its command is left to the plain path; spools of an association that
ends mid-instance are removed when it closes.
"""

from __future__ import annotations

import logging
import mmap
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from typing import Any, BinaryIO, cast

from pydicom.multival import MultiValue
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from node.receive.fastpath.pdu_reads import Divert, data_fragments, install_reader
from node.receive.part10 import file_preamble
from node.receive.spool_files import Spool, StagedFile, StorageFullError
from node.receive.storage import Storage

log = logging.getLogger(__name__)


class SpoolingStream(BytesIO):
    """A C-STORE data set on its way to its spool file; nothing of it is kept in memory.

    A ``BytesIO`` because pynetdicom holds a message's data set as one; it only ever writes to it.
    The handler reads the data set back from the file (:func:`received_data_set`).
    """

    def __init__(self, spool: Spool, start: int, context_id: int) -> None:
        super().__init__()
        self.spool = spool
        self.start = start  # where the data set begins in the file, after the preamble
        self.context_id = context_id

    def write(self, data: Any) -> int:
        self.spool.write(data)
        return len(memoryview(data))


@contextmanager
def received_data_set(stream: BytesIO) -> Iterator[tuple[BinaryIO | BytesIO, int]]:
    """A C-STORE's data set to read: its spool file mapped into memory (still in the page cache;
    read with ordinary reads, the header cost four senders 5% of their throughput in system calls
    that each let another thread take the GIL), or the stream itself for an instance that was not
    spooled; with the offset where the data set starts.

    Raises ``OSError`` when the spool file cannot be read back (its write failed: the staged
    file says why).
    """
    if not isinstance(stream, SpoolingStream):
        yield stream, 0
        return
    with (
        open(stream.spool.path, "rb") as file,
        mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
    ):
        yield cast(BinaryIO, mapped), stream.start


class Spooler:
    """Makes the associations of one listener spool their C-STORE data sets into ``storage``.

    Bind :meth:`opened` and :meth:`closed` to ``EVT_CONN_OPEN`` and ``EVT_CONN_CLOSE``; the
    C-STORE handler takes each instance's file from :meth:`staged`.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._lock = threading.Lock()
        self._unclaimed: dict[int, set[Spool]] = {}

    def opened(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._lock:  # an id left by an association whose receiving thread died: its spools go
            stale = self._unclaimed.pop(id(assoc), set())
            self._unclaimed[id(assoc)] = set()
        _discard_all(stale)
        receiver, divert = self._receiver(assoc, assoc.dimse.receive_primitive)
        # An instance attribute: pynetdicom's state machine calls ``assoc.dimse.receive_primitive``.
        assoc.dimse.receive_primitive = receiver  # type: ignore[method-assign,assignment]
        if assoc.dul.socket is not None:
            install_reader(assoc.dul.socket, divert)

    def closed(self, event: evt.Event) -> None:
        with self._lock:
            left = self._unclaimed.pop(id(event.assoc), set())
        _discard_all(left)
        if left:
            log.info(
                "association from %s ended: %d unfinished instance(s) discarded",
                event.assoc.requestor.ae_title,
                len(left),
            )

    def staged(self, event: evt.Event) -> StagedFile | None:
        """The C-STORE's spooled data set as a staged file, fsynced or being fsynced; None for a
        data set that was not spooled (it arrived whole with its command).

        Raises :class:`StorageFullError` below the free-space threshold.
        """
        stream = cast(C_STORE, event.request).DataSet
        if not isinstance(stream, SpoolingStream):
            return None
        with self._lock:
            self._unclaimed.get(id(event.assoc), set()).discard(stream.spool)
        try:  # the threshold holds at the end of an instance too, as for one staged whole
            self.storage.check_free_space()
        except StorageFullError:
            stream.spool.discard()
            raise
        return stream.spool.finish()

    def _receiver(
        self, assoc: Association, receive: Callable[[P_DATA], None]
    ) -> tuple[Callable[[P_DATA], None], Divert]:
        """pynetdicom's ``receive_primitive`` wrapped to spool, and the association's PDU
        reader's ``divert``: both run in its receiving thread."""
        syntaxes: dict[int, str] = {}  # filled on the first data set: contexts are negotiated later
        arriving: list[SpoolingStream] = []  # the data set being spooled, if any
        tried: list[object] = []  # the message a spool was tried for (not again for each P-DATA)

        def receive_and_spool(primitive: P_DATA) -> None:
            try:
                receive(primitive)
            except BaseException:  # pynetdicom's receiving thread ends: nothing will close the spool
                self._drop(assoc, arriving)
                raise
            message = assoc.dimse.message
            if message is None:  # no message, or one just completed and queued for its handler
                tried.clear()
                if arriving:  # its fsync starts before the handler is even called
                    self._complete(arriving)
                return
            if isinstance(message, C_STORE_RQ) and not (tried and tried[0] is message):
                tried[:] = [message]
                if not syntaxes:
                    syntaxes.update(
                        (cast(int, cx.context_id), str(cx.transfer_syntax[0]))
                        for cx in assoc.accepted_contexts
                    )
                syntax = syntaxes.get(cast(int, message.context_id))
                stream = self._spool(assoc, message, syntax) if syntax is not None else None
                if stream is not None:
                    message.data_set = stream
                    arriving.append(stream)

        def divert(body: memoryview) -> Callable[[], None] | None:
            """Middle fragments of the data set being spooled: the function that writes them."""
            if not arriving:
                return None
            stream = arriving[-1]
            fragments = data_fragments(body, stream.context_id)
            if fragments is None:
                return None

            def write() -> None:
                for fragment in fragments:
                    stream.write(fragment)

            return write

        return receive_and_spool, divert

    def _complete(self, arriving: list[SpoolingStream]) -> None:
        """The data set is whole: its file is fsynced here, on the receiving thread
        (:meth:`Spool.finish`), while the handler reads the header."""
        arriving.pop().spool.finish()  # never raises: the handler's wait() does

    def _drop(self, assoc: Association, arriving: list[SpoolingStream]) -> None:
        spools = {stream.spool for stream in arriving}
        arriving.clear()
        with self._lock:
            self._unclaimed.get(id(assoc), set()).difference_update(spools)
        _discard_all(spools)

    def _spool(self, assoc: Association, message: C_STORE_RQ, syntax: str) -> SpoolingStream | None:
        """A spool for ``message``'s data set with what arrived so far; None if none can be made.

        Never raises: it runs in pynetdicom's receiving thread, and a request it cannot spool
        (malformed, storage full) is kept in memory and answered by the handler as before.
        """
        try:
            command = message.command_set
            preamble = file_preamble(
                _first(command.get("AffectedSOPClassUID")),
                _first(command.get("AffectedSOPInstanceUID")),
                syntax,
                assoc.requestor.ae_title,
            )
            spool = self.storage.open_spool()
        except StorageFullError:
            return None
        except Exception as err:  # noqa: BLE001 - malformed command set, no temporary file, ...
            log.warning("cannot spool an instance (%s); it is kept in memory", type(err).__name__)
            return None
        spool.write(preamble)
        spool.write(cast(BytesIO, message.data_set).getvalue())  # what arrived with the command
        with self._lock:
            self._unclaimed.setdefault(id(assoc), set()).add(spool)
        return SpoolingStream(spool, len(preamble), cast(int, message.context_id))


def _first(value: object) -> str:
    """A command set UID as pynetdicom reads it: the first of several values, "" when absent."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return str(value[0]) if len(value) else ""
    return str(value)


def _discard_all(spools: set[Spool]) -> None:
    for spool in spools:
        spool.discard()  # never raises: the event's other handlers (reactor pace) still run
