"""One job's work, free of Celery: load the series, segment it, write its results (SEG, RTSTRUCT,
SR, overlay images).

The task layer calls :func:`segment_series` and does the bookkeeping; tests and benchmarks call it
directly, and it reports how long each step took.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from node.core.outputs import OVERLAY_FOLDER, RESULT_FILES
from segmenters.base import Segmenter
from segmenters.ct_series import DecodeFailedError, UnsuitableSeriesError, load_series
from segmenters.volume_files import write_label_nifti
from workers.derived import blank_invalid_moments, write_dataset
from workers.errors import JobLostError, ProcessingFailedError, SeriesRejectedError
from workers.overlay_writer import build_overlay, write_overlay
from workers.rtstruct_writer import build_rtstruct
from workers.seg_writer import build_seg
from workers.sr_writer import build_sr

log = logging.getLogger(__name__)


# Where each output lies in a job's results folder: one file each, the overlay a folder of images.


@dataclass
class Results:
    folder: Path
    outputs: list[str]
    seg_uid: str  # '' when no SEG was asked for
    segments: int
    seconds: dict[str, float] = field(default_factory=dict)
    decode_processes: int = 1


def segment_series(
    paths: list[Path],
    segmenter: Segmenter,
    folder: Path,
    *,
    transfer_syntax: str,
    outputs: Sequence[str] = ("seg",),
    decode_workers: int | None = None,
    fast_overlap: bool = True,
    label_nifti: Path | None = None,
    lost: threading.Event | None = None,
) -> Results:
    """Build the volume from ``paths``, run ``segmenter`` and write each of ``outputs`` (seg,
    rtstruct, sr, overlay) into ``folder``, at the places :func:`result_files` names; the label map
    also as NIfTI at ``label_nifti`` when given (``segnode segment``). Raises :class:`JobLostError`
    between steps once ``lost`` is set: a job cancelled or taken over is not worked on further."""

    def go_on() -> None:
        if lost is not None and lost.is_set():
            raise JobLostError("the job is no longer this worker's")

    timings: dict[str, float] = {}
    go_on()
    start = time.perf_counter()
    try:
        series = load_series(paths, decode_workers=decode_workers)
    except UnsuitableSeriesError as err:
        raise SeriesRejectedError(str(err)) from err
    except DecodeFailedError as err:
        raise ProcessingFailedError(str(err)) from err
    timings["load_decode"] = time.perf_counter() - start

    go_on()
    start = time.perf_counter()
    labels = segmenter.predict(series.volume)
    timings["segment"] = time.perf_counter() - start

    go_on()  # nothing written for a job no longer wanted
    folder.mkdir(parents=True, exist_ok=True)
    emptied = blank_invalid_moments(series.datasets)
    if emptied:
        log.warning("invalid %s in the CT's headers: left empty in the outputs", ", ".join(emptied))
    algorithm, structures = segmenter.algorithm, list(segmenter.structures)
    start = time.perf_counter()
    seg = build_seg(
        series, labels, algorithm, structures, transfer_syntax=transfer_syntax, fast_overlap=fast_overlap
    )  # also when not sent: the SR refers to it, and it says which structures were found
    if "seg" in outputs:
        write_dataset(seg, folder / RESULT_FILES["seg"])
    timings["write_seg"] = time.perf_counter() - start
    if "rtstruct" in outputs:
        go_on()
        start = time.perf_counter()
        write_dataset(
            build_rtstruct(series, labels, algorithm, structures), folder / RESULT_FILES["rtstruct"]
        )
        timings["write_rtstruct"] = time.perf_counter() - start
    if "sr" in outputs:
        go_on()
        start = time.perf_counter()
        write_dataset(build_sr(series, labels, algorithm, structures, seg), folder / RESULT_FILES["sr"])
        timings["write_sr"] = time.perf_counter() - start
    if label_nifti is not None:
        write_label_nifti(series, labels, label_nifti, f"{algorithm.name} {algorithm.version} labels")
    if "overlay" in outputs:
        go_on()
        start = time.perf_counter()
        write_overlay(build_overlay(series, labels, algorithm, structures), folder / OVERLAY_FOLDER)
        timings["write_overlay"] = time.perf_counter() - start
    return Results(
        folder=folder,
        outputs=list(outputs),
        seg_uid=str(seg.SOPInstanceUID) if "seg" in outputs else "",
        segments=len(seg.SegmentSequence),
        seconds=timings,
        decode_processes=series.decode_processes,
    )
