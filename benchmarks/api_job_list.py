"""The REST API's job list with a long history behind it (issue 15: p95 under 200 ms with 100,000 jobs
on this machine), timed over real HTTP against the API as `segnode serve` runs it.

    .venv/bin/python -m benchmarks.api_job_list [--database-url URL] [--jobs 100000] [--requests 200]
        [--check] [--explain]
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg
from psycopg import sql
from sqlalchemy import Engine, event, func, select
from sqlalchemy.engine import make_url

from node.api.auth import add_user, issue_token
from node.api.server import ApiThread
from node.core.config import ApiSettings, Settings
from node.db import engine as db
from node.db.models import DeliveryState, Job, JobState, Role
from tests import peers

TARGET_MS = 200.0
DEFAULT_DATABASE = "segnode_bench_joblist"
DAYS = 30
DEEP_PAGES = 50
WARMUP = 20
# Rules and the segmenter each names, with their share of the series a node takes.
RULES = {
    "chest-ct": ("classical", 0.45),
    "thorax-oar": ("demo-thorax-unet", 0.30),
    "whole-body": ("totalsegmentator-total", 0.20),
    "liver": ("nnunet-liver", 0.05),
}
# The rarest segmenter over one week three weeks back: the filter that reads furthest down the ids.
FILTERED_SEGMENTER = "nnunet-liver"
CALLING_AES = ["CT_ROOM1", "CT_ROOM2", "CT_ER", "PACS_QR"]
# Worker processes as Celery names them, each with a heartbeat: the workers panel's rows. A job
# records its worker as NAME/PID (workers.tasks.worker_name), two pool processes each.
WORKERS = [f"segment@gpu-{k}" for k in range(1, 9)]
DESCRIPTIONS = ["THORAX 1.0 B31f", "ABDOMEN PV 3.0 Br40", "CHEST W/O 1.25", "CAP 2.0 I30f", "LIVER ART 1.0"]
BODY_PARTS = ["CHEST", "ABDOMEN", "CHEST", "WHOLEBODY"]
# Settled jobs; QUEUED and RUNNING jobs are only among the newest (ACTIVE_SHARE of them).
SETTLED = [(JobState.DELIVERED, 0.89), (JobState.FAILED, 0.04), (JobState.REJECTED, 0.07)]
ACTIVE_SHARE = 0.005
UID_ROOT = "1.2.826.0.1.3680043.8.498"


@dataclass
class Rows:
    """Every table's rows as tuples in its columns' order (700,000 dicts would take far more memory)."""

    tables: dict[str, tuple[tuple[str, ...], list[tuple[Any, ...]]]] = field(default_factory=dict)

    def add(self, table: str, **values: Any) -> None:
        columns, rows = self.tables.setdefault(table, (tuple(values), []))
        assert columns == tuple(values), f"{table}: columns in another order"
        rows.append(tuple(values.values()))

    def count(self, table: str) -> int:
        return len(self.tables[table][1]) if table in self.tables else 0


def make_rows(jobs: int, now: datetime, seed: int) -> Rows:
    """``jobs`` series, each with one job, about three series to a study, created over ``DAYS`` days
    in id order; 2-6 events a job and a delivery for each output a delivered job sent."""
    rng = random.Random(seed)
    rows = Rows()
    start, span = now - timedelta(days=DAYS), timedelta(days=DAYS)
    rules, weights = list(RULES), [share for _, share in RULES.values()]
    settled, settled_weights = [s for s, _ in SETTLED], [w for _, w in SETTLED]
    study = event_id = delivery_id = 0
    for i in range(1, jobs + 1):
        created = start + span * (i / jobs)
        received = created - _s(rng.uniform(3, 40))
        if study == 0 or rng.random() < 1 / 3:
            study += 1
            rows.add("studies", id=study, study_instance_uid=f"{UID_ROOT}.1.{study}", created_at=received)
        slices = rng.randint(40, 600)
        released = created - _s(rng.uniform(0, 2))
        rows.add(
            "series",
            id=i,
            study_id=study,
            series_instance_uid=f"{UID_ROOT}.2.{i}",
            modality="CT",
            series_description=rng.choice(DESCRIPTIONS),
            body_part=rng.choice(BODY_PARTS),
            calling_ae=rng.choice(CALLING_AES),
            instance_count=slices,
            assembled_count=slices,
            first_received_at=received,
            last_received_at=released,
            released_at=released,
            complete_requested_at=None,
        )
        if i > jobs * (1 - ACTIVE_SHARE):
            state = rng.choice([JobState.QUEUED, JobState.RUNNING, JobState.DELIVERED])
        else:
            state = rng.choices(settled, settled_weights)[0]
        rule: str | None = rng.choices(rules, weights)[0]
        events: list[tuple[timedelta, str, JobState, str]] = [(_s(0), "created", JobState.RECEIVED, "")]
        reason, attempts, worker, started, finished = "", 0, "", None, None
        if state == JobState.REJECTED:
            rule = None
            reason = "; ".join(f"rule {r}: {why}" for r, why in zip(RULES, _declines(rng), strict=True))
            events.append((_s(0.01), "rejected", state, reason))
        else:
            attempts, worker = 1, f"{rng.choice(WORKERS)}/{rng.choice((101, 102))}"
            if rng.random() < 0.5 or state == JobState.QUEUED:
                events.append((_s(0.2), "queued", JobState.QUEUED, ""))
            if state != JobState.QUEUED:
                started = created + _s(0.5)
                events.append((_s(0.5), "started", JobState.RUNNING, f"on {worker}"))
            took = _s(rng.uniform(3, 9))
            if state == JobState.DELIVERED:
                events.append((took, "segmented", JobState.SEGMENTED, ""))
                if rng.random() < 0.5:
                    events.append((took + _s(0.4), "sent", JobState.SEGMENTED, "seg to pacs: 0x0000"))
                events.append((took + _s(0.5), "delivered", state, "every destination answered success"))
                finished = created + took + _s(0.5)
            elif state == JobState.FAILED:
                attempts = rng.randint(1, 3)
                reason = rng.choice(["segmenter error: CUDA out of memory", "pacs refused: 0xA700"])
                events.append((took, "failed", state, reason))
                finished = created + took
        outputs = ["seg", "sr"] if rule == "liver" else ["seg"]
        for offset, what, in_state, message in events:
            event_id += 1
            rows.add(
                "job_events",
                id=event_id,
                job_id=i,
                at=created + offset,
                event=what,
                state=in_state.value,
                host=worker if what == "started" else "node-1",
                message=message,
            )
        if state == JobState.DELIVERED:
            for output in outputs:
                delivery_id += 1
                rows.add(
                    "deliveries",
                    id=delivery_id,
                    job_id=i,
                    destination="pacs",
                    output=output,
                    state=DeliveryState.DELIVERED.value,
                    attempts=1,
                    last_status="0x0000",
                    delivered_at=finished,
                    next_attempt_at=None,
                )
        done = state in (JobState.DELIVERED, JobState.FAILED)
        rows.add(
            "jobs",
            id=i,
            series_id=i,
            rule=rule,
            segmenter=RULES[rule][0] if rule else None,
            destinations=["pacs"] if rule else [],
            outputs=outputs,
            state=state.value,
            reason=reason,
            instance_count=slices,
            attempts=attempts,
            worker=worker,
            output_path=f"outputs/{i}" if done else "",
            output_sop_instance_uid=f"{UID_ROOT}.3.{i}" if done else "",
            created_at=created,
            updated_at=created + events[-1][0],
            started_at=started,
            finished_at=finished,
            lease_expires_at=now + _s(60) if state == JobState.RUNNING else None,
            hold_until=None,
        )
    for k, name in enumerate(WORKERS, start=1):
        rows.add(
            "workers",
            name=name,
            host=f"gpu-{k}",
            pid=100,
            gpu="NVIDIA L4",
            concurrency=2,
            started_at=now - timedelta(days=2),
            last_seen_at=now,
            stopped_at=None,
        )
    return rows


def _s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def _declines(rng: random.Random) -> list[str]:
    return [rng.choice(["modality MR is not CT", "3 slices, fewer than 40", "no match"]) for _ in RULES]


def insert(engine: Engine, url: str, rows: Rows) -> None:
    """Every row: COPY on PostgreSQL (ids given, so the sequences are set past them), else Core
    inserts in chunks; then the statistics a planner needs."""
    order = ["studies", "series", "jobs", "job_events", "deliveries", "workers"]
    if engine.dialect.name == "postgresql":
        with psycopg.connect(_libpq(url)) as conn:
            with conn.cursor() as cur:
                for name in order:
                    columns, table_rows = rows.tables[name]
                    fields = sql.SQL(", ").join(map(sql.Identifier, columns))
                    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(name), fields)
                    with cur.copy(copy_sql) as copy:
                        for row in table_rows:
                            copy.write_row([json.dumps(v) if isinstance(v, list) else v for v in row])
                    if "id" in columns:
                        cur.execute(
                            sql.SQL(
                                "SELECT setval(pg_get_serial_sequence({}, 'id'), (SELECT max(id) FROM {}))"
                            ).format(sql.Literal(name), sql.Identifier(name))
                        )
            conn.commit()
            conn.autocommit = True
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.SQL(", ").join(map(sql.Identifier, order))))
        return
    from node.db.models import Base

    with engine.begin() as conn:
        for name in order:
            columns, table_rows = rows.tables[name]
            table = Base.metadata.tables[name]
            for at in range(0, len(table_rows), 10_000):
                conn.execute(
                    table.insert(), [dict(zip(columns, r, strict=True)) for r in table_rows[at : at + 10_000]]
                )
        conn.exec_driver_sql("ANALYZE")


def _libpq(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as psycopg.connect takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def own_database() -> Iterator[str]:
    """A PostgreSQL database of this benchmark's, dropped first if a run left it, and at the end."""
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DEFAULT_DATABASE))
    with psycopg.connect(peers.PG_ADMIN_DSN, autocommit=True, connect_timeout=10) as conn:
        conn.execute(drop)
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DEFAULT_DATABASE)))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{DEFAULT_DATABASE}"
    finally:
        with psycopg.connect(peers.PG_ADMIN_DSN, autocommit=True, connect_timeout=10) as conn:
            conn.execute(drop)


