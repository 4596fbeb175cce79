"""The database schema: studies, series, instances, jobs, job events and deliveries; and the
people who may use the API (users and their tokens).

No patient identifiers are stored: the PACS holds those. A row names DICOM UIDs, the file paths the
node wrote, the facts routing needs (modality, description, body part ...), and keyed hashes of the
patient ID and accession number that only the node's own key makes searchable.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite keeps no zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use an aware UTC time")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class JobState(enum.StrEnum):
    RECEIVED = "RECEIVED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SEGMENTED = "SEGMENTED"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    CANCELLED = "CANCELLED"
    SUPERSEDED = "SUPERSEDED"  # its series grew; a newer job of the series takes its place


TERMINAL_STATES = frozenset(
    {JobState.DELIVERED, JobState.FAILED, JobState.REJECTED, JobState.CANCELLED, JobState.SUPERSEDED}
)


class DeliveryState(enum.StrEnum):
    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")
    body_part: Mapped[str] = mapped_column(String(16), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # instance_count when the last job for this series was created; a larger count means it grew.
    assembled_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    # When an association that stored instances of the series was released (fast completion).
    released_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # When someone asked for the series to be taken as complete now (the CLI, the dashboard).
    complete_requested_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # Keyed hashes of the patient ID and accession number (node.core.identifiers), for an admin's
    # search; set when the series is assembled ('' when the header has none).
    patient_key: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    accession_key: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    jobs: Mapped[list[Job]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    image_type: Mapped[str] = mapped_column(String(128), default="")
    slice_thickness: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Where the image lies: its orientation (ImageOrientationPatient, rounded), its position along
    # the orientation's normal, and the slices its sender says the acquisition has; what fast
    # completion needs to tell a whole volume from part of one.
    orientation: Mapped[str] = mapped_column(String(96), default="")
    slice_position: Mapped[float | None] = mapped_column(Float, nullable=True)
    images_in_acquisition: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Relative to the storage folder.
    path: Mapped[str] = mapped_column(String(300))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    rule: Mapped[str | None] = mapped_column(String(64), nullable=True)
    segmenter: Mapped[str | None] = mapped_column(String(64), nullable=True)
    destinations: Mapped[list[str]] = mapped_column(JSON, default=list)
    # What the job writes and sends (its rule's outputs): seg, rtstruct, sr, overlay.
    outputs: Mapped[list[str]] = mapped_column(JSON, default=lambda: ["seg"])
    state: Mapped[JobState] = mapped_column(Enum(JobState, native_enum=False, length=16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    # The number of instances the job covers (the series may grow later: then a new job, or
    # this one again with all of them while its results are held).
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str] = mapped_column(String(255), default="")
    output_path: Mapped[str] = mapped_column(String(300), default="")
    output_sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True, index=True)
    # When its results were last written (the end of processing, the start of delivery).
    segmented_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # While RUNNING: the job is its worker's until then; the worker renews it while it works.
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True, index=True)
    # A job made at its sender's release runs at once, but its results are not sent before this:
    # the end of the release grace, in which a sender sending in batches may send more.
    hold_until: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

    series: Mapped[Series] = relationship(back_populates="jobs")
    events: Mapped[list[JobEvent]] = relationship(back_populates="job", order_by="JobEvent.id")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job", order_by="Delivery.id")


class JobEvent(Base):
    """The audit trail: one row per step of a job (state change, delivery attempt, re-queue ...)."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    event: Mapped[str] = mapped_column(String(32))
    state: Mapped[JobState] = mapped_column(Enum(JobState, native_enum=False, length=16))
    host: Mapped[str] = mapped_column(String(255), default="")
    message: Mapped[str] = mapped_column(Text, default="")

    job: Mapped[Job] = relationship(back_populates="events")


class Delivery(Base):
    """One output of one job to one destination: delivered once the destination answered success."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    # Which of the job's outputs it carries (seg, rtstruct, sr, overlay).
    output: Mapped[str] = mapped_column(String(16), default="seg")
    state: Mapped[DeliveryState] = mapped_column(Enum(DeliveryState, native_enum=False, length=16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[str] = mapped_column(Text, default="")
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # While PENDING: when it is next due (None: at once). An attempt under way holds it a while
    # ahead, so that one whose worker died is due again without anyone waiting on the broker.
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True, index=True)

    job: Mapped[Job] = relationship(back_populates="deliveries")


class Role(enum.StrEnum):
    VIEWER = "viewer"  # reads everything the API shows (and reads instances over DICOMweb)
    ADMIN = "admin"  # and acts: retry, cancel, ...
    SENDER = "sender"  # a DICOMweb client that stores instances (STOW-RS) and nothing else
    WORKER = "worker"  # a worker on another machine: reads series, hands results back


class User(Base):
    """Someone who may use the API. Only an argon2 hash of the password is kept."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[Role] = mapped_column(Enum(Role, native_enum=False, length=16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    disabled: Mapped[bool] = mapped_column(default=False)


class ApiToken(Base):
    """A bearer token: a login's session (expires) or an API token made for a program. Only a
    SHA-256 of the token is kept, so the table holds nothing that lets anyone in."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

    user: Mapped[User] = relationship()


class AssociationCount(Base):
    """Associations that ended, by how (released, aborted, rejected), counted by the listeners."""

    __tablename__ = "association_counts"

    result: Mapped[str] = mapped_column(String(16), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)


class WorkerBeat(Base):
    """A worker process's heartbeat: the dashboard's list of workers and /readyz's live worker."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # Celery's node name
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    gpu: Mapped[str] = mapped_column(String(128), default="")  # the device's name; '' on a CPU
    concurrency: Mapped[int] = mapped_column(Integer, default=1)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class Suspension(Base):
    """Work an admin stopped: ``processing`` (no job goes to a worker) or ``delivery:NAME`` (nothing
    is sent to that destination). The node keeps receiving; the work waits in the database."""

    __tablename__ = "suspensions"

    target: Mapped[str] = mapped_column(String(80), primary_key=True)
    by: Mapped[str] = mapped_column(String(80))
    since: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class DestinationStatus(Base):
    """What a destination last answered (a delivery or a C-ECHO), and since when it is down."""

    __tablename__ = "destination_status"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    checked_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    ok: Mapped[bool] = mapped_column(default=True)
    answer: Mapped[str] = mapped_column(Text, default="")
    down_since: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    down_notified: Mapped[bool] = mapped_column(default=False)


class Notification(Base):
    """A webhook message waiting to be sent (an outbox): written in the transaction of what it
    reports, sent by the scheduler's notifier, so a webhook that is down never holds up a job."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, object]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    # The webhooks that answered success (each is sent the message once).
    sent_to: Mapped[list[str]] = mapped_column(JSON, default=list)
    done: Mapped[bool] = mapped_column(default=False, index=True)


class Pull(Base):
    """A study an admin asked the node to fetch from a source (a PACS) and segment: PENDING, then
    RUNNING, then DONE (its instances arrived and go through as received ones) or FAILED with why.
    One per source and study: asking again is answered with this one (again once it failed)."""

    __tablename__ = "pulls"
    __table_args__ = (UniqueConstraint("source", "study_instance_uid", name="uq_pulls_source_study"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    requested_by: Mapped[str] = mapped_column(String(80))
    requested_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    message: Mapped[str] = mapped_column(Text, default="")


# The tables themselves, for the few statements written in SQLAlchemy Core on the C-STORE path.
STUDIES = cast(Table, Study.__table__)
SERIES = cast(Table, Series.__table__)
INSTANCES = cast(Table, Instance.__table__)
ASSOCIATIONS = cast(Table, AssociationCount.__table__)
