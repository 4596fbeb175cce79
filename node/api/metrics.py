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
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Delivery, DeliveryState, Instance, Job, JobState, Series

# Seconds from a series' last instance to its SEG delivered: the wait a technologist feels.
LATENCY_BUCKETS = (2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class NodeCollector(Collector):
    def __init__(self, sessions: sessionmaker[Session], storage_dir: Path) -> None:
        self.sessions, self.storage_dir = sessions, storage_dir

    def collect(self) -> Iterator[Metric]:
        with self.sessions() as session:
            yield from self._received(session)
            yield from self._jobs(session)
            yield from self._deliveries(session)
            yield self._latency(session)
        yield GaugeMetricFamily(
            "segnode_storage_free_bytes",
            "Free space where received instances are stored",
            value=free_bytes(self.storage_dir),
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

    def _jobs(self, session: Session) -> Iterator[Metric]:
        by_state = dict(
            session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)).tuples().all()
        )
        jobs = GaugeMetricFamily("segnode_jobs", "Jobs by state", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], by_state.get(state, 0))
        yield jobs
        waiting = by_state.get(JobState.RECEIVED, 0) + by_state.get(JobState.QUEUED, 0)
        yield GaugeMetricFamily(
            "segnode_queue_depth", "Jobs waiting for a worker (RECEIVED or QUEUED)", value=waiting
        )

    def _deliveries(self, session: Session) -> Iterator[Metric]:
        rows = session.execute(
            select(
                Delivery.destination, Delivery.state, func.count(Delivery.id), func.sum(Delivery.attempts)
            ).group_by(Delivery.destination, Delivery.state)
        ).all()
        failed = CounterMetricFamily(
            "segnode_deliveries_failed", "Deliveries given up, by destination", labels=["destination"]
        )
        attempts = CounterMetricFamily(
            "segnode_delivery_attempts", "Attempts to send a result, by destination", labels=["destination"]
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
        delivered = (
            select(Delivery.job_id, func.max(Delivery.delivered_at).label("at"))
            .where(Delivery.state == DeliveryState.DELIVERED)
            .group_by(Delivery.job_id)
            .subquery()
        )
        rows = session.execute(
            select(delivered.c.at, Series.last_received_at)
            .join(Job, Job.id == delivered.c.job_id)
            .join(Series, Series.id == Job.series_id)
        ).all()
        waits = sorted(max((at - last).total_seconds(), 0.0) for at, last in rows if at is not None)
        buckets, index = [], 0
        for bound in LATENCY_BUCKETS:
            while index < len(waits) and waits[index] <= bound:
                index += 1
            buckets.append((str(bound), index))
        buckets.append(("+Inf", len(waits)))
        return HistogramMetricFamily(
            "segnode_last_instance_to_delivered_seconds",
            "From a series' last instance received to its result delivered",
            buckets=buckets,
            sum_value=sum(waits),
        )


def registry(sessions: sessionmaker[Session], storage_dir: Path) -> CollectorRegistry:
    """A registry of the node's metrics alone (no process metrics of whichever API process answers)."""
    found = CollectorRegistry(auto_describe=False)
    found.register(NodeCollector(sessions, storage_dir))
    return found


def free_bytes(path: Path) -> int:
    """Free space on the file system of ``path`` (or of its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
