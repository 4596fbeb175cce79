"""STOW-RS ingest (issue 16): the same 300 CT slices as one streamed multipart/related POST to
segnode's /dicomweb/studies, against C-STORE to segnode by storescu and against Orthanc's own STOW-RS,
alternating in one run, each turn a fresh copy of the series and checked for every instance stored.

    .venv/bin/python -m benchmarks.stow [--slices 300] [--size 512] [--repeats 3] [--settle 2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import Engine, func, select

from benchmarks.ingest import DEFAULT_FAST_PATH, make_series, send, settled
from node.db import engine as db
from node.db.models import Instance, Series
from tests import peers
from tests.node_process import SegnodeProcesses

CSTORE = "(a) C-STORE to segnode (storescu)"
STOW = "(b) STOW-RS to segnode"
ORTHANC = "(c) STOW-RS to Orthanc"
CONDITIONS = (CSTORE, STOW, ORTHANC)
SENDER = "bench-sender"
BOUNDARY = "segnode-bench-" + secrets.token_hex(8)
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
REFERENCED = "00081199"  # ReferencedSOPSequence
FAILED = "00081198"  # FailedSOPSequence
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Turn:
    seconds: float
    cpu_s: float  # CPU seconds of the receiver's processes during the send


# --- the data ----------------------------------------------------------------------------------------


def fresh_copy(paths: list[Path], folder: Path) -> list[Path]:
    """The series again with new study, series and SOP instance UIDs: nothing a receiver has seen."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    copies = []
    for path in paths:
        ds = pydicom.dcmread(path)
        sop = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        copy = folder / f"{sop}.dcm"
        ds.save_as(copy, enforce_file_format=True)
        copies.append(copy)
    return copies


def part_head() -> bytes:
    return f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()


def body_length(paths: list[Path]) -> int:
    closing = len(f"--{BOUNDARY}--\r\n")
    return sum(len(part_head()) + p.stat().st_size + 2 for p in paths) + closing


def body(paths: list[Path]) -> Iterator[bytes]:
    """The multipart/related body, one part (read from its file) at a time."""
    for path in paths:
        yield part_head() + path.read_bytes() + b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


# --- STOW-RS by http.client ----------------------------------------------------------------------
# The client costs next to nothing: the stdlib's http.client on a connection opened before the clock
# starts, the body streamed from the files a part at a time with its Content-Length (not chunked),
# nothing decoded (dicomweb-client would parse every file with pydicom). The clock runs from the
# first byte sent to the answer read whole; segnode answers after every file and row is synced.


def stow(port: int, path: str, paths: list[Path], token: str | None) -> tuple[float, dict[str, Any]]:
    """POST the series as one STOW-RS request; seconds from the first byte sent to the whole answer,
    and the answer (DICOM JSON). The connection is open before the clock starts."""
    headers = {
        "Content-Type": CONTENT_TYPE,
        "Content-Length": str(body_length(paths)),
        "Accept": "application/dicom+json",
    }
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    connection = http.client.HTTPConnection(peers.LOCALHOST, port, timeout=900)
    try:
        connection.connect()
        start = time.perf_counter()
        connection.request("POST", path, body=body(paths), headers=headers)
        response = connection.getresponse()
        payload = response.read()
        elapsed = time.perf_counter() - start
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"STOW-RS to {port}{path}: HTTP {response.status}: {payload[:2000]!r}")
    answer: dict[str, Any] = json.loads(payload)
    return elapsed, answer


def referenced(answer: dict[str, Any]) -> int:
    if answer.get(FAILED, {}).get("Value"):
        raise RuntimeError(f"STOW-RS answer names failed instances: {json.dumps(answer[FAILED])[:2000]}")
    return len(answer.get(REFERENCED, {}).get("Value", []))


# --- CPU time from /proc ---------------------------------------------------------------------------


def group_cpu(pgid: int) -> float:
    """CPU seconds of every process in the group (the receiver, started in a session of its own)."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                text = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid:
                total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def measured(pgid: int, send_once: Callable[[], float]) -> Turn:
    """``send_once()`` after ``sync``, with the receiver's CPU seconds over it."""
    holder: dict[str, float] = {}

    def measure() -> float:
        holder["before"] = group_cpu(pgid)
        seconds = send_once()
        holder["cpu"] = group_cpu(pgid) - holder["before"]
        return seconds

    seconds = settled(measure)
    return Turn(seconds, holder["cpu"])


# --- the receivers -------------------------------------------------------------------------------


