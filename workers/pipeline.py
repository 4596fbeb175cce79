"""One job's work, free of Celery: load the series, segment it, write the DICOM-SEG.

The task layer calls :func:`segment_series` and does the bookkeeping; tests and benchmarks call it
directly, and it reports how long each step took.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from segmenters.base import Segmenter
from segmenters.ct_series import DecodeFailedError, UnsuitableSeriesError, load_series
from workers.errors import ProcessingFailedError, SeriesRejectedError
from workers.seg_writer import build_seg, write_seg

log = logging.getLogger(__name__)


@dataclass
class SegResult:
    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    segments: int
    seconds: dict[str, float] = field(default_factory=dict)
    decode_processes: int = 1


def segment_series(
    paths: list[Path],
    segmenter: Segmenter,
    output: Path,
    *,
    transfer_syntax: str,
    decode_workers: int | None = None,
    fast_overlap: bool = True,
) -> SegResult:
    """Build the volume from ``paths``, run ``segmenter`` and write its SEG to ``output``."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    try:
        series = load_series(paths, decode_workers=decode_workers)
    except UnsuitableSeriesError as err:
        raise SeriesRejectedError(str(err)) from err
    except DecodeFailedError as err:
        raise ProcessingFailedError(str(err)) from err
    timings["load_decode"] = time.perf_counter() - start
    decoders = series.decode_processes

    start = time.perf_counter()
    labels = segmenter.predict(series.volume)
    timings["segment"] = time.perf_counter() - start

    start = time.perf_counter()
    seg = build_seg(
        series,
        labels,
        segmenter.algorithm,
        list(segmenter.structures),
        transfer_syntax=transfer_syntax,
        fast_overlap=fast_overlap,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    write_seg(seg, output)
    timings["write_seg"] = time.perf_counter() - start
    return SegResult(
        path=output,
        sop_instance_uid=str(seg.SOPInstanceUID),
        series_instance_uid=str(seg.SeriesInstanceUID),
        segments=len(seg.SegmentSequence),
        seconds=timings,
        decode_processes=decoders,
    )
