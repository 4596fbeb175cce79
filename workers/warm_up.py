"""A worker process warms up before its first job: it loads the segmenters the rules name and runs
the pipeline once on a tiny phantom with every output the rules ask for, so that the first series
a technologist sends does not pay for first calls (highdicom's and pydicom's included)."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from segmenters import anatomy
from segmenters.base import AlgorithmInfo, Concept, Structure, Volume
from segmenters.synthetic import make_phantom
from segmenters.volume_files import write_dicom_series
from workers.pipeline import segment_series

if TYPE_CHECKING:
    from workers.tasks import WorkerContext

log = logging.getLogger(__name__)


class _Block:
    """A segmenter that finds one block in the middle of every slice: the warm-up's only job is
    to go through the writers."""

    @property
    def algorithm(self) -> AlgorithmInfo:
        return AlgorithmInfo("segnode-warm-up", "1", Concept("123109", "Manual Processing", "DCM"))

    @property
    def structures(self) -> Sequence[Structure]:
        return [anatomy.structure(1, "heart")]

    def predict(self, volume: Volume) -> np.ndarray:
        labels = np.zeros(volume.hu.shape, dtype=np.uint8)
        rows, cols = volume.hu.shape[1:]
        labels[:, rows // 4 : rows // 2, cols // 4 : cols // 2] = 1
        return labels


def warm_up(ctx: WorkerContext, transfer_syntax: str) -> None:
    """Best effort: a segmenter that cannot load fails its jobs with the reason later, and nothing
    here keeps the worker from serving."""
    start = time.perf_counter()
    settings = ctx.settings
    for name in sorted({rule.segmenter for rule in settings.rules}):
        try:
            ctx.segmenter(name)
        except Exception as err:  # noqa: BLE001 - said again, as the job's reason, when a job needs it
            log.warning("segmenter %s not loaded ahead of its first job: %s", name, err)
    outputs = sorted({output for rule in settings.rules for output in rule.outputs} | {"seg"})
    try:
        with tempfile.TemporaryDirectory(prefix="segnode-warm-up-") as folder:
            paths = write_dicom_series(make_phantom(shape=(3, 32, 32), spacing=(5.0, 10.0, 10.0)), folder)
            segment_series(
                paths,
                _Block(),
                Path(folder) / "results",
                transfer_syntax=transfer_syntax,
                outputs=outputs,
                decode_workers=1,
                fast_overlap=settings.worker.seg_fast_overlap,
            )
    except Exception:  # a first job that fails says why; this must not stop the worker
        log.warning("warm-up run failed; the first job pays for first calls", exc_info=True)
        return
    log.info(
        "worker warmed up in %.2f s (segmenters: %s)", time.perf_counter() - start, ", ".join(ctx.segmenters)
    )
