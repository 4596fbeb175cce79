"""Which of a job's instances are segmented: its CT slices, less the image types its rule excludes."""

from __future__ import annotations

from pathlib import Path

from node.core.config import Settings
from node.core.dicom import CT_IMAGE, excluded_image_type
from node.db.job_runs import ClaimedJob
from workers.errors import SeriesRejectedError


def job_inputs(job: ClaimedJob, settings: Settings) -> list[Path]:
    """The files to segment; raises SeriesRejectedError when there are none."""
    rule = next((r for r in settings.rules if r.name == job.rule), None)
    excluded = rule.exclude_image_types if rule else ["LOCALIZER"]
    paths = [
        settings.storage_dir / row.path
        for row in job.inputs
        if row.sop_class_uid == CT_IMAGE and not excluded_image_type(row.image_type, excluded)
    ]
    if not paths:
        raise SeriesRejectedError(
            f"none of the {len(job.inputs)} instances is a CT image that can be segmented "
            "(scouts, reports and non-CT objects are stored but not segmented)"
        )
    return paths
