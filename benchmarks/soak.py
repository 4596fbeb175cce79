"""Soak: senders keep sending CT series while the node, its worker, PostgreSQL, Redis and the PACS
are killed (SIGKILL) and restarted at random moments; at the end every acknowledged instance is
stored, and every series has one DELIVERED job and one SEG at the PACS.

    .venv/bin/python -m benchmarks.soak [--minutes 5] [--senders 4] [--slices 20] [--seed 1]

The node runs as in production: `segnode serve --no-workers` and a `segnode worker`, on a
PostgreSQL and a Redis (appendonly, fsync always) of the soak's own, delivering to an Orthanc. A
sender is a modality: it sends each series in one association and, when that fails, sends what was
not acknowledged again until it is. Prints the faults, then acknowledged instances, instances
stored, series, jobs DELIVERED, SEGs at the PACS and duplicates; exits 1 if an invariant failed.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from node.core.dicom import CT_IMAGE
from node.db.models import TERMINAL_STATES, Instance, Job, JobState, Series
from tests import dicom_factory as factory
from tests import peers
from tests.node_process import SegnodeProcesses

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
# Seconds between two faults, drawn uniformly; and how long a killed server stays down.
FAULT_EVERY_S = (10.0, 30.0)
DOWN_S = (1.0, 5.0)
SENDER_RETRY_S = 0.5


class Postgres:
    """A PostgreSQL cluster of the soak's own (initdb in its folder), killed as a crash is."""

    def __init__(self, workdir: Path) -> None:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
        if not versions:
            raise FileNotFoundError("PostgreSQL not installed: ./dev setup --test installs it")
        self.bin = versions[-1]
        self.dir = workdir / "pg"
        self.dir.mkdir()
        self.port = peers.free_port()
        self.log = workdir / "postgres.log"
        # PostgreSQL will not run as root; as its own user it is still this process's child, so
        # that a killed one is reaped before the next start reads its lock file.
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(workdir, self.user)
            shutil.chown(self.dir, self.user)
        init = [str(self.bin / "initdb"), "-D", str(self.dir), "-A", "trust", "-U", "postgres", "--no-sync"]
        subprocess.run(init, check=True, capture_output=True, user=self.user)
        self.process: peers.PeerProcess | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@{peers.LOCALHOST}:{self.port}/postgres"

    def start(self) -> None:
        options = ["-p", str(self.port), "-k", str(self.dir), "-c", f"listen_addresses={peers.LOCALHOST}"]
        argv = [str(self.bin / "postgres"), "-D", str(self.dir), *options]
        self.process = peers.PeerProcess(argv, self.log, self.dir.parent, os.environ, user=self.user)
        deadline = time.monotonic() + 60
        while subprocess.run(
            [str(self.bin / "pg_isready"), "-q", "-h", peers.LOCALHOST, "-p", str(self.port)], check=False
        ).returncode:
            if time.monotonic() > deadline or not self.process.alive():
                raise RuntimeError(f"PostgreSQL did not start:\n{self.process.log()}")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.process is not None:
            self.process.stop(grace=0)


class Redis:
    """A Redis of the soak's own that loses nothing it acknowledged (appendonly, fsync always)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "redis"
        self.dir.mkdir()
        self.port = peers.free_port()
        self.process: peers.PeerProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://{peers.LOCALHOST}:{self.port}/0"

    def start(self) -> None:
        options = ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        argv = ["redis-server", "--port", str(self.port), "--bind", peers.LOCALHOST, "--dir", str(self.dir)]
        self.process = peers.PeerProcess([*argv, *options], self.dir / "redis.log", self.dir, os.environ)
        peers.wait_for_port(self.port, timeout=30)

    def kill(self) -> None:
        if self.process is not None:
            self.process.stop(grace=0)


class Pacs:
    """Orthanc on fixed ports, its storage kept across restarts."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "pacs"
        self.ports = {"DicomPort": peers.free_port(), "HttpPort": peers.free_port()}
        self.orthanc: peers.Orthanc | None = None

    def start(self) -> None:
        self.orthanc = peers.start_orthanc(self.dir, config=self.ports, dicomweb=False, attempts=1)

    def kill(self) -> None:
        if self.orthanc is not None:
            self.orthanc.process.stop(grace=0)

    def segs(self) -> dict[str, set[str]]:
        """SEG SOP instance UIDs at the PACS by the series they segment."""
        assert self.orthanc is not None
        found = self.orthanc.post("/tools/find", {"Level": "Instance", "Query": {"Modality": "SEG"}})
        by_series: dict[str, set[str]] = defaultdict(set)
        for instance in found:
            tags = self.orthanc.instance_tags(instance)
            if tags.get("SOPClassUID") == SEG:
                source = tags["ReferencedSeriesSequence"][0]["SeriesInstanceUID"]
                by_series[source].add(tags["SOPInstanceUID"])
        return by_series


