"""Listener processes (``scp.processes``) against parallel senders: 1, 4 and 8 DCMTK storescu at
once, each sending its share of the same CT instances, to `segnode serve --no-workers` with one
listener process and with two.

    .venv/bin/python -m benchmarks.listener_processes [--slices 240] [--size 512] [--repeats 3]

Each run into fresh storage after ``sync``; configurations alternate within each round. Prints the
median seconds and, for each number of senders, two processes' throughput against one's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks.ingest import make_series, send, send_parallel
from tests.node_process import SegnodeProcesses

SENDERS = (1, 4, 8)
PROCESSES = (1, 2)


def timed(work: Path, processes: int, groups: list[list[Path]]) -> float:
    scp = {"max_associations": 16, "processes": processes}
    node = SegnodeProcesses(work, {"quiet_period_s": 3600, "scp": scp})
    try:
        node.serve(workers=False)
        if processes > 1:
            node.wait_for_log("serve", f"listener process {processes} of {processes} serving")
        os.sync()
        if len(groups) == 1:
            return send(groups[0], node.port, "SEGNODE")
        return send_parallel(groups, node.port, "SEGNODE")
    finally:
        node.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=240)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="segnode-bench-processes-"))
    try:
        shares = {n: make_series(root / f"data{n}", n, args.slices // n, args.size) for n in SENDERS}
        print(f"{args.slices} instances of {args.size}x{args.size} in all; CPUs: {os.cpu_count()}")
        results: dict[tuple[int, int], list[float]] = {}
        for r in range(args.repeats):
            for senders in SENDERS:
                for processes in PROCESSES:
                    seconds = timed(root / f"run{r}", processes, shares[senders])
                    results.setdefault((senders, processes), []).append(seconds)
            print(f"round {r + 1} of {args.repeats} done", flush=True)
        print(f"\n{'senders':>7} {'processes':>9} {'seconds':>8} {'inst/s':>7}   runs")
        for senders in SENDERS:
            for processes in PROCESSES:
                runs = results[(senders, processes)]
                seconds = statistics.median(runs)
                runs_text = ", ".join(f"{t:.2f}" for t in runs)
                print(
                    f"{senders:>7} {processes:>9} {seconds:>8.2f} {args.slices / seconds:>7.1f}   {runs_text}"
                )
        print("\nthroughput of 2 processes / 1 process:")
        for senders in SENDERS:
            one = statistics.median(results[(senders, 1)])
            two = statistics.median(results[(senders, 2)])
            print(f"  {senders} sender(s): {one / two:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
