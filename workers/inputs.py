"""Which of a job's instances are segmented (its CT slices, less the image types its rule
excludes), and where their files are: the node's storage folder, or, for a worker on another
machine, fetched from the node over WADO-RS."""

from __future__ import annotations

from pathlib import Path

from node.core.config import Settings
from node.core.dicom import CT_IMAGE, excluded_image_type
from node.db.job_runs import ClaimedJob, InputRow
from workers.errors import SeriesRejectedError
from workers.remote import NodeClient


def job_rows(job: ClaimedJob, settings: Settings) -> list[InputRow]:
    """The instances to segment; raises SeriesRejectedError when there are none."""
    rule = next((r for r in settings.rules if r.name == job.rule), None)
    excluded = rule.exclude_image_types if rule else ["LOCALIZER"]
    rows = [
        row
        for row in job.inputs
        if row.sop_class_uid == CT_IMAGE and not excluded_image_type(row.image_type, excluded)
    ]
    if not rows:
        raise SeriesRejectedError(
            f"none of the {len(job.inputs)} instances is a CT image that can be segmented "
            "(scouts, reports and non-CT objects are stored but not segmented)"
        )
    return rows


def job_inputs(job: ClaimedJob, settings: Settings, node: NodeClient | None, cache: Path) -> list[Path]:
    """The files to segment: in the node's storage folder, or fetched from ``node`` into ``cache``."""
    rows = job_rows(job, settings)
    if node is None:
        return [settings.storage_dir / row.path for row in rows]
    return node.fetch_inputs(job.study_uid, job.series_uid, [row.sop_instance_uid for row in rows], cache)