@dataclass
class Sent:
    """What the senders were told: each series' instances, and those acknowledged."""

    series: dict[str, list[str]] = field(default_factory=dict)
    acknowledged: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Sender(threading.Thread):
    """A modality: series after series until the deadline, each until all of it is acknowledged."""

    def __init__(self, number: int, node: SegnodeProcesses, folder: Path, slices: int, sent: Sent) -> None:
        super().__init__(name=f"sender-{number}", daemon=True)
        self.ae_title = f"SOAK{number}"
        self.node, self.folder, self.slices, self.sent = node, folder, slices, sent
        self.until = 0.0
        self.failed_attempts = 0

    def run(self) -> None:
        count = 0
        while time.monotonic() < self.until:
            paths = factory.make_ct_series(self.folder / f"s{count}", n_slices=self.slices)
            datasets: list[Dataset] = [dcmread(p) for p in paths]
            with self.sent.lock:
                self.sent.series[datasets[0].SeriesInstanceUID] = [ds.SOPInstanceUID for ds in datasets]
            while datasets:
                datasets = self._send(datasets)
                if datasets:
                    self.failed_attempts += 1
                    time.sleep(SENDER_RETRY_S)
            shutil.rmtree(self.folder / f"s{count}")
            count += 1

    def _send(self, datasets: list[Dataset]) -> list[Dataset]:
        """Send in one association; what is left to send."""
        ae = AE(ae_title=self.ae_title)
        # pynetdicom 3.0.4's SCU now and then waits for a response that has arrived: it gives up
        # after this, and sends what was not acknowledged again, well within the quiet period.
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
        ae.add_requested_context(CT_IMAGE, [ExplicitVRLittleEndian])
        assoc = ae.associate(peers.LOCALHOST, self.node.port, ae_title="SEGNODE")
        if not assoc.is_established:
            return datasets
        left = list(datasets)
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                if status.get("Status") != 0:
                    break
                with self.sent.lock:
                    self.sent.acknowledged.add(ds.SOPInstanceUID)
                left.remove(ds)
        finally:
            if assoc.is_established:
                assoc.release()
        return left


@dataclass
class Report:
    faults: Counter[str]
    acknowledged: int
    stored: int
    series: int
    delivered: int
    series_one_delivered: int
    segs: int
    series_one_seg: int
    unsettled: list[str]
    duplicates: list[str]
    resends: int

    @property
    def ok(self) -> bool:
        return (
            self.acknowledged == self.stored
            and self.series_one_delivered == self.series == self.series_one_seg
            and not self.unsettled
            and not self.duplicates
        )

    def __str__(self) -> str:
        faults = ", ".join(f"{what} {n}" for what, n in sorted(self.faults.items())) or "none"
        lines = [
            f"faults (each killed with SIGKILL, then started again): {faults}",
            f"series sent again after a failed association: {self.resends}",
            f"acknowledged instances   {self.acknowledged}",
            f"instances stored         {self.stored}  (acknowledged ones, read back whole)",
            f"series                   {self.series}",
            f"jobs DELIVERED           {self.delivered}  ({self.series_one_delivered} series with one)",
            f"SEGs at the PACS         {self.segs}  ({self.series_one_seg} series with one)",
            f"duplicates               {len(self.duplicates)}",
            *(f"  {d}" for d in self.duplicates),
            *(f"  not settled: {u}" for u in self.unsettled),
            "every invariant held" if self.ok else "AN INVARIANT FAILED",
        ]
        return "\n".join(lines)


