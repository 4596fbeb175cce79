"""Each part of the fast receive path alone against plain pynetdicom, on the same listener.

    .venv/bin/python -m benchmarks.receive_paths [--slices 300] [--size 512] [--repeats 5]

Every configuration is a listener of its own process (node.receive.listener.start_scp with the
plain path, one fast-path part, or all of them), into fresh storage and a fresh SQLite database;
DCMTK storescu sends the same series (one sender), then the same instances as four series from four
senders at once. Configurations alternate within each round (this machine's speed drifts over
minutes). Prints the median seconds and each configuration's gain over plain pynetdicom: a part
that gains less than 10% of ingest time does not pay for the pynetdicom internals it leans on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.ingest import make_series, send, send_parallel
from tests import peers

CONFIGS = {
    "plain pynetdicom": "",
    "+ spooling": "spooling",
    "+ responses": "responses",
    "+ wakeups": "wakeups",
    "fast path (all parts)": "spooling,responses,wakeups",
}


def serve(parts: str, port: int, data: Path) -> None:
    """The child: one listener with ``parts`` of the fast path until its stdin closes."""
    from node.core.config import ScpSettings
    from node.db import engine as db
    from node.receive.listener import start_scp
    from node.receive.paths import PlainPath, ReceivePath
    from node.receive.storage import Storage

    url = f"sqlite:///{data / 'segnode.sqlite'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    settings = ScpSettings(port=port, min_free_bytes=0, max_associations=16)
    storage = Storage(data / "storage", engine, 0)
    path: ReceivePath = PlainPath(storage)
    if parts:
        from node.receive.fastpath.path import FastPath

        path = FastPath(storage, frozenset(parts.split(",")))
    server = start_scp(settings, storage, path)
    print("ready", flush=True)
    sys.stdin.read()
    server.shutdown()
    storage.close()
    engine.dispose()


def timed(parts: str, data: Path, groups: list[list[Path]]) -> float:
    """Seconds for ``groups`` sent at once (one sender a group) to a listener with ``parts``."""
    data.mkdir(parents=True)
    port = peers.free_port()
    command = [sys.executable, "-m", "benchmarks.receive_paths", "--serve", parts, "--port", str(port)]
    child = subprocess.Popen(
        [*command, "--data", str(data)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        os.sync()
        if len(groups) == 1:
            return send(groups[0], port, "SEGNODE")
        return send_parallel(groups, port, "SEGNODE")
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=60)
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.port, args.data)
        return

    root = Path(tempfile.mkdtemp(prefix="segnode-bench-paths-"))
    try:
        (single,) = make_series(root / "data", 1, args.slices, args.size)
        quarters = make_series(root / "data4", 4, args.slices // 4, args.size)
        print(
            f"series: {len(single)} instances, {args.size}x{args.size}, uncompressed; CPUs: {os.cpu_count()}"
        )
        results: dict[tuple[str, str], list[float]] = {}
        for r in range(args.repeats):
            for name, parts in CONFIGS.items():
                for senders, groups in (("1 sender", [single]), ("4 senders", quarters)):
                    seconds = timed(parts, root / f"run{r}", groups)
                    results.setdefault((name, senders), []).append(seconds)
            print(f"round {r + 1} of {args.repeats} done", flush=True)

        print(f"\n{'configuration':<24} {'senders':<10} {'seconds':>8}  {'gain vs plain':>13}   runs")
        for senders in ("1 sender", "4 senders"):
            plain = statistics.median(results[("plain pynetdicom", senders)])
            for name in CONFIGS:
                runs = results[(name, senders)]
                seconds = statistics.median(runs)
                runs_text = ", ".join(f"{t:.2f}" for t in runs)
                gain = 1 - seconds / plain
                print(f"{name:<24} {senders:<10} {seconds:>8.2f}  {gain:>12.0%}   {runs_text}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
