"""Prometheus metrics, read from the database at each scrape.

The database is the one place every process of the node writes (listener processes, scheduler,
workers on other machines), so counting there gives the same figures whichever API process is
scraped, and they survive restarts. Nothing here names a patient, a study or a series.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import Subquery, func, select
from sqlalchemy.orm import Session, sessionmaker

from node.api.views import database_depths
from node.core.config import Settings
from node.db.models import AssociationCount, Delivery, DeliveryState, Instance, Job, JobState, Series

# Seconds from a series' last instance to its SEG delivered: the wait a technologist feels.
LATENCY_BUCKETS = (2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
STAGE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


class NodeCollector(Collector):
    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.sessions, self.settings = sessions, settings

    def collect(self) -> Iterator[Metric]:
        with self.sessions() as session:
            yield from self._received(session)
            yield from self._jobs(session)
            yield from self._deliveries(session)
            yield self._latency(session)
            yield self._stages(session)
            yield self._associations(session)
        yield GaugeMetricFamily(
            "segnode_storage_free_bytes",
            "Free space where received instances are stored",
            value=free_bytes(self.settings.storage_dir),
        )

    def _received(self, session: Session) -> Iterator[Metric]:
        count, size = session.execute(
            select(func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0))
        ).one()
        yield CounterMetricFamily("segnode_instances_received", "Instances stored and recorded", value=count)
        yield CounterMetricFamily("segnode_bytes_received", "Bytes of the instances stored", value=size)
        series = session.scalar(select(func.count(Series.id))) or 0
        yield CounterMetricFamily(
            "segnode_series_received", "Series with at least one instance stored", value=series
        )
        completed = session.scalar(select(func.count(Series.id)).where(Series.assembled_count > 0)) or 0
        yield CounterMetricFamily(
            "segnode_series_completed", "Series taken as complete (a job made for them)", value=completed
        )

    def _jobs(self, session: Session) -> Iterator[Metric]:
        by_state = dict(session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)).all())
        jobs = GaugeMetricFamily("segnode_jobs", "Jobs by state", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], by_state.get(state, 0))
        yield jobs
        # By queue, so that GPU workers scale on their own queue: jobs waiting for a worker
        # (RECEIVED or QUEUED) on the segment queues, deliveries pending on the delivery queue.
        depth = GaugeMetricFamily(
            "segnode_queue_depth", "Work waiting for a worker, by queue", labels=["queue"]
        )
        for name, counted in database_depths(session, self.settings).items():
            depth.add_metric([name], counted["waiting_jobs"] + counted["deliveries_pending"])
        yield depth

    def _deliveries(self, session: Session) -> Iterator[Metric]:
        rows = session.execute(
            select(
                Delivery.destination, Delivery.state, func.count(Delivery.id), func.sum(Delivery.attempts)
            ).group_by(Delivery.destination, Delivery.state)
        ).all()
        # Gauges: a retry or a resend starts a delivery's count again, so they can go down.
        failed = GaugeMetricFamily(
            "segnode_deliveries_failed", "Deliveries given up, by destination", labels=["destination"]
        )
        attempts = GaugeMetricFamily(
            "segnode_delivery_attempts",
            "Attempts made by the deliveries the node holds, by destination",
            labels=["destination"],
        )
        totals: dict[str, tuple[int, int]] = {}
        for destination, state, count, tried in rows:
            given_up, sent = totals.get(destination, (0, 0))
            totals[destination] = (
                given_up + (count if state == DeliveryState.FAILED else 0),
                sent + int(tried or 0),
            )
        for destination, (given_up, tried) in sorted(totals.items()):
            failed.add_metric([destination], given_up)
            attempts.add_metric([destination], tried)
        yield failed
        yield attempts

    def _latency(self, session: Session) -> Metric:
        """A histogram over every delivered job: last instance received to last delivery made."""
        delivered = _last_delivery()
        rows = session.execute(
            select(delivered.c.at, Series.last_received_at)
            .join(Job, Job.id == delivered.c.job_id)
            .join(Series, Series.id == Job.series_id)
        ).all()
        buckets, total = _buckets(
            [(at - last).total_seconds() for at, last in rows if at is not None], LATENCY_BUCKETS
        )
        return HistogramMetricFamily(
            "segnode_last_instance_to_delivered_seconds",
            "From a series' last instance received to its result delivered",
            buckets=buckets,
            sum_value=total,
        )

    def _stages(self, session: Session) -> Metric:
        """Where the wait goes, per finished job: completion (last instance to job), queue (job
        to a worker starting it), processing (start to results written), delivery (results to
        the last destination's success)."""
        delivered = _last_delivery()
        rows = session.execute(
            select(Series.last_received_at, Job.created_at, Job.started_at, Job.segmented_at, delivered.c.at)
            .join(Job, Job.series_id == Series.id)
            .outerjoin(delivered, delivered.c.job_id == Job.id)
            .where(Job.segmented_at.is_not(None))
        ).all()
        stages: dict[str, list[float]] = {"completion": [], "queue": [], "processing": [], "delivery": []}
        for last, created, started, segmented, sent in rows:
            stages["completion"].append((created - last).total_seconds())
            if started is not None:
                stages["queue"].append((started - created).total_seconds())
                stages["processing"].append((segmented - started).total_seconds())
            if sent is not None:
                stages["delivery"].append((sent - segmented).total_seconds())
        family = HistogramMetricFamily(
            "segnode_stage_seconds", "Seconds each stage of a job took", labels=["stage"]
        )
        for stage, seconds in stages.items():
            buckets, total = _buckets(seconds, STAGE_BUCKETS)
            family.add_metric([stage], buckets, total)
        return family

    def _associations(self, session: Session) -> Metric:
        counted = CounterMetricFamily(
            "segnode_associations", "DICOM associations ended, by result", labels=["result"]
        )
        for result, count in session.execute(select(AssociationCount.result, AssociationCount.count)):
            counted.add_metric([result], count)
        return counted


def _last_delivery() -> Subquery:
    """Each delivered job's id and when its last delivery was made (``at``)."""
    return (
        select(Delivery.job_id, func.max(Delivery.delivered_at).label("at"))
        .where(Delivery.state == DeliveryState.DELIVERED)
        .group_by(Delivery.job_id)
        .subquery()
    )


def _buckets(values: list[float], bounds: tuple[float, ...]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative histogram buckets of ``values`` (negative ones, from clocks apart, count as 0)."""
    waits = sorted(max(v, 0.0) for v in values)
    buckets, index = [], 0
    for bound in bounds:
        while index < len(waits) and waits[index] <= bound:
            index += 1
        buckets.append((str(bound), float(index)))
    buckets.append(("+Inf", float(len(waits))))
    return buckets, sum(waits)


def registry(sessions: sessionmaker[Session], settings: Settings) -> CollectorRegistry:
    """A registry of the node's metrics alone (no process metrics of whichever API process answers)."""
    found = CollectorRegistry(auto_describe=False)
    found.register(NodeCollector(sessions, settings))
    return found


def free_bytes(path: Path) -> int:
    """Free space on the file system of ``path`` (or of its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