def run(minutes: float, senders: int, slices: int, seed: int, workdir: Path, drain_s: float) -> Report:
    rng = random.Random(seed)
    postgres, redis, pacs = Postgres(workdir), Redis(workdir), Pacs(workdir)
    node: SegnodeProcesses | None = None
    try:
        for server in (postgres, redis, pacs):
            server.start()
        node = SegnodeProcesses(
            workdir / "node",
            {
                "database_url": postgres.url,
                # The default: far longer than a node restart or a sender's stall, so a series cut
                # short is finished before it is assembled (a sender paused longer is a new job).
                "quiet_period_s": 30.0,
                "scp": {"network_timeout_s": 10.0, "max_associations": 16},
                "worker": {
                    "broker_url": redis.url,
                    "lease_s": 5,
                    "delivery_timeout_s": 5,
                    "delivery_max_attempts": 1000,
                    "delivery_backoff_s": 1.0,
                    "delivery_backoff_max_s": 5.0,
                    "stale_job_s": 60,
                },
                "destinations": {
                    "pacs": {"ae_title": "ORTHANC", "host": peers.LOCALHOST, "port": pacs.ports["DicomPort"]}
                },
                "rules": [{"name": "ct", "min_slices": 3, "destinations": ["pacs"]}],
            },
        )
        processes = {"serve": node.serve(workers=False), "worker": node.worker()}

        def restart(name: str) -> None:
            assert node is not None
            node.kill(processes[name])
            processes[name] = node.serve(workers=False, upgrade=False) if name == "serve" else node.worker()

        def down_and_up(server: Postgres | Redis | Pacs) -> None:
            server.kill()
            time.sleep(rng.uniform(*DOWN_S))  # the outage itself, not a wait for a state
            server.start()

        faults: dict[str, object] = {
            "node": lambda: restart("serve"),
            "worker": lambda: restart("worker"),
            "postgres": lambda: down_and_up(postgres),
            "redis": lambda: down_and_up(redis),
            "pacs": lambda: down_and_up(pacs),
        }
        sent = Sent()
        started = time.monotonic()
        crew = [Sender(n + 1, node, workdir / f"sender-{n + 1}", slices, sent) for n in range(senders)]
        for sender in crew:
            sender.until = started + minutes * 60
            sender.start()
        happened: Counter[str] = Counter()
        order: list[str] = []
        while (wait := rng.uniform(*FAULT_EVERY_S)) < started + minutes * 60 - time.monotonic():
            time.sleep(wait)
            if not order:  # every kind of fault once in each round, in a random order
                order = rng.sample(sorted(faults), len(faults))
            what = order.pop()
            faults[what]()  # type: ignore[operator]
            happened[what] += 1
            print(f"{time.monotonic() - started:7.1f} s  {what} killed and started again", flush=True)
        for sender in crew:
            sender.join()
        print(
            f"{time.monotonic() - started:7.1f} s  senders done; waiting for every job to settle", flush=True
        )
        return _check(node, pacs, sent, happened, drain_s, sum(s.failed_attempts for s in crew))
    finally:
        if node is not None:
            node.stop_all()
        for server in (pacs, redis, postgres):
            server.kill()


def _check(
    node: SegnodeProcesses, pacs: Pacs, sent: Sent, faults: Counter[str], drain_s: float, resends: int
) -> Report:
    engine = sa.create_engine(node.database_url)
    storage = Path(node.values["data_dir"]) / "storage"

    def jobs_by_series() -> dict[str, list[Job]]:
        with sa.orm.Session(engine) as session:
            rows = session.execute(sa.select(Series.series_instance_uid, Job).join(Job.series)).all()
        found: dict[str, list[Job]] = defaultdict(list)
        for uid, job in rows:
            found[uid].append(job)
        return found

    def settled() -> bool:
        jobs = jobs_by_series()
        return all(
            any(j.state == JobState.DELIVERED for j in jobs.get(uid, []))
            and all(j.state in TERMINAL_STATES for j in jobs[uid])
            for uid in sent.series
        )

    deadline = time.monotonic() + drain_s
    while not settled() and time.monotonic() < deadline:
        time.sleep(1.0)
    with sa.orm.Session(engine) as session:
        rows = session.execute(sa.select(Instance.sop_instance_uid, Instance.path)).all()
    engine.dispose()
    paths = dict(rows)
    stored = sum(
        uid in paths and dcmread(storage / paths[uid]).SOPInstanceUID == uid for uid in sent.acknowledged
    )
    jobs = jobs_by_series()
    segs = pacs.segs()
    delivered = {uid: sum(j.state == JobState.DELIVERED for j in jobs.get(uid, [])) for uid in sent.series}
    duplicates = [f"series {uid}: {n} DELIVERED jobs" for uid, n in delivered.items() if n > 1]
    duplicates += [f"series {uid}: {len(s)} SEGs" for uid, s in segs.items() if len(s) > 1]
    unsettled = [
        f"series {uid}: "
        + ", ".join(f"job {j.id} {j.state.value} {j.reason}".strip() for j in jobs.get(uid, []))
        for uid in sent.series
        if delivered[uid] == 0 or any(j.state not in TERMINAL_STATES for j in jobs.get(uid, []))
    ]
    return Report(
        faults=faults,
        acknowledged=len(sent.acknowledged),
        stored=stored,
        series=len(sent.series),
        delivered=sum(delivered.values()),
        series_one_delivered=sum(n == 1 for n in delivered.values()),
        segs=sum(len(s) for s in segs.values()),
        series_one_seg=sum(len(segs.get(uid, ())) == 1 for uid in sent.series),
        unsettled=unsettled,
        duplicates=duplicates,
        resends=resends,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="how long the senders send (default 5)")
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--slices", type=int, default=20, help="slices per series (64x64)")
    parser.add_argument("--seed", type=int, default=1, help="the faults' moments and kinds")
    parser.add_argument("--drain", type=float, default=300.0, help="seconds the jobs may take to settle")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="segnode-soak-") as folder:
        os.chmod(folder, 0o755)  # noqa: S103 - PostgreSQL's own user works below it
        report = run(args.minutes, args.senders, args.slices, args.seed, Path(folder), args.drain)
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
