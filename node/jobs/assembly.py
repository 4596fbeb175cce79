"""Series assembly: every series that is new or has grown becomes a job once it is complete
(:mod:`node.jobs.completion`): routed (RECEIVED, to be queued) or rejected with the reason no rule
took it. A series released whole becomes a job at once, its results held until the release grace
has passed; if it grows in that grace (a sender sending in batches), the same job runs again with
every instance. A series that grows later gets a new job, which supersedes the old one if that
has not finished: one result per series reaches the PACS.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.core.config import Settings
from node.core.identifiers import node_key, read_identifiers, search_key
from node.db.jobs import create_job, record_event, supersede, transition
from node.db.models import TERMINAL_STATES, Instance, Job, JobState, Series
from node.jobs.completion import (
    ImageGeometry,
    Timing,
    announced,
    complete_without_images,
    sender_released,
    whole_volume,
)
from node.jobs.routing import RouteDecision, SeriesFacts, route

log = logging.getLogger(__name__)


def series_facts(session: Session, series: Series) -> SeriesFacts:
    rows = session.execute(
        select(Instance.sop_class_uid, Instance.image_type, Instance.slice_thickness).where(
            Instance.series_id == series.id
        )
    ).all()
    return SeriesFacts(
        modality=series.modality,
        sop_class_uids=frozenset(r.sop_class_uid for r in rows),
        image_types=frozenset(r.image_type for r in rows if r.image_type),
        instance_count=len(rows),
        slice_thicknesses=tuple(r.slice_thickness for r in rows if r.slice_thickness is not None),
        body_part=series.body_part,
        series_description=series.series_description,
        calling_ae=series.calling_ae,
    )


@dataclass(frozen=True)
class Completion:
    why: str  # why the series is complete; '' while it is not
    hold_until: datetime | None = None  # its results wait for the release grace until then


@dataclass
class _Waiting:
    series: Series
    decision: RouteDecision
    timing: Timing
    complete: Completion = Completion("")  # on its own


def assemble(session: Session, settings: Settings, now: datetime) -> list[int]:
    """Create jobs for every complete series that needs one; returns the ids of jobs to queue."""
    waiting = [
        _judge(session, series, settings, now)
        for series in session.scalars(
            select(Series).where(Series.instance_count > Series.assembled_count).order_by(Series.id)
        )
        if _may_be_complete(series, settings, now)
    ]
    by_study: dict[int, list[_Waiting]] = defaultdict(list)
    for item in waiting:
        by_study[item.series.study_id].append(item)
    complete = []  # judged before any job is made: a job changes what counts as waiting
    for item in waiting:
        completion = item.complete
        if item.timing.by_study and completion.why:
            completion = _study_complete(session, item, by_study[item.series.study_id], now)
        if completion.why:
            complete.append((item, completion))
    if any(item.series.patient_key is None for item, _ in complete):
        key = node_key(settings.data_dir)
        for item, _ in complete:
            _index_identifiers(session, item.series, settings, key)
    made = [_make_job(session, item, completion) for item, completion in complete]
    return [job_id for job_id in made if job_id is not None]


def _index_identifiers(session: Session, series: Series, settings: Settings, key: bytes) -> None:
    """Keep the keyed hashes of the series' patient ID and accession number, from its first file."""
    if series.patient_key is not None:
        return
    path = session.scalar(
        select(Instance.path).where(Instance.series_id == series.id).order_by(Instance.id).limit(1)
    )
    found = read_identifiers(settings.storage_dir / path) if path else {}
    series.patient_key = search_key(key, found.get("PatientID", ""))
    series.accession_key = search_key(key, found.get("AccessionNumber", ""))


def _may_be_complete(series: Series, settings: Settings, now: datetime) -> bool:
    """A cheap test before any routing: could any timing find the series complete now?"""
    shortest = min([settings.release_grace_s, settings.quiet_period_s, *_rule_quiet_periods(settings)])
    return (
        series.last_received_at <= now - timedelta(seconds=shortest)
        or (series.released_at is not None and series.released_at >= series.last_received_at)
        or series.complete_requested_at is not None
        or (settings.force_complete_s > 0 and series.first_received_at <= now - _shortest_force(settings))
    )


def _rule_quiet_periods(settings: Settings) -> list[float]:
    return [rule.quiet_period_s for rule in settings.rules if rule.quiet_period_s is not None]


def _shortest_force(settings: Settings) -> timedelta:
    values = [settings.force_complete_s, *(r.force_complete_s for r in settings.rules if r.force_complete_s)]
    return timedelta(seconds=min(values))


def _judge(session: Session, series: Series, settings: Settings, now: datetime) -> _Waiting:
    decision = route(series_facts(session, series), settings.rules)
    item = _Waiting(series, decision, Timing.of(decision.rule, settings))
    item.complete = _complete(session, series, item.timing, now)
    return item


