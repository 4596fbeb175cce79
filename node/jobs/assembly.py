"""Series assembly: a series is complete once no instance has arrived for the quiet period.

Each pass turns every quiet series that is new or has grown into a job: routed (RECEIVED, to be
queued) or rejected with the reason no rule took it. A series that grows after its job was created
gets a new job, and the history says why.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.core.config import Settings
from node.db.jobs import create_job
from node.db.models import Instance, Job, JobState, Series
from node.jobs.routing import SeriesFacts, route

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


def assemble(session: Session, settings: Settings, now: datetime) -> list[int]:
    """Create jobs for every complete series that needs one; returns the ids of jobs to queue."""
    quiet_since = now - timedelta(seconds=settings.quiet_period_s)
    ready = session.scalars(
        select(Series).where(
            Series.last_received_at <= quiet_since, Series.instance_count > Series.assembled_count
        )
    ).all()
    to_queue = []
    for series in ready:
        previous = session.scalar(
            select(Job).where(Job.series_id == series.id).order_by(Job.id.desc()).limit(1)
        )
        decision = route(series_facts(session, series), settings.rules)
        grown = ""
        if previous is not None:
            grown = (
                f"series grew from {series.assembled_count} to {series.instance_count} instances "
                f"after job {previous.id} was created; "
            )
        series.assembled_count = series.instance_count
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
            continue
        rule = decision.rule
        job = create_job(
            session,
            series,
            rule=rule.name,
            segmenter=rule.segmenter,
            destinations=rule.destinations,
            state=JobState.RECEIVED,
            message=f"{grown}series complete with {series.instance_count} instances; {decision.reason}",
        )
        log.info(
            "job %d series %s: %d instances, rule %s, segmenter %s",
            job.id,
            series.series_instance_uid,
            series.instance_count,
            rule.name,
            rule.segmenter,
        )
        to_queue.append(job.id)
    return to_queue
