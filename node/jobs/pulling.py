"""Pull jobs: an admin asks the node to segment a study that is already in a PACS. The node asks a
DICOM source to C-MOVE it to the node's own AE title (its instances then arrive through the
listener like any sent study), or fetches it from a DICOMweb source by QIDO-RS and WADO-RS and
stores each instance as the listener would; either way routing and completion take it from there.
A source without C-MOVE set up for the node can send the study by C-GET on the node's own
association instead. One pull per source and study, so asking twice makes one job."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from io import BytesIO
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from pynetdicom import AE, Association, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.core.config import DicomSource, DicomWebDestination, Settings
from node.core.dicom import CT_IMAGE_CLASSES, rejection_reason
from node.core.dicomweb import dicomweb_client
from node.core.outages import run_passes
from node.core.tls import TlsFileError, client_context
from node.db.engine import session_scope
from node.db.models import Pull, utcnow
from node.receive.listener import ACCEPTED_TRANSFER_SYNTAXES, instance_facts
from node.receive.storage import RefusedInstanceError, Storage

log = logging.getLogger(__name__)

PENDING, RUNNING, DONE, FAILED = "PENDING", "RUNNING", "DONE", "FAILED"
MOVE_WAIT_S = 600.0
# What a C-GET takes: CT images (and what a study of them carries that routing records).
RETRIEVED_CLASSES = (
    *sorted(CT_IMAGE_CLASSES),
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
)  # the longest a source may go without a word while it moves a study


# A DICOMweb source that went away, before its answer or in the middle of it.
WADO_AWAY = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class PullError(RuntimeError):
    """The source would not give the study; the message says why, for the admin."""


def request_pull(session: Session, source: str, study: str, who: str) -> tuple[Pull, bool]:
    """The pull of ``study`` from ``source``: a new one, the one already asked for (False), or a
    failed one asked for again."""
    existing = session.scalar(select(Pull).where(Pull.source == source, Pull.study_instance_uid == study))
    if existing is not None:
        if existing.state != FAILED:
            return existing, False
        existing.state, existing.requested_by, existing.requested_at = PENDING, who, utcnow()
        existing.finished_at, existing.message, existing.instances = None, "", 0
        return existing, True
    pull = Pull(source=source, study_instance_uid=study, state=PENDING, requested_by=who, message="")
    try:
        with session.begin_nested():
            session.add(pull)
    except IntegrityError:  # asked at the same moment elsewhere: that one it is
        return session.scalars(
            select(Pull).where(Pull.source == source, Pull.study_instance_uid == study)
        ).one(), False
    return pull, True


class Puller:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], storage: Storage) -> None:
        self.settings, self.sessions, self.storage = settings, sessions, storage

    def tick(self) -> None:
        """Run every pending pull, one at a time."""
        while (claimed := self._claim()) is not None:
            pull_id, source_name, study = claimed
            try:
                count, message = self.fetch(source_name, study)
                state = DONE
            except PullError as err:
                count, message, state = 0, str(err), FAILED
            except Exception as err:  # said on the pull; the admin may ask again
                log.exception("pull %d: failed", pull_id)
                count, message, state = (
                    0,
                    f"internal error ({type(err).__name__}); the node's log has the details",
                    FAILED,
                )
            with session_scope(self.sessions) as session:
                pull = session.get_one(Pull, pull_id)
                pull.state, pull.instances, pull.message, pull.finished_at = state, count, message, utcnow()
            log.info("pull %d of a study from %s: %s (%s)", pull_id, source_name, state, message)

    def _claim(self) -> tuple[int, str, str] | None:
        with session_scope(self.sessions) as session:
            found = session.execute(
                select(Pull.id, Pull.source, Pull.study_instance_uid)
                .where(Pull.state == PENDING)
                .order_by(Pull.id)
                .limit(1)
            ).first()
            if found is None:
                return None
            taken = session.execute(
                update(Pull).where(Pull.id == found.id, Pull.state == PENDING).values(state=RUNNING)
            )
            return (found.id, found.source, found.study_instance_uid) if taken.rowcount == 1 else None  # type: ignore[attr-defined]

    def fetch(self, source_name: str, study: str) -> tuple[int, str]:
        """Fetch ``study``: (instances, what happened)."""
        source = self.settings.sources.get(source_name)
        if source is None:
            raise PullError(f"source {source_name!r} is not configured (sources: in the configuration)")
        if isinstance(source, DicomWebDestination):
            return self._by_wado(source, study)
        if source.retrieve == "get":
            return self._by_get(source, study)
        return self._by_move(source, study)

    def _associate(self, source: DicomSource, ae: AE, handlers: list[Any] | None = None) -> Association:
        where = source.address
        try:
            context = client_context(source.tls, where) if source.tls is not None else None
        except TlsFileError as err:
            raise PullError(str(err)) from err
        timeout = self.settings.worker.delivery_timeout_s
        ae.connection_timeout = ae.acse_timeout = ae.network_timeout = timeout
        ae.dimse_timeout = MOVE_WAIT_S
        tls_args = (context, source.host) if context is not None else None
        roles: list[Any] = [build_role(c, scp_role=True) for c in RETRIEVED_CLASSES] if handlers else []
        assoc = ae.associate(
            source.host,
            source.port,
            ae_title=source.ae_title,
            tls_args=tls_args,
            ext_neg=roles,
            evt_handlers=handlers,
        )
        if not assoc.is_established:
            if assoc.is_rejected and assoc.acceptor.primitive is not None:
                answer = assoc.acceptor.primitive
                why = rejection_reason(answer.result_source, answer.diagnostic)
                raise PullError(f"{where} rejected the association: {why}")
            raise PullError(f"{where}: no answer (connection refused or timed out)")
        return assoc

    def _by_move(self, source: DicomSource, study: str) -> tuple[int, str]:
        where = source.address
        ae = AE(ae_title=self.settings.scp.ae_title)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = self._associate(source, ae)
        try:
            return _outcome(
                where,
                "C-MOVE",
                assoc.send_c_move(
                    _study(study), self.settings.scp.ae_title, StudyRootQueryRetrieveInformationModelMove
                ),
                self.settings.scp.ae_title,
            )
        finally:
            assoc.release()

    def _by_get(self, source: DicomSource, study: str) -> tuple[int, str]:
        """C-GET: the source sends the study on the node's own association; each instance is
        stored as the listener stores one, and each series taken as complete when the GET ends."""
        where = source.address
        ae = AE(ae_title=self.settings.scp.ae_title)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for sop_class in RETRIEVED_CLASSES:
            ae.add_requested_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
        series: set[str] = set()

        def store(event: Any) -> int:
            syntax = str(event.context.transfer_syntax)
            facts = instance_facts(event.dataset, syntax)
            try:
                self.storage.store([event.encoded_dataset()], facts, "PULL")
            except RefusedInstanceError as err:  # the instance's own fault: not worth sending again
                log.warning("pull from %s: an instance refused: %s", where, err)
                return 0xC000
            except Exception as err:  # noqa: BLE001 - answered to the source, which counts it failed
                log.warning("pull from %s: an instance not stored (%s)", where, type(err).__name__)
                return 0xA700
            series.add(facts.series_uid)
            return 0x0000

        assoc = self._associate(source, ae, [(evt.EVT_C_STORE, store)])
        try:
            return _outcome(
                where,
                "C-GET",
                assoc.send_c_get(_study(study), StudyRootQueryRetrieveInformationModelGet),
                self.settings.scp.ae_title,
            )
        finally:
            assoc.release()
            if series:  # what arrived is complete now, whatever the source says of the rest
                self.storage.mark_released(series)

    def _by_wado(self, source: DicomWebDestination, study: str) -> tuple[int, str]:
        client = dicomweb_client(source, self.settings.worker.delivery_timeout_s)
        try:
            series = [s["0020000E"]["Value"][0] for s in client.search_for_series(study)]
        except requests.HTTPError as err:
            raise PullError(f"{source.url}: QIDO-RS answered HTTP {_status(err)}") from err
        except WADO_AWAY as err:
            raise PullError(f"{source.url}: no answer ({type(err).__name__})") from err
        if not series:
            raise PullError(f"{source.url} holds no series of that study")
        stored = sum(self._store_series(client, source, study, uid) for uid in series)
        return stored, f"{source.url} gave {stored} instance(s) of {len(series)} series by WADO-RS"

    def _store_series(self, client: DICOMwebClient, source: DicomWebDestination, study: str, uid: str) -> int:
        """Store each instance of the series as it arrives (iter_series streams the answer: a long
        series is never in memory whole), then complete the series; the instances stored."""
        stored = 0
        try:
            for ds in client.iter_series(study, uid, media_types=(("application/dicom", "*"),)):
                buffer = BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                facts = instance_facts(ds, str(ds.file_meta.TransferSyntaxUID))
                del ds  # only the encoded copy is kept while it is stored
                try:
                    self.storage.store([buffer.getbuffer()], facts, "PULL")
                except RefusedInstanceError as err:  # that instance only: the rest of the series comes
                    log.warning("pull from %s: an instance refused: %s", source.url, err)
                    continue
                stored += 1
        except requests.HTTPError as err:
            raise PullError(f"{source.url}: WADO-RS answered HTTP {_status(err)}") from err
        except WADO_AWAY as err:
            raise PullError(f"{source.url}: the answer stopped ({type(err).__name__})") from err
        self.storage.mark_released({uid})  # the whole series is here: complete it now
        return stored

    def run(self, stop: threading.Event, every_s: float = 1.0) -> None:
        with session_scope(self.sessions) as session:  # pulls a stopped or crashed node left running
            session.execute(update(Pull).where(Pull.state == RUNNING).values(state=PENDING))
        run_passes(stop, self.tick, every_s, log, "the puller")


def _status(err: requests.HTTPError) -> int:
    return err.response.status_code if err.response is not None else 0


def _study(uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = uid
    return query


def _outcome(where: str, how: str, responses: Iterable[tuple[Dataset, Any]], node_ae: str) -> tuple[int, str]:
    """(instances sent, what happened) from a C-MOVE's or C-GET's responses; PullError if it failed."""
    final: Dataset | None = None
    last = time.monotonic()
    for status, _ in responses:
        if "Status" not in status:
            if time.monotonic() - last < MOVE_WAIT_S:  # cut off, not timed out: a PACS refusing the caller
                raise PullError(
                    f"{where} ended the association instead of answering the {how}: does it let "
                    f"{node_ae} retrieve? (add the node to its DICOM peers: AE title, host, DICOM port)"
                )
            raise PullError(f"{where}: no {how} response within {MOVE_WAIT_S:g} s")
        final, last = status, time.monotonic()
    if final is None:
        raise PullError(f"{where}: no {how} response")
    code = int(final.Status)
    done = int(final.get("NumberOfCompletedSuboperations", 0) or 0)
    failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
    if code == 0xA801:
        raise PullError(
            f"{where} does not know where {node_ae} is: add the node to its DICOM peers (AE title, host, "
            "DICOM port), or pull with retrieve: get"
        )
    if code not in (0x0000, 0xB000) or (done == 0 and failed == 0):
        raise PullError(
            f"{where}: {how} status 0x{code:04X}, {done} sent, {failed} failed (is the study there?)"
        )
    return done, f"{where} sent {done} instance(s) by {how}" + (f", {failed} failed" if failed else "")
