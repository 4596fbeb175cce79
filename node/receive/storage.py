"""Durable storage of received instances.

An instance is acknowledged only after it is safe: written to a temporary file in the same file
system, fsynced, renamed into ``<study>/<series>/<instance>.dcm`` (the folder fsynced too) and
recorded in the database. UIDs are checked against the UID grammar before they become path parts.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from node.core.files import fsync_dir
from node.core.uids import is_valid_uid
from node.db.models import ASSOCIATIONS, INSTANCES, SERIES, STUDIES, utcnow
from node.receive.instance_rows import InstanceRows
from node.receive.spool_files import DISK_FULL, Spool, StagedFile, StorageFullError, is_full

log = logging.getLogger(__name__)

INCOMING = ".incoming"
# Threads that write and fsync the files of :meth:`Storage.stage` (instances that arrived whole
# with their command; spooled ones are fsynced by their receiving thread): one per association
# that can be storing at once is plenty (a flush is a disk wait, not CPU).
FLUSH_THREADS = 8
# Free space is read again after this long, or at once when it was within the margin of the
# threshold: statvfs costs ~0.06 ms and is asked twice an instance.
UID_LOCKS = 256  # stores of one SOP Instance UID take turns; others rarely share a lock
FREE_SPACE_RECHECK_S = 0.1
FREE_SPACE_MARGIN = 256 * 1024 * 1024


@dataclass(frozen=True)
class InstanceFacts:
    """What the node keeps about an instance besides the file: UIDs and routing facts."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str = ""
    image_type: str = ""
    series_description: str = ""
    body_part: str = ""
    slice_thickness: float | None = None
    orientation: str = ""
    slice_position: float | None = None
    images_in_acquisition: int | None = None


class StoreOutcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    # The UID stored already with another data set (a corrected resend): the first copy is kept.
    CHANGED_DUPLICATE = "changed duplicate"
    # The UID stored already in another transfer syntax: the bytes cannot tell; the first is kept.
    OTHER_SYNTAX_DUPLICATE = "duplicate in another transfer syntax"


def _data_set_start(path: Path) -> int:
    """Where the data set begins in a file the node wrote (``node.receive.part10.file_preamble``:
    preamble, ``DICM``, then group 0002 led by its group length)."""
    with path.open("rb") as fh:
        fh.seek(140)
        return 144 + int.from_bytes(fh.read(4), "little")


def _resent(new: Path, kept: Path) -> StoreOutcome:
    """What a second copy of a stored instance is: the same data set, another one, or the same UID
    in another transfer syntax (a PACS that converts; compressed bytes say nothing of the image)."""
    if _transfer_syntax(new) != _transfer_syntax(kept):
        return StoreOutcome.OTHER_SYNTAX_DUPLICATE
    return StoreOutcome.DUPLICATE if _same_data_set(new, kept) else StoreOutcome.CHANGED_DUPLICATE


def _transfer_syntax(path: Path) -> str:
    try:
        return str(read_file_meta_info(path).get("TransferSyntaxUID", ""))
    except (InvalidDicomError, OSError, ValueError):
        return ""  # not a Part 10 file: only its bytes can be compared


def _same_data_set(a: Path, b: Path) -> bool:
    """Whether two received files hold the same data set (their File Meta may name other senders)."""
    start_a, start_b = _data_set_start(a), _data_set_start(b)
    if a.stat().st_size - start_a != b.stat().st_size - start_b:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        fa.seek(start_a)
        fb.seek(start_b)
        while chunk := fa.read(1 << 20):
            if chunk != fb.read(len(chunk)):
                return False
    return True


class RefusedInstanceError(ValueError):
    """An instance the node does not store, for a reason its sender can act on (``str(err)``)."""


class InvalidUIDError(RefusedInstanceError):
    """A UID that breaks the DICOM UID grammar: it never becomes a path."""


class UIDInAnotherSeriesError(RefusedInstanceError):
    """The SOP Instance UID is stored already, in another series or study: the sender reused it."""


