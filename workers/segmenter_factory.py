"""The segmenter a rule names, built from the settings: a declared checkpoint or cropped segmenter,
else an installed one."""

from __future__ import annotations

from node.core.config import Settings
from segmenters import registry
from segmenters.base import Segmenter


def build_segmenter(name: str, settings: Settings) -> Segmenter:
    """The segmenter ``name``: one the settings declare (a checkpoint, or an installed segmenter,
    either maybe cropped to the body), else an installed one."""
    declared = settings.segmenters.get(name)
    if declared is None:
        return registry.create(name)
    if declared.checkpoint is not None:
        from segmenters.checkpoint import NetworkSegmenter

        segmenter: Segmenter = NetworkSegmenter(
            declared.checkpoint,
            device=declared.device,
            amp=declared.amp,
            batch_size=declared.batch_size,
            threads=settings.worker.cpu_threads,
        )
    elif declared.base is not None:
        segmenter = registry.create(declared.base)
    else:  # the settings refuse this; the branch keeps the type checker honest
        raise ValueError(f"segmenter {name!r} names neither a checkpoint nor a base")
    if declared.crop_to_body:
        from segmenters.cropping import BodyCroppedSegmenter

        segmenter = BodyCroppedSegmenter(segmenter, declared.crop_margin_mm)
    return segmenter