def _complete(session: Session, series: Series, timing: Timing, now: datetime) -> Completion:
    """Whether ``series`` is complete by itself, and why."""
    why = complete_without_images(series, timing, now)
    if why or not sender_released(series, timing):
        return Completion(why)
    rows = session.execute(
        select(Instance.orientation, Instance.slice_position, Instance.images_in_acquisition).where(
            Instance.series_id == series.id
        )
    ).all()
    images = [ImageGeometry(*row) for row in rows]
    if whole_volume(images):
        return Completion("")  # not a whole volume: the quiet period decides
    if announced(images):
        return Completion(f"released by its sender with all {len(images)} images it announced")
    assert series.released_at is not None  # sender_released
    why = f"released by its sender as a whole volume of {len(images)} images"
    grace_ends = series.released_at + timedelta(seconds=timing.release_grace_s)
    if grace_ends <= now:
        return Completion(why)
    # Run now; send only once the grace in which a sender sending in batches opens its next
    # association has passed: the wait costs nothing when processing takes longer.
    return Completion(
        f"{why}; it runs now, its results held until its {timing.release_grace_s:g} s release "
        "grace has passed",
        grace_ends,
    )


def _study_complete(session: Session, item: _Waiting, waiting: list[_Waiting], now: datetime) -> Completion:
    """For a study-level rule: not complete until every series of the study still receiving is
    complete too; the results are held as long as any of theirs is."""
    others = session.scalars(
        select(Series).where(
            Series.study_id == item.series.study_id,
            Series.id != item.series.id,
            Series.instance_count > Series.assembled_count,
        )
    ).all()
    judged = {w.series.id for w in waiting}
    holds = [item.complete.hold_until]
    for other in others:
        completion = _complete(session, other, item.timing, now) if other.id in judged else Completion("")
        if not completion.why:
            return completion
        holds.append(completion.hold_until)
    if not others:
        return item.complete
    held = [hold for hold in holds if hold is not None]
    return Completion(f"{item.complete.why}; every series of its study is complete", max(held, default=None))


def _make_job(session: Session, item: _Waiting, completion: Completion) -> int | None:
    """The series' job, superseding its unfinished predecessor (or that job again, when the series
    grew while its results were held); its id if it is to be queued."""
    series, decision = item.series, item.decision
    why = completion.why
    previous = session.scalar(select(Job).where(Job.series_id == series.id).order_by(Job.id.desc()).limit(1))
    assembled, series.assembled_count = series.assembled_count, series.instance_count
    series.complete_requested_at = None
    if (
        previous is not None
        and decision.rule is not None
        and previous.rule == decision.rule.name
        and _grew_while_held(session, previous)
    ):
        return _run_again(session, series, previous, completion)
    grown = ""
    if previous is not None:
        grown = (
            f"series grew from {assembled} to {series.instance_count} instances "
            f"after job {previous.id} was created; "
        )
    if decision.rule is None:
        job = create_job(
            session,
            series,
            rule=None,
            segmenter=None,
            destinations=[],
            state=JobState.REJECTED,
            message=grown + decision.reason,
            reason=decision.reason,
        )
        log.info("job %d series %s: rejected: %s", job.id, series.series_instance_uid, decision.reason)
        _supersede(session, previous, job)
        return None
    rule = decision.rule
    job = create_job(
        session,
        series,
        rule=rule.name,
        segmenter=rule.segmenter,
        destinations=rule.destinations,
        outputs=list(rule.outputs),
        state=JobState.RECEIVED,
        message=f"{grown}series complete with {series.instance_count} instances ({why}); {decision.reason}",
    )
    job.hold_until = completion.hold_until
    log.info(
        "job %d series %s: %d instances (%s), rule %s, segmenter %s",
        job.id,
        series.series_instance_uid,
        series.instance_count,
        why,
        rule.name,
        rule.segmenter,
    )
    _supersede(session, previous, job)
    return job.id


def _grew_while_held(session: Session, job: Job) -> bool:
    """The job has not finished, and its series' next instance came while its results were held:
    the same sending, in another batch."""
    if job.state in TERMINAL_STATES or job.hold_until is None:
        return False
    first_new = session.scalar(
        select(Instance.received_at)
        .where(Instance.series_id == job.series_id)
        .order_by(Instance.id)
        .offset(job.instance_count)
        .limit(1)
    )
    return first_new is not None and first_new <= job.hold_until


def _run_again(session: Session, series: Series, job: Job, completion: Completion) -> int | None:
    """The job again, with every instance of its grown series; its id if it is to be queued (a
    run under way is discarded when it ends, and the job then queued again by its worker)."""
    message = (
        f"the series grew from {job.instance_count} to {series.instance_count} instances while the "
        f"results were held (another batch of the same sending): complete ({completion.why}); "
    )
    job.instance_count = series.instance_count
    job.hold_until = completion.hold_until
    log.info(
        "job %d series %s: runs again with %d instances",
        job.id,
        series.series_instance_uid,
        job.instance_count,
    )
    if job.state == JobState.RUNNING:
        record_event(session, job, "grew", message + "the run under way is discarded, then it runs again")
        return None
    if job.state in (JobState.RECEIVED, JobState.QUEUED):
        record_event(session, job, "grew", message + "it runs with all of them")
        return job.id if job.state == JobState.RECEIVED else None
    transition(session, job, JobState.RECEIVED, "grew", message + "it runs again with all of them")
    return job.id


def _supersede(session: Session, previous: Job | None, job: Job) -> None:
    if previous is not None and supersede(session, previous, job.id):
        log.info("job %d superseded by job %d: its series grew", previous.id, job.id)
