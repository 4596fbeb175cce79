"""End to end: seconds from the last instance sent to the SEG stored in Orthanc, minus the quiet period.

    .venv/bin/python -m benchmarks.end_to_end [--slices 300] [--size 512]

Runs `segnode serve` (embedded default: SQLite, embedded broker, one worker) with the classical
segmenter and Orthanc as the PACS, for a synthetic uncompressed thorax-like series of --slices slices
and for the real JPEG 2000 series in ../shared/data (20 slices). Prints the total and its split from
the job's history: waiting for the worker, load/decode, segment, write SEG, send.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
from pathlib import Path

from sqlalchemy import select

from node.db import engine as db
from node.db.models import Job, JobEvent
from tests import dicom_factory as factory
from tests import peers
from tests.node_process import SegnodeProcesses
from tests.shared_data import real_j2k_copy

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
QUIET_S = 1.0


def wait_for_seg(orthanc: peers.Orthanc, known: set[str], timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for instance in set(orthanc.instances()) - known:
            if orthanc.instance_tags(instance).get("SOPClassUID") == SEG:
                return time.perf_counter()
            known.add(instance)
        time.sleep(0.05)
    raise TimeoutError("no SEG arrived in Orthanc")


def _job_events(node: SegnodeProcesses, timeout: float = 60) -> dict[str, JobEvent]:
    """The last job's events, once it has one saying it was delivered: the SEG reaches the PACS
    a moment before the worker records that the PACS answered."""
    engine = db.make_engine(node.database_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with db.make_sessionmaker(engine)() as session:
                job = session.scalars(select(Job).order_by(Job.id.desc())).first()
                assert job is not None
                events = {
                    e.event: e
                    for e in session.scalars(
                        select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)
                    )
                }
            if "delivered" in events or time.monotonic() > deadline:
                return events
            time.sleep(0.05)
    finally:
        engine.dispose()


def split(node: SegnodeProcesses) -> tuple[dict[str, float], str]:
    events = _job_events(node)
    steps = {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+) s", events["segmented"].message)}
    decoders = re.search(r"\((.*decoded by.*)\)", events["segmented"].message)
    return {
        "queue to worker": (events["started"].at - events["created"].at).total_seconds(),
        **steps,
        "send": (events["delivered"].at - events["segmented"].at).total_seconds(),
    }, decoders.group(1) if decoders else ""


def run(name: str, paths: list[Path], work: Path, extra_args: list[str]) -> None:
    orthanc = peers.start_orthanc(work / "orthanc", dicomweb=False)
    node = SegnodeProcesses(
        work / "segnode",
        {
            "quiet_period_s": QUIET_S,
            "destinations": {
                "pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
            },
            "rules": [{"name": "ct", "min_slices": 3, "destinations": ["pacs"]}],
        },
    )
    try:
        node.serve()
        time.sleep(8)  # let the worker start and load its segmenter before the clock runs
        known = set(orthanc.instances())
        sent = peers.storescu(paths, node.port, aet="SEGNODE", extra_args=["-R", *extra_args], timeout=900)
        if sent.returncode != 0:
            raise RuntimeError(sent.stdout + sent.stderr)
        last_sent = time.perf_counter()
        arrived = wait_for_seg(orthanc, known)
        total = arrived - last_sent - QUIET_S
        print(f"\n{name}: {len(paths)} instances")
        print(f"  last instance sent -> SEG in Orthanc, minus the {QUIET_S:g} s quiet period: {total:.2f} s")
        steps, decoders = split(node)
        for step, seconds in steps.items():
            print(f"    {step:<16} {seconds:6.2f} s" + (f"   ({decoders})" if step == "load_decode" else ""))
    finally:
        node.stop_all()
        orthanc.stop(graceful=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="segnode-bench-e2e-"))
    try:
        synthetic = factory.make_ct_series(
            root / "synthetic", n_slices=args.slices, rows=args.size, cols=args.size, pixel_spacing=(0.8, 0.8)
        )
        run(f"synthetic {args.size}x{args.size} uncompressed", synthetic, root / "run-synthetic", [])
        run("real JPEG 2000 abdomen (../shared/data)", real_j2k_copy(root / "j2k"), root / "run-j2k", ["-xv"])
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
