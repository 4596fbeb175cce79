"""How a C-STORE's data set gets from the association into a staged file of the storage.

:class:`PlainPath` uses pynetdicom's public API alone: the data set arrives whole in memory, and is
written and fsynced while the handler reads its header. The fast path (node/receive/fastpath/)
replaces parts of pynetdicom's per-instance work and runs only where it was tested.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from io import BytesIO
from typing import Any, BinaryIO, Protocol, cast

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE

from node.core.config import ScpSettings
from node.receive.part10 import file_preamble
from node.receive.spool_files import StagedFile
from node.receive.storage import Storage

log = logging.getLogger(__name__)

Handler = tuple[Any, Callable[..., Any]]
DataSetSource = tuple[BinaryIO | BytesIO, int]


class ReceivePath(Protocol):
    """What the listener asks of a receive path."""

    name: str

    def handlers(self) -> list[Handler]:
        """Event handlers bound beside the C-STORE handler."""
        ...

    def staged(self, event: evt.Event) -> StagedFile:
        """The C-STORE's bytes on their way into a temporary file; raises StorageFullError."""
        ...

    def data_set(self, event: evt.Event) -> AbstractContextManager[DataSetSource]:
        """The received data set to read the header from, and where it starts."""
        ...


class PlainPath:
    """pynetdicom's public API: handlers, events and the request's encoded data set."""

    name = "plain pynetdicom"

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def handlers(self) -> list[Handler]:
        return []

    def staged(self, event: evt.Event) -> StagedFile:
        request = cast(C_STORE, event.request)
        preamble = file_preamble(
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
            str(event.context.transfer_syntax),
            event.assoc.requestor.ae_title,
        )
        return self.storage.stage([preamble, cast(BytesIO, request.DataSet).getbuffer()])

    def data_set(self, event: evt.Event) -> AbstractContextManager[DataSetSource]:
        return nullcontext((cast(BytesIO, cast(C_STORE, event.request).DataSet), 0))


def _fast_path_refusal(settings: ScpSettings) -> str | None:
    """Why the settings' receive path is the plain one; None when it is the fast path."""
    if not settings.fast_path:
        return "scp.fast_path is off"
    from node.receive import fastpath

    reason = fastpath.unavailable()
    return None if reason is None else f"scp.fast_path is on but cannot run: {reason}"


def describe_path(settings: ScpSettings) -> str:
    """The receive path the settings give, in words (for ``segnode config check``)."""
    refusal = _fast_path_refusal(settings)
    return f"plain pynetdicom ({refusal})" if refusal else "fast path (node/receive/fastpath)"


def choose_path(settings: ScpSettings, storage: Storage) -> ReceivePath:
    """The fast path when the settings ask for it and it can run here, else the plain one; the
    reason is logged when the fast path was asked for and cannot run."""
    refusal = _fast_path_refusal(settings)
    if refusal is None:
        from node.receive.fastpath.path import FastPath

        return FastPath(storage)
    if settings.fast_path:
        log.warning("%s; receiving with plain pynetdicom", refusal)
    return PlainPath(storage)
