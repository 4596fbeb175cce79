"""The segmenter a rule names, built from the settings: a declared network (of any kind) or cropped
segmenter, else an installed one."""

from __future__ import annotations

from node.core.config import Settings
from segmenters import registry
from segmenters.base import Segmenter


def build_segmenter(name: str, settings: Settings) -> Segmenter:
    """The segmenter ``name``: one the settings declare (a network, or an installed segmenter,
    either maybe cropped to the body), else an installed one."""
    declared = settings.segmenters.get(name)
    if declared is None:
        return registry.create(name)
    network = declared.network
    if declared.totalsegmentator is not None:
        from segmenters.served.runner import choose_device
        from segmenters.served.totalsegmentator import TotalSegmentatorSegmenter

        segmenter: Segmenter = TotalSegmentatorSegmenter(
            declared.totalsegmentator,
            roi_subset=declared.roi_subset,
            fast=declared.fast,
            device=choose_device(declared.device),
        )
    elif network is None:
        segmenter = registry.create(str(declared.base))
    elif network[0] == "checkpoint":
        from segmenters.checkpoint import NetworkSegmenter

        segmenter = NetworkSegmenter(
            network[1],
            device=declared.device,
            amp=declared.amp,
            batch_size=declared.batch_size,
            threads=settings.worker.cpu_threads,
        )
    else:
        from segmenters.served.loading import load_served

        segmenter = load_served(
            network[0],
            network[1],
            card=declared.card,
            device=declared.device,
            amp=declared.amp,
            batch_size=declared.batch_size,
            threads=settings.worker.cpu_threads,
            folds=declared.folds,
            checkpoint_name=declared.nnunet_checkpoint,
        )
    if declared.crop_to_body:
        from segmenters.cropping import BodyCroppedSegmenter

        segmenter = BodyCroppedSegmenter(segmenter, declared.crop_margin_mm)
    return segmenter