class Receivers:
    """The node (API on, no workers, no rules: every instance stored and recorded, each series then
    a REJECTED job) with a sender's token, and Orthanc with its DICOMweb plugin; both serve every
    round, so that each turn's series must be new to them."""

    def __init__(self, root: Path) -> None:
        self.node = SegnodeProcesses(
            root / "node",
            {
                "quiet_period_s": 3600,  # no series completes by silence during a send
                "scp": {"max_associations": 16, "fast_path": DEFAULT_FAST_PATH},
                "api": {"enabled": True},
            },
        )
        self.orthanc_dir = root / "orthanc"
        self.orthanc: peers.Orthanc | None = None
        self.token = ""
        self.node_pgid = 0
        self._engine: Engine | None = None

    def start(self) -> None:
        self.node.upgrade()
        self.node.add_user(SENDER, "sender", secrets.token_urlsafe(18))
        self.token = self.node.token(SENDER, "benchmarks.stow")
        self.node_pgid = self.node.serve(workers=False, upgrade=False).pid
        peers.wait_for_port(self.api_port, timeout=60)
        self.orthanc = peers.start_orthanc(self.orthanc_dir, dicomweb=True)

    @property
    def api_port(self) -> int:
        return int(self.node.values["api"]["port"])

    def stored_in_node(self, series_uid: str) -> int:
        """Instance rows of the series in the node's database."""
        if self._engine is None:
            self._engine = db.make_engine(self.node.database_url)
        with self._engine.connect() as connection:
            count = connection.scalar(
                select(func.count(Instance.id))
                .join(Series, Instance.series_id == Series.id)
                .where(Series.series_instance_uid == series_uid)
            )
        return int(count or 0)

    def orthanc_instances(self) -> int:
        assert self.orthanc is not None
        return int(self.orthanc.get("/statistics")["CountInstances"])

    def stop(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
        self.node.stop_all()
        if self.orthanc is not None:
            self.orthanc.stop(graceful=False)


def turn(receivers: Receivers, condition: str, paths: list[Path]) -> Turn:
    """One condition's send of ``paths`` (a fresh copy), checked: every instance stored."""
    n = len(paths)
    series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    answers: list[dict[str, Any]] = []

    def post(port: int, path: str, token: str | None) -> float:
        seconds, answer = stow(port, path, paths, token)
        answers.append(answer)
        return seconds

    if condition == ORTHANC:
        orthanc = receivers.orthanc
        assert orthanc is not None
        before = receivers.orthanc_instances()
        result = measured(orthanc.process.pid, lambda: post(orthanc.http_port, "/dicom-web/studies", None))
        found = receivers.orthanc_instances() - before
    elif condition == STOW:
        result = measured(
            receivers.node_pgid, lambda: post(receivers.api_port, "/dicomweb/studies", receivers.token)
        )
        found = receivers.stored_in_node(series_uid)
    else:
        result = measured(receivers.node_pgid, lambda: send(paths, receivers.node.port, "SEGNODE"))
        found = receivers.stored_in_node(series_uid)
    if answers and referenced(answers[0]) != n:
        raise RuntimeError(f"{condition}: the STOW-RS answer references {referenced(answers[0])} of {n}")
    if found != n:
        raise RuntimeError(f"{condition}: {found} of {n} instances stored")
    return result


# --- the run ---------------------------------------------------------------------------------------


def report(results: dict[str, list[Turn]], n: int) -> None:
    print("\n| condition | seconds per round | median | inst/s | receiver CPU s (median) |")
    print("| --- | --- | --- | --- | --- |")
    median: dict[str, float] = {}
    for condition in CONDITIONS:
        turns = results[condition]
        median[condition] = statistics.median(t.seconds for t in turns)
        runs = ", ".join(f"{t.seconds:.2f}" for t in turns)
        cpu = statistics.median(t.cpu_s for t in turns)
        print(f"| {condition} | {runs} | {median[condition]:.2f} | {n / median[condition]:.0f} | {cpu:.2f} |")

    def ratio(top: str, bottom: str, label: str) -> None:
        per_round = [a.seconds / b.seconds for a, b in zip(results[top], results[bottom], strict=True)]
        rounds = ", ".join(f"{r:.2f}" for r in per_round)
        print(
            f"  {label}: {median[top] / median[bottom]:.2f}   "
            f"(median of each round's ratio {statistics.median(per_round):.2f}: {rounds})"
        )

    print("\nratios of times (below 1: STOW-RS to segnode is the faster):")
    ratio(STOW, CSTORE, "STOW-RS segnode / C-STORE segnode")
    ratio(STOW, ORTHANC, "STOW-RS segnode / STOW-RS Orthanc")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of rest before each turn")
    args = parser.parse_args()

    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="segnode-bench-stow-"))
    receivers = Receivers(root)
    try:
        (series,) = make_series(root / "data", 1, args.slices, args.size)
        n = len(series)
        megabytes = sum(p.stat().st_size for p in series) / 1e6
        receivers.start()
        print(f"series: {n} instances, {args.size}x{args.size}, uncompressed, {megabytes:.0f} MB")
        print(f"CPUs: {os.cpu_count()}; load average before: {os.getloadavg()[0]:.2f}")
        print(
            f"segnode serve --no-workers: embedded SQLite and broker, API on 127.0.0.1:{receivers.api_port}, "
            f"no rules, {'fast path' if DEFAULT_FAST_PATH else 'plain pynetdicom'}; Orthanc "
            "with Debian's DICOMweb plugin; STOW-RS client: http.client, one streamed POST"
        )
        results: dict[str, list[Turn]] = {c: [] for c in CONDITIONS}
        segnode_series = 0
        for r in range(args.repeats):
            order = CONDITIONS[r % 3 :] + CONDITIONS[: r % 3]
            for condition in order:
                folder = root / f"round{r}-{CONDITIONS.index(condition)}"
                paths = fresh_copy(series, folder)
                time.sleep(args.settle)
                result = turn(receivers, condition, paths)
                results[condition].append(result)
                print(f"  round {r + 1}, {condition}: {result.seconds:.2f} s", flush=True)
                shutil.rmtree(folder, ignore_errors=True)
                if condition != ORTHANC:
                    segnode_series += 1
                    receivers.node.wait_for_job_count(segnode_series, 60)  # routed before the next turn
        report(results, n)
        print(
            f"\nload average after: {os.getloadavg()[0]:.2f}; wall time {time.perf_counter() - started:.0f} s"
        )
    finally:
        receivers.stop()
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["sync"], check=False)


if __name__ == "__main__":
    main()
