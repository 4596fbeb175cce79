"""An instance's temporary file in the storage: written (while it arrives, or all at once) and
fsynced before it is renamed into place; a full disk is told apart from other write failures."""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

log = logging.getLogger(__name__)

DISK_FULL = "the storage disk is full"


class StorageFullError(OSError):
    """Less free space than the configured threshold, or the disk filled during the write."""


class StagedFile:
    """An instance's bytes on their way into a temporary file: written and fsynced by another
    thread (a flusher, or the association's receiving thread) while the handler reads the header
    (the disk wait hides the parsing), or by the handler's own when it asks first."""

    def __init__(self, future: Future[Path], size: int) -> None:
        self._future = future
        self.size = size

    def wait(self) -> Path:
        """The flushed temporary file; raises what the write raised."""
        return self._future.result()

    def discard(self) -> None:
        """Wait for the write to end and remove the temporary file: nothing of it is kept."""
        if self._future.exception() is None:
            self._future.result().unlink(missing_ok=True)


class Spool:
    """An instance's temporary file, written while the instance is still arriving (or all at once
    by :meth:`Storage.stage`).

    Each chunk goes to the page cache as it arrives, so that when the last one is in, only the
    fsync is left on the path of the acknowledgement: the copy of half a megabyte into the page
    cache happened while the sender was still sending (see benchmarks/RESULTS.md). Asking the
    disk to start writing each chunk back at once (``sync_file_range``) was measured too: it made
    the final fsync shorter but cost the receiving thread more than that, and is not done.

    :meth:`write` never raises (it runs in pynetdicom's receiving thread, which must keep
    decoding the association): a failed write is kept and raised by the :class:`StagedFile` that
    :meth:`finish` returns, so the instance is refused like any other that could not be written.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.size = 0
        self._fd: int | None = fd
        self._error: OSError | None = None
        self._staged: StagedFile | None = None
        self._lock = threading.Lock()

    def write(self, chunk: bytes | memoryview) -> None:
        with self._lock:
            if self._fd is None:
                return
            try:
                view = memoryview(chunk).cast("B")
                while view:
                    view = view[os.write(self._fd, view) :]
                self.size += len(chunk)
            except OSError as err:
                self._error = StorageFullError(err.errno, DISK_FULL) if is_full(err) else err
                self._close_and_remove()

    def finish(self) -> StagedFile:
        """The spool as a staged file, the same one on every call. The first caller fsyncs it,
        on its own thread: the receiving thread as the last fragment arrives (it has nothing to
        read until the response is sent; a flusher thread would cost each instance two more
        hand-overs of the GIL), while the handler reads the header and then waits for it."""
        staged = self._staged
        if staged is not None:  # without the lock, which the flush holds while it waits for the disk
            return staged
        flushed: Future[Path] = Future()
        with self._lock:
            if self._staged is not None:
                return self._staged
            self._staged = staged = StagedFile(flushed, self.size)
        try:
            flushed.set_result(self._flush())
        except BaseException as err:  # the caller of wait() gets it
            flushed.set_exception(err)
            if not isinstance(err, Exception):
                raise
        return staged

    def discard(self) -> None:
        """Remove the temporary file: the instance was refused or never arrived whole."""
        with self._lock:
            self._close_and_remove()

    def write_and_flush(self, pieces: Sequence[bytes | memoryview]) -> Path:
        """Write a whole instance and fsync it (on a flusher thread, for :meth:`Storage.stage`)."""
        for piece in pieces:
            self.write(piece)
        return self._flush()

    def _flush(self) -> Path:
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._fd is None:
                raise FileNotFoundError(errno.ENOENT, "the spool was discarded", str(self.path))
            try:
                os.fsync(self._fd)
            except OSError as err:
                self._close_and_remove()
                if is_full(err):
                    raise StorageFullError(err.errno, DISK_FULL) from err
                raise
            fd, self._fd = self._fd, None  # forgotten first: a failed close has freed it anyway
            try:
                os.close(fd)
            except OSError:
                self.path.unlink(missing_ok=True)
                raise
        return self.path

    def _close_and_remove(self) -> None:
        """Close and remove the file; never raises (its callers run in pynetdicom's threads)."""
        fd, self._fd = self._fd, None
        try:
            if fd is not None:
                os.close(fd)
        except OSError:
            pass  # the descriptor is released whatever close reports
        try:
            self.path.unlink(missing_ok=True)
        except OSError as err:
            log.warning("temporary file %s could not be removed (%s)", self.path.name, err.strerror)


def is_full(err: OSError) -> bool:
    """A full disk (or quota): the SCP answers out of resources instead of a processing failure."""
    return err.errno in (errno.ENOSPC, errno.EDQUOT)