class Client:
    """One keep-alive HTTP connection with the viewer's token."""

    def __init__(self, port: int, token: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.headers = {"Authorization": f"Bearer {token}"}

    def get(self, path: str) -> tuple[float, Any]:
        """Milliseconds from sending the request to the last byte of the answer, and the answer."""
        began = time.perf_counter()
        self.conn.request("GET", path, headers=self.headers)
        response = self.conn.getresponse()
        body = response.read()
        ms = (time.perf_counter() - began) * 1000
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {body[:300]!r}")
        json_body = response.getheader("content-type", "").startswith("application/json")
        return ms, json.loads(body) if json_body else body

    def close(self) -> None:
        self.conn.close()


class Recorder:
    """The statements every engine in this process runs, while on (the API's included)."""

    def __init__(self) -> None:
        self.on = False
        self.statements: list[tuple[str, Any]] = []

    def __call__(self, conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if self.on:
            self.statements.append((statement, parameters))


def start_api(url: str, data_dir: Path) -> ApiThread:
    settings = Settings(database_url=url, data_dir=data_dir, api=ApiSettings(port=peers.free_port()))
    if settings.database_url != url:
        raise SystemExit("SEGNODE_DATABASE_URL is set and would win over --database-url: unset it")
    api = ApiThread(settings)
    api.start()
    deadline = time.monotonic() + 30
    while not api.server.started:
        if not api.thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API did not start")
        time.sleep(0.05)
    return api


def query_kinds(client: Client, jobs: int, now: datetime, rng: random.Random) -> dict[str, Callable[[], str]]:
    """The paths each kind of request asks for (one job: a different job each time)."""
    cursor = None
    for _ in range(DEEP_PAGES):
        _, page = client.get("/api/jobs" + (f"?cursor={cursor}" if cursor else ""))
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    window = {
        "segmenter": FILTERED_SEGMENTER,
        "created_after": (now - timedelta(days=21)).isoformat(),
        "created_before": (now - timedelta(days=14)).isoformat(),
    }
    deep, filtered = f"/api/jobs?cursor={cursor}", f"/api/jobs?{urlencode(window)}"
    return {
        "first page": lambda: "/api/jobs",
        f"deep page ({DEEP_PAGES} pages in, cursor {cursor})": lambda: deep,
        "state=FAILED": lambda: "/api/jobs?state=FAILED",
        f"segmenter={FILTERED_SEGMENTER}, 7 days, 2-3 weeks ago": lambda: filtered,
        "one job (random id)": lambda: f"/api/jobs/{rng.randint(1, jobs)}",
        "dashboard: queue panel": lambda: "/ui/queue",
        "dashboard: workers panel": lambda: "/ui/workers",
        "dashboard: charts panel (14 days)": lambda: "/ui/charts",
        "dashboard: job page (random id)": lambda: f"/jobs/{rng.randint(1, jobs)}",
    }


def explain(engine: Engine, statements: list[tuple[str, Any]]) -> None:
    """EXPLAIN ANALYZE (PostgreSQL) or the query plan (SQLite) of each job query the API ran."""
    prefix = "EXPLAIN (ANALYZE, BUFFERS) " if engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN "
    tables = ("jobs", "job_events", "deliveries")
    with engine.connect() as conn:
        for statement, parameters in statements:
            if not statement.lstrip().upper().startswith("SELECT") or not any(
                f"FROM {t}" in statement or f"JOIN {t}" in statement for t in tables
            ):
                continue
            print(f"\n    {' '.join(statement.split())}\n    parameters: {parameters}")
            for line in conn.exec_driver_sql(prefix + statement, parameters):
                print("      " + " | ".join(str(v) for v in line))


def run(url: str, args: argparse.Namespace) -> bool:
    """Fill the database at ``url``, time the API on it; True when every p95 met the target."""
    db.upgrade(url)
    engine = db.make_engine(url)
    with engine.connect() as conn:
        if conn.scalar(select(func.count()).select_from(Job)):
            raise SystemExit(f"{make_url(url).render_as_string()} has jobs already: give an empty database")
        version = ".".join(map(str, engine.dialect.server_version_info or ()))
        backend = f"{engine.dialect.name} {version}, schema {db.current_revision(engine)}"
    now = datetime.now(UTC)
    began = time.perf_counter()
    rows = make_rows(args.jobs, now, args.seed)
    made = time.perf_counter() - began
    began = time.perf_counter()
    insert(engine, url, rows)
    inserted = time.perf_counter() - began
    tables = ("studies", "series", "jobs", "job_events", "deliveries", "workers")
    counts = {name: rows.count(name) for name in tables}
    del rows
    print(
        f"{backend}: {', '.join(f'{n:,} {name}' for name, n in counts.items())}; "
        f"rows made in {made:.1f} s, inserted (with VACUUM ANALYZE) in {inserted:.1f} s",
        flush=True,
    )
    with db.session_scope(db.make_sessionmaker(engine)) as session:
        user = add_user(session, "bench-viewer", secrets.token_urlsafe(18), Role.VIEWER)
        token, _ = issue_token(session, user, "benchmarks.api_job_list", None)

    recorder = Recorder()
    event.listen(Engine, "before_cursor_execute", recorder)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="segnode-bench-api-") as data:
        api = start_api(url, Path(data))
        client = Client(api.server.config.port, token)
        try:
            kinds = query_kinds(client, args.jobs, now, rng)
            for path in kinds.values():
                for _ in range(WARMUP):
                    client.get(path())
            times: dict[str, list[float]] = {kind: [] for kind in kinds}
            for _ in range(args.requests):  # kinds interleaved: the machine's drift falls on all alike
                for kind, path in kinds.items():
                    times[kind].append(client.get(path())[0])
            statements: dict[str, list[tuple[str, Any]]] = {}
            for kind, path in kinds.items():
                recorder.statements, recorder.on = [], True
                client.get(path())
                recorder.on = False
                statements[kind] = recorder.statements
        finally:
            client.close()
            api.stop()
            event.remove(Engine, "before_cursor_execute", recorder)

    print(f"\n{args.jobs:,} jobs on {backend}, {args.requests} requests a kind after {WARMUP} to warm up\n")
    print(f"| query | p50 ms | p95 ms | max ms | p95 / {TARGET_MS:g} ms |")
    print("| --- | --- | --- | --- | --- |")
    slow = []
    for kind, samples in times.items():
        p95 = statistics.quantiles(samples, n=100, method="inclusive")[94]
        ratio = p95 / TARGET_MS
        if ratio > 1:
            slow.append(kind)
        print(
            f"| {kind} | {statistics.median(samples):.1f} | {p95:.1f} | {max(samples):.1f} | "
            f"{ratio:.2f}{' (over)' if ratio > 1 else ''} |"
        )
    for kind in times if args.explain else slow:
        print(f"\nThe SQL the API ran for '{kind}':")
        explain(engine, statements[kind])
    engine.dispose()
    return not slow


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--database-url",
        help="an empty database, filled and left so (default: a PostgreSQL one of its own, dropped after)",
    )
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200, help="timed requests per query kind")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--check", action="store_true", help="exit 1 if a p95 is over the target")
    parser.add_argument("--explain", action="store_true", help="the plans of every kind, not only slow ones")
    args = parser.parse_args()
    if args.database_url:
        met = run(args.database_url, args)
    else:
        with own_database() as url:
            met = run(url, args)
    if args.check and not met:
        sys.exit(1)


if __name__ == "__main__":
    main()
