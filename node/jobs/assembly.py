"""Series assembly: every series that is new or has grown becomes a job once it is complete
(:mod:`node.jobs.completion`): routed (RECEIVED, to be queued) or rejected with the reason no rule
took it. A series that grows after its job was made gets a new job, which supersedes the old one
if that has not finished: one result per series reaches the PACS.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.core.config import Settings
from node.db.jobs import create_job, supersede
from node.db.models import Instance, Job, JobState, Series
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


@dataclass
class _Waiting:
    series: Series
    decision: RouteDecision
    timing: Timing
    complete: str = ""  # why it is complete on its own; '' while it is not


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
        why = item.complete
        if item.timing.by_study and why:
            why = _study_complete(session, item, by_study[item.series.study_id], now)
        if why:
            complete.append((item, why))
    made = [_make_job(session, item, why) for item, why in complete]
    return [job_id for job_id in made if job_id is not None]


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


def _complete(session: Session, series: Series, timing: Timing, now: datetime) -> str:
    """Why ``series`` is complete by itself; '' while it is not."""
    why = complete_without_images(series, timing, now)
    if why or not sender_released(series, timing):
        return why
    rows = session.execute(
        select(Instance.orientation, Instance.slice_position, Instance.images_in_acquisition).where(
            Instance.series_id == series.id
        )
    ).all()
    images = [ImageGeometry(*row) for row in rows]
    if whole_volume(images):
        return ""  # not a whole volume: the quiet period decides
    if announced(images):
        return f"released by its sender with all {len(images)} images it announced"
    assert series.released_at is not None  # sender_released
    if series.released_at <= now - timedelta(seconds=timing.release_grace_s):
        return f"released by its sender as a whole volume of {len(images)} images"
    return ""


def _study_complete(session: Session, item: _Waiting, waiting: list[_Waiting], now: datetime) -> str:
    """For a study-level rule: '' until every series of the study still receiving is complete too."""
    others = session.scalars(
        select(Series).where(
            Series.study_id == item.series.study_id,
            Series.id != item.series.id,
            Series.instance_count > Series.assembled_count,
        )
    ).all()
    judged = {w.series.id for w in waiting}
    for other in others:
        if other.id not in judged or not _complete(session, other, item.timing, now):
            return ""
    return f"{item.complete}; every series of its study is complete" if others else item.complete


def _make_job(session: Session, item: _Waiting, why: str) -> int | None:
    """The series' job, superseding its unfinished predecessor; its id if it is to be queued."""
    series, decision = item.series, item.decision
    previous = session.scalar(select(Job).where(Job.series_id == series.id).order_by(Job.id.desc()).limit(1))
    grown = ""
    if previous is not None:
        grown = (
            f"series grew from {series.assembled_count} to {series.instance_count} instances "
            f"after job {previous.id} was created; "
        )
    series.assembled_count = series.instance_count
    series.complete_requested_at = None
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


def _supersede(session: Session, previous: Job | None, job: Job) -> None:
    if previous is not None and supersede(session, previous, job.id):
        log.info("job %d superseded by job %d: its series grew", previous.id, job.id)
