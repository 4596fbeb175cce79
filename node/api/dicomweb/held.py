"""What the node holds, as DICOMweb shows it: the instances it received (their rows and files)
and the results its jobs wrote (SEG, RTSTRUCT, SR, overlay images; their files' headers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.core.config import Settings
from node.core.outputs import result_files
from node.db.models import Instance, Job, Series, Study


@dataclass(frozen=True)
class Held:
    study: str
    series: str
    sop: str
    sop_class: str
    transfer_syntax: str
    modality: str
    description: str
    path: Path


def held(
    session: Session, settings: Settings, study: str, series: str | None = None, sop: str | None = None
) -> list[Held]:
    """Every instance of ``study`` (of ``series``; the one ``sop``) the node received or wrote."""
    query = (
        select(Instance, Series.series_instance_uid, Series.modality, Series.series_description)
        .join(Series, Series.id == Instance.series_id)
        .join(Study, Study.id == Series.study_id)
        .where(Study.study_instance_uid == study)
        .order_by(Instance.series_id, Instance.slice_position, Instance.id)
    )
    if series is not None:
        query = query.where(Series.series_instance_uid == series)
    if sop is not None:
        query = query.where(Instance.sop_instance_uid == sop)
    found = [
        Held(
            study,
            series_uid,
            row.sop_instance_uid,
            row.sop_class_uid,
            row.transfer_syntax_uid,
            modality,
            description,
            settings.storage_dir / row.path,
        )
        for row, series_uid, modality, description in session.execute(query)
    ]
    if sop is not None and found:  # a received instance: no need to read the results' headers
        return found
    return found + [
        h
        for h in produced(session, study)
        if (series is None or h.series == series) and (sop is None or h.sop == sop)
    ]


def produced(session: Session, study: str) -> list[Held]:
    """The results the jobs of ``study`` wrote, as their files' headers name them."""
    jobs = session.execute(
        select(Job.output_path, Job.outputs)
        .join(Series, Series.id == Job.series_id)
        .join(Study, Study.id == Series.study_id)
        .where(Study.study_instance_uid == study, Job.output_path != "")
        .order_by(Job.id)
    ).all()
    found: dict[str, Held] = {}
    for folder, outputs in jobs:
        for output in outputs:
            for path in result_files(Path(folder), output):
                try:
                    ds = dcmread(path, stop_before_pixels=True)
                except (OSError, InvalidDicomError):
                    continue  # a job run again since: its files are gone or being rewritten
                found[str(ds.SOPInstanceUID)] = Held(
                    str(ds.StudyInstanceUID),
                    str(ds.SeriesInstanceUID),
                    str(ds.SOPInstanceUID),
                    str(ds.SOPClassUID),
                    str(ds.file_meta.TransferSyntaxUID),
                    str(ds.get("Modality", "")),
                    str(ds.get("SeriesDescription", "")),
                    path,
                )
    return [h for h in found.values() if h.study == study]
