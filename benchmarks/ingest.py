"""Ingest: the same uncompressed CT series sent by DCMTK storescu to segnode and to its peers.

    .venv/bin/python -m benchmarks.ingest [--slices 300] [--size 512] [--repeats 3]

Side by side in one run, each into fresh storage:
  - segnode (`segnode serve --no-workers`: durable write + fsync + rename + database row before success),
    in its default configuration and on its other receive path (scp.fast_path flipped),
  - DCMTK storescp (writes files, no fsync),
  - Orthanc (its own storage and SQLite index),
  - the floor: copying the same files with fsync + rename, no network.
Then four storescu senders at once (four series, a quarter of the slices each) to segnode with one
listener process and with two (``scp.processes``), against one sender for the same instances.
Each receiver starts after ``sync``: nothing another one left in the page cache is written back
during its turn (storescp and Orthanc sync nothing themselves).

Every DCMTK program and Orthanc runs with TCP_NODELAY=1 in its environment: Debian's DCMTK 3.6.7
leaves Nagle's algorithm on otherwise, which costs ~45 ms an instance on loopback. segnode sets
TCP_NODELAY on its own sockets. Prints seconds, instances/s and the ratios; the median of --repeats.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from node.core.config import ScpSettings
from tests import dicom_factory as factory
from tests import peers
from tests.node_process import SegnodeProcesses

DEFAULT_FAST_PATH = ScpSettings().fast_path
OTHER_PATH = "segnode, " + ("plain pynetdicom" if DEFAULT_FAST_PATH else "fast path")


def make_series(folder: Path, n_series: int, slices: int, size: int) -> list[list[Path]]:
    return [
        factory.make_ct_series(
            folder / f"s{i}", n_slices=slices, rows=size, cols=size, pixel_spacing=(0.8, 0.8), spacing=1.0
        )
        for i in range(n_series)
    ]


def send(paths: list[Path], port: int, aet: str) -> float:
    start = time.perf_counter()
    result = peers.storescu(paths, port, aet=aet, calling_aet="BENCH", extra_args=["-R"], timeout=900)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {aet} failed: {result.stdout}{result.stderr}")
    return elapsed


def send_parallel(groups: list[list[Path]], port: int, aet: str) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(len(groups)) as pool:
        list(pool.map(lambda g: send(g, port, aet), groups))
    return time.perf_counter() - start


def fsync_copy(paths: list[Path], target: Path) -> float:
    target.mkdir(parents=True)
    start = time.perf_counter()
    for path in paths:
        data = path.read_bytes()
        temp = target / f".{path.name}.part"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target / path.name)
        dir_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    return time.perf_counter() - start


def with_segnode(
    work: Path, run: Callable[[int], float], fast_path: bool = DEFAULT_FAST_PATH, processes: int = 1
) -> float:
    scp = {"max_associations": 16, "fast_path": fast_path, "processes": processes}
    node = SegnodeProcesses(work, {"quiet_period_s": 3600, "scp": scp})
    try:
        node.serve(workers=False)
        if processes > 1:
            node.wait_for_log("serve", f"listener process {processes} of {processes} serving")
        return run(node.port)
    finally:
        node.stop_all()


def with_storescp(work: Path, run: Callable[[int], float], fork: bool = False) -> float:
    scp = peers.start_storescp(work, fork=fork)
    try:
        return run(scp.port)
    finally:
        scp.stop()


def with_orthanc(work: Path, run: Callable[[int], float]) -> float:
    orthanc = peers.start_orthanc(work, dicomweb=False)
    try:
        return run(orthanc.dicom_port)
    finally:
        orthanc.stop(graceful=False)


def settled(measure: Callable[[], float]) -> float:
    """``measure()`` once the page cache holds nothing dirty: storescp and Orthanc leave their
    158 MB to the kernel's writeback, which would otherwise run during the next receiver's turn
    and slow whichever comes next (segnode's fsyncs most)."""
    os.sync()
    return measure()


def run_once(run_dir: Path, single: list[Path], quarters: list[list[Path]]) -> dict[str, float]:
    """One round of every receiver, each into fresh storage under ``run_dir``."""
    everything = [x for q in quarters for x in q]
    timings = {
        "fsync copy floor": settled(lambda: fsync_copy(single, run_dir / "floor")),
        "DCMTK storescp": settled(
            lambda: with_storescp(run_dir / "storescp", lambda p: send(single, p, "STORESCP"))
        ),
        "Orthanc": settled(lambda: with_orthanc(run_dir / "orthanc", lambda p: send(single, p, "ORTHANC"))),
        "segnode": settled(lambda: with_segnode(run_dir / "segnode", lambda p: send(single, p, "SEGNODE"))),
        OTHER_PATH: settled(
            lambda: with_segnode(
                run_dir / "other", lambda p: send(single, p, "SEGNODE"), fast_path=not DEFAULT_FAST_PATH
            )
        ),
        "segnode, 4 senders": settled(
            lambda: with_segnode(run_dir / "segnode4", lambda p: send_parallel(quarters, p, "SEGNODE"))
        ),
        "segnode, 4 senders, 2 listener processes": settled(
            lambda: with_segnode(
                run_dir / "segnode4p", lambda p: send_parallel(quarters, p, "SEGNODE"), processes=2
            )
        ),
        "segnode, 1 sender, same 4 series": settled(
            lambda: with_segnode(run_dir / "segnode1", lambda p: send(everything, p, "SEGNODE"))
        ),
    }
    shutil.rmtree(run_dir, ignore_errors=True)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="segnode-bench-ingest-"))
    try:
        (single,) = make_series(root / "data", 1, args.slices, args.size)
        quarters = make_series(root / "data4", 4, args.slices // 4, args.size)
        n = len(single)
        megabytes = sum(p.stat().st_size for p in single) / 1e6
        print(f"series: {n} instances, {args.size}x{args.size}, uncompressed, {megabytes:.0f} MB")
        print(f"CPUs: {os.cpu_count()}")

        results: dict[str, list[float]] = {}
        for r in range(args.repeats):
            for name, seconds in run_once(root / f"run{r}", single, quarters).items():
                results.setdefault(name, []).append(seconds)

        median = {name: statistics.median(times) for name, times in results.items()}
        n4 = sum(len(q) for q in quarters)
        print(f"\n{'receiver':<36} {'seconds':>8} {'inst/s':>8}   runs")
        for name, seconds in median.items():
            count = n4 if "4 series" in name or "4 senders" in name else n
            runs_text = ", ".join(f"{t:.2f}" for t in results[name])
            print(f"{name:<36} {seconds:>8.2f} {count / seconds:>8.1f}   {runs_text}")
        seg = median["segnode"]
        # This disk has slow and fast phases a minute long: the ratio within each round, where the
        # receivers ran a few seconds apart, says more than the ratio of medians over rounds.
        per_round = [s / o for s, o in zip(results["segnode"], results["Orthanc"], strict=True)]
        print("\nratios (segnode time / peer time; below 1 is faster than the peer):")
        print(f"  segnode / Orthanc        {seg / median['Orthanc']:.2f}   (target: <= 1)")
        rounds_text = ", ".join(f"{r:.2f}" for r in per_round)
        own = statistics.median(per_round)
        print(f"  segnode / Orthanc, median of each round's ratio {own:.2f}   ({rounds_text})")
        print(f"  segnode / DCMTK storescp {seg / median['DCMTK storescp']:.2f}   (goal: <= 3)")
        other = median[OTHER_PATH]
        print(f"  {OTHER_PATH} / Orthanc {other / median['Orthanc']:.2f}; / segnode {other / seg:.2f}")
        print(f"  segnode / fsync floor    {seg / median['fsync copy floor']:.2f}")
        four = median["segnode, 1 sender, same 4 series"] / median["segnode, 4 senders"]
        print(f"  4 senders total throughput / 1 sender: {four:.2f}   (target: >= 1)")
        singles, fours = results["segnode, 1 sender, same 4 series"], results["segnode, 4 senders"]
        per_round4 = [one / par for one, par in zip(singles, fours, strict=True)]
        rounds4 = ", ".join(f"{r:.2f}" for r in per_round4)
        two = median["segnode, 4 senders"] / median["segnode, 4 senders, 2 listener processes"]
        print(f"  4 senders, 2 listener processes / 1 process: {two:.2f} (throughput)")
        own4 = statistics.median(per_round4)
        print(f"  4 senders / 1 sender, median of each round's ratio {own4:.2f}   ({rounds4})")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["sync"], check=False)


if __name__ == "__main__":
    main()
