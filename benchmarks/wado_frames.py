"""WADO-RS frames, as a web viewer loads a series (OHIF: one request a frame, several at once,
``transfer-syntax=*``): segnode's /dicomweb against Orthanc's DICOMweb plugin, side by side in one
run, on the same instances stored in both by storescu. Series: the real JPEG 2000 abdomen in
../shared/data (frames go as stored) and a synthetic Explicit VR Little Endian one; the abdomen's
frames decoded to octets too (the standard's default, for clients without a JPEG 2000 decoder).

    .venv/bin/python -m benchmarks.wado_frames [--slices 100] [--size 512] [--repeats 5] [--clients 6]
"""

from __future__ import annotations

import argparse
import http.client
import secrets
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import pydicom

from benchmarks.ingest import make_series, send
from tests import peers
from tests.node_process import SegnodeProcesses
from tests.shared_data import real_j2k_copy

AS_STORED = "multipart/related; type=application/octet-stream; transfer-syntax=*"
DECODED = "multipart/related; type=application/octet-stream"


class Fetcher:
    """GETs on one keep-alive connection per thread, as a browser keeps its connections."""

    def __init__(self, base: str, token: str | None) -> None:
        self.split = urlsplit(base)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.local = threading.local()

    def get(self, path: str, accept: str) -> int:
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = http.client.HTTPConnection(self.split.netloc, timeout=120)
        connection.request("GET", self.split.path + path, headers={**self.headers, "Accept": accept})
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {body[:200]!r}")
        return len(body)


def frame_paths(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found.append(
            f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/1"
        )
    return found


def load_series(fetcher: Fetcher, frames: list[str], accept: str, clients: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda path: fetcher.get(path, accept), frames))
    return time.perf_counter() - start


def alternate(measures: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds of each, taking turns so that a slow moment of the machine hits both."""
    times: dict[str, list[float]] = {name: [] for name in measures}
    for measure in measures.values():  # warm up: caches, connections, first decodes
        measure()
    for _ in range(repeats):
        for name, measure in measures.items():
            times[name].append(measure())
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=100, help="slices of the synthetic series")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clients", type=int, default=6, help="requests at once (a browser: 6 per host)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-wado-") as tmp:
        work = Path(tmp)
        abdomen = real_j2k_copy(work / "j2k")
        (native,) = make_series(work / "native", 1, args.slices, args.size)
        node = SegnodeProcesses(work / "node", {"quiet_period_s": 3600, "api": {"enabled": True}})
        orthanc = peers.start_orthanc(work / "orthanc")
        try:
            node.serve(workers=False)
            node.add_user("reader", "viewer", secrets.token_urlsafe(18))
            token = node.token("reader")
            for port, aet in ((node.port, "SEGNODE"), (orthanc.dicom_port, orthanc.aet)):
                result = peers.storescu(abdomen, port, aet=aet, calling_aet="BENCH", extra_args=["-R", "-xv"])
                if result.returncode != 0:
                    raise RuntimeError(f"storescu to {aet}: {result.stdout}{result.stderr}")
                send(native, port, aet)
            ours = Fetcher(f"http://127.0.0.1:{node.values['api']['port']}/dicomweb", token)
            theirs = Fetcher(f"{orthanc.http}/dicom-web", None)
            cases = (
                ("JPEG 2000 abdomen, as stored", frame_paths(abdomen), AS_STORED),
                ("JPEG 2000 abdomen, decoded", frame_paths(abdomen), DECODED),
                (f"Explicit VR LE {args.size}x{args.size}", frame_paths(native), AS_STORED),
            )
            print(f"{args.clients} requests at once, median of {args.repeats} loads of each series")
            for label, frames, accept in cases:
                try:
                    load_series(theirs, frames[:1], accept, 1)
                except RuntimeError:
                    only = partial(load_series, ours, frames, accept, args.clients)
                    seconds = alternate({"segnode": only}, args.repeats)["segnode"]
                    per_s = len(frames) / seconds
                    print(
                        f"{label} ({len(frames)} frames): segnode {seconds:.3f} s ({per_s:.0f} frames/s); "
                        "Orthanc answers 500 (its plugin does not decode JPEG 2000 frames)"
                    )
                    continue
                medians = alternate(
                    {
                        "segnode": partial(load_series, ours, frames, accept, args.clients),
                        "Orthanc": partial(load_series, theirs, frames, accept, args.clients),
                    },
                    args.repeats,
                )
                rate = {name: len(frames) / s for name, s in medians.items()}
                print(
                    f"{label} ({len(frames)} frames): segnode {medians['segnode']:.3f} s "
                    f"({rate['segnode']:.0f} frames/s), Orthanc {medians['Orthanc']:.3f} s "
                    f"({rate['Orthanc']:.0f} frames/s); segnode takes "
                    f"{medians['segnode'] / medians['Orthanc']:.2f}x Orthanc's time"
                )
        finally:
            node.stop_all()
            orthanc.stop(graceful=False)


if __name__ == "__main__":
    main()