class Storage:
    """Writes instances durably and records them; safe to call from many association threads.

    An instance goes through :meth:`stage` (its bytes to a fsynced temporary file, in the
    background) and :meth:`store` (renamed into place, folder fsynced, recorded).
    """

    def __init__(self, root: Path, engine: Engine, min_free_bytes: int, *, owner: bool = True) -> None:
        self.root = root
        self.engine = engine
        self.min_free_bytes = min_free_bytes
        self._incoming = root / INCOMING
        self._incoming.mkdir(parents=True, exist_ok=True)
        self._record_lock = threading.Lock()
        self._uid_locks = [threading.Lock() for _ in range(UID_LOCKS)]
        self._known_dirs: set[Path] = set()
        self._series_ids: dict[str, int] = {}
        self._rows = InstanceRows(engine)
        self._flusher = ThreadPoolExecutor(max_workers=FLUSH_THREADS, thread_name_prefix="segnode-flush")
        self._free_space: tuple[float, int] = (-FREE_SPACE_RECHECK_S, 0)  # when last read, how much
        if owner:  # the node's first process; its other listener processes start on a clean folder
            self._discard_leftovers()

    def close(self) -> None:
        """Let staged writes finish; call after the listener stopped."""
        self._flusher.shutdown(wait=True)
        self._rows.close()

    def _discard_leftovers(self) -> None:
        """Temporary files of a crashed process were never acknowledged: remove them."""
        for leftover in self._incoming.glob("*.part"):
            leftover.unlink(missing_ok=True)

    def relative_path(self, facts: InstanceFacts) -> Path:
        for name, value in (
            ("StudyInstanceUID", facts.study_uid),
            ("SeriesInstanceUID", facts.series_uid),
            ("SOPInstanceUID", facts.sop_instance_uid),
        ):
            if not is_valid_uid(value):
                raise InvalidUIDError(
                    f"{name} is not a valid DICOM UID (digits and dots, at most 64 characters)"
                )
        return Path(facts.study_uid) / facts.series_uid / f"{facts.sop_instance_uid}.dcm"

    def check_free_space(self) -> None:
        """Raise :class:`StorageFullError` below the threshold.

        Asked twice for every instance; the file system is asked at most every
        ``FREE_SPACE_RECHECK_S`` while it had more than ``FREE_SPACE_MARGIN`` above the threshold
        (more than the node can write in that time), every time closer to it.
        """
        now = time.monotonic()
        checked_at, free = self._free_space
        if now - checked_at < FREE_SPACE_RECHECK_S and free - self.min_free_bytes > FREE_SPACE_MARGIN:
            return
        free = shutil.disk_usage(self.root).free
        self._free_space = (now, free)
        if free < self.min_free_bytes:
            raise StorageFullError(
                errno.ENOSPC, f"only {free // 1_000_000} MB free in the storage folder, below the threshold"
            )

    def stage(self, pieces: Sequence[bytes | memoryview]) -> StagedFile:
        """Start writing an instance's file (``pieces``: its bytes, in order) to a temporary file.

        The writing and the fsync run on a flusher thread, while the caller goes on (the handler
        reads the header meanwhile). Raises :class:`StorageFullError` at once below the free-space
        threshold. The pieces must stay unchanged until the staged file is stored or discarded.
        """
        spool = self.open_spool()
        return StagedFile(self._flusher.submit(spool.write_and_flush, pieces), sum(len(p) for p in pieces))

    def open_spool(self) -> Spool:
        """A new, empty temporary file for an instance; the one way files enter the storage.

        Raises :class:`StorageFullError` below the free-space threshold (nothing is created).
        """
        self.check_free_space()
        temp = self._incoming / f"{uuid.uuid4().hex}.part"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as err:
            if is_full(err):
                raise StorageFullError(err.errno, DISK_FULL) from err
            raise
        return Spool(temp, fd)

    def store(
        self, data: StagedFile | Sequence[bytes | memoryview], facts: InstanceFacts, calling_ae: str
    ) -> StoreOutcome:
        """Rename a staged file into place and record the instance; durable on return.

        ``data`` may also be the file's bytes, staged here. A duplicate keeps the first copy (the
        staged file is discarded). Only when the file already exists is the database asked (a
        file without a row is a leftover of a crash before the commit, and is written again).
        When the row cannot be committed, the placed file is removed unless a row names it.
        """
        staged = data if isinstance(data, StagedFile) else self.stage(data)
        # One store of an instance at a time in this process: two copies arriving together (two
        # associations, two parts of a STOW-RS request) would otherwise leave one's file under the
        # other's row.
        with self._uid_locks[hash(facts.sop_instance_uid) % len(self._uid_locks)]:
            try:
                relative = self.relative_path(facts)
                target = self.root / relative
                if target.exists() and self._already_recorded(facts.sop_instance_uid):
                    resent = _resent(staged.wait(), target)
                    staged.discard()
                    return resent
                self._place(staged, target)
            except BaseException:
                staged.discard()
                raise
            try:
                outcome = self._record(facts, relative, staged.size, calling_ae)
            except BaseException:
                if self._unrecorded(facts.sop_instance_uid):  # not another association's copy
                    target.unlink(missing_ok=True)
                raise
            if outcome is StoreOutcome.DUPLICATE and self._recorded_path(facts.sop_instance_uid) != relative:
                target.unlink(missing_ok=True)  # its row is another series' instance
                raise UIDInAnotherSeriesError("SOPInstanceUID is stored already, in another series")
            return outcome

    def mark_released(self, series_uids: set[str]) -> None:
        """Record that an association which stored instances of these series was released."""
        with self.engine.begin() as conn:
            conn.execute(
                update(SERIES)
                .where(SERIES.c.series_instance_uid.in_(sorted(series_uids)))
                .values(released_at=utcnow())
            )

    def count_association(self, result: str) -> None:
        """Count an association that ended (released, aborted, rejected) for the metrics."""
        with self.engine.begin() as conn:
            conn.execute(
                update(ASSOCIATIONS)
                .where(ASSOCIATIONS.c.result == result)
                .values(count=ASSOCIATIONS.c.count + 1)
            )

    def _unrecorded(self, sop_instance_uid: str) -> bool:
        """Whether no row names the instance, so that the file placed for it may go when its own
        row failed. Not known (the database failing too) keeps the file: another association may
        have recorded the same instance a moment ago, and a file without a row is only written
        again when the instance comes again."""
        try:
            return not self._already_recorded(sop_instance_uid)
        except Exception:  # noqa: BLE001 - any fault of the database: keep the file
            return False

    def _recorded_path(self, sop_instance_uid: str) -> Path | None:
        with self.engine.connect() as conn:
            path = conn.scalar(
                select(INSTANCES.c.path).where(INSTANCES.c.sop_instance_uid == sop_instance_uid)
            )
        return None if path is None else Path(path)

    def _already_recorded(self, sop_instance_uid: str) -> bool:
        return self._recorded_path(sop_instance_uid) is not None

    def _place(self, staged: StagedFile, target: Path) -> None:
        """Rename the flushed temporary file to ``target`` and make the rename durable."""
        self._ensure_dir(target.parent)
        temp = staged.wait()
        os.replace(temp, target)
        fsync_dir(target.parent)

    def _ensure_dir(self, folder: Path) -> None:
        if folder in self._known_dirs:
            return
        missing = []
        current = folder
        while not current.exists():
            missing.append(current)
            current = current.parent
        folder.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):
            fsync_dir(created.parent)
        self._known_dirs.add(folder)

    def _record(self, facts: InstanceFacts, relative: Path, size: int, calling_ae: str) -> StoreOutcome:
        """The instance row and its series' count and time, in one short transaction.

        This is on the path of every C-STORE: the row goes through the driver
        (:mod:`node.receive.instance_rows`), and series ids are remembered (rows are never deleted while
        the node runs). The study and series rows of a series' first instance are created first,
        in a transaction of their own: a series that counts no instance yet is never assembled.
        """
        now = utcnow()
        with self._record_lock:
            series_id = self._series_ids.get(facts.series_uid)
            if series_id is None:
                try:
                    with self.engine.begin() as conn:
                        series_id = self._series_id(conn, facts, calling_ae, now)
                except IntegrityError:  # another listener process made the study or series just now
                    with self.engine.begin() as conn:
                        series_id = self._series_id(conn, facts, calling_ae, now)
        added = self._rows.add(
            {
                "series_id": series_id,
                "sop_instance_uid": facts.sop_instance_uid,
                "sop_class_uid": facts.sop_class_uid,
                "transfer_syntax_uid": facts.transfer_syntax_uid,
                "image_type": facts.image_type[:128],
                "slice_thickness": facts.slice_thickness,
                "orientation": facts.orientation,
                "slice_position": facts.slice_position,
                "images_in_acquisition": facts.images_in_acquisition,
                "path": relative.as_posix(),
                "size_bytes": size,
                "received_at": now,
            }
        )
        # Not added: another association stored the same instance a moment ago; that one is kept.
        return StoreOutcome.STORED if added else StoreOutcome.DUPLICATE

    def _series_id(self, conn: Connection, facts: InstanceFacts, calling_ae: str, now: datetime) -> int:
        """The series row's id, creating the study and series rows on first sight."""
        study_id = conn.scalar(select(STUDIES.c.id).where(STUDIES.c.study_instance_uid == facts.study_uid))
        if study_id is None:
            study_id = conn.execute(
                insert(STUDIES)
                .values(study_instance_uid=facts.study_uid, created_at=now)
                .returning(STUDIES.c.id)
            ).scalar_one()
        series_id = conn.scalar(select(SERIES.c.id).where(SERIES.c.series_instance_uid == facts.series_uid))
        if series_id is None:
            series_id = conn.execute(
                insert(SERIES)
                .values(
                    study_id=study_id,
                    series_instance_uid=facts.series_uid,
                    modality=facts.modality[:16],
                    series_description=facts.series_description[:64],
                    body_part=facts.body_part[:16],
                    calling_ae=calling_ae[:16],
                    instance_count=0,
                    assembled_count=0,
                    first_received_at=now,
                    last_received_at=now,
                )
                .returning(SERIES.c.id)
            ).scalar_one()
        self._series_ids[facts.series_uid] = int(series_id)
        return int(series_id)
