"""Where a job's results lie in its folder: the workers write them there, the API shows them."""

from __future__ import annotations

from pathlib import Path

RESULT_FILES = {"seg": "seg.dcm", "rtstruct": "rtstruct.dcm", "sr": "sr.dcm"}
OVERLAY_FOLDER = "overlay"


def result_files(folder: Path, output: str) -> list[Path]:
    """The files of one output (seg, rtstruct, sr, overlay) in a job's results ``folder``."""
    if output == "overlay":
        return sorted((folder / OVERLAY_FOLDER).glob("*.dcm"))
    return [folder / RESULT_FILES[output]]
