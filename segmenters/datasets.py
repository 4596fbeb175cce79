"""Training and evaluation cases: a CT volume with its reference labels, from any source we read.

A :class:`Case` is plain numpy, like a :class:`~segmenters.base.Volume`, so training and scoring
never see DICOM. Readers: NIfTI image/label pairs, a CT series with an RT Structure Set (the AAPM
2017 layout; each ROI keeps the slice range where its reference is defined), a CT series with a
DICOM-SEG, and synthetic phantoms. DICOM series load through segmenters/ct_series.py, as the node
serves them. Labels follow ``synthetic.THORAX_STRUCTURES`` unless a reader is given another map;
every case names its labels, and scoring matches structures by name.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from segmenters import synthetic, volume_files
from segmenters.base import Structure
from segmenters.ct_series import UnsuitableSeriesError, load_series
from segmenters.rtstruct import RT_STRUCTURE_SET_STORAGE, read_rtstruct_masks

log = logging.getLogger(__name__)

Spacing = tuple[float, float, float]

# AAPM 2017 thoracic auto-segmentation challenge ROIs -> THORAX_STRUCTURES labels.
AAPM_ROI_MAP: dict[str, int] = {
    "Lung_R": synthetic.RIGHT_LUNG,
    "Lung_L": synthetic.LEFT_LUNG,
    "Heart": synthetic.HEART,
    "Esophagus": synthetic.ESOPHAGUS,
    "SpinalCord": synthetic.SPINAL_CORD,
}
# Other spellings of those ROI names met in clinical structure sets (compared after _normalise).
ROI_ALIASES: dict[str, str] = {
    "lungr": "Lung_R",
    "lungright": "Lung_R",
    "rightlung": "Lung_R",
    "rlung": "Lung_R",
    "lungl": "Lung_L",
    "lungleft": "Lung_L",
    "leftlung": "Lung_L",
    "llung": "Lung_L",
    "heart": "Heart",
    "esophagus": "Esophagus",
    "oesophagus": "Esophagus",
    "spinalcord": "SpinalCord",
    "cord": "SpinalCord",
}


@dataclass(frozen=True)
class RoiTable:
    """Which RTSTRUCT ROIs are read, as which labels: canonical ROI names with their label values
    and display names, and the other spellings each one goes by."""

    roi_map: Mapping[str, int]  # canonical ROI name -> label value
    label_names: Mapping[int, str]  # label value -> structure name (matched to a segmenter's)
    aliases: Mapping[str, str]  # normalised spelling -> canonical ROI name

    def canonical(self, name: str) -> str:
        return self.aliases.get(_normalise(name), name)

    def extended(self, more: Mapping[str, Sequence[str]]) -> RoiTable:
        """This table with ``more`` (canonical name -> other spellings): a known ROI gains
        spellings; a new one becomes a structure of that name with the next label value."""
        roi_map, names, aliases = dict(self.roi_map), dict(self.label_names), dict(self.aliases)
        for canonical, spellings in more.items():
            known = self.canonical(canonical)
            if known not in roi_map:
                label = max([*roi_map.values(), *names]) + 1
                roi_map[known], names[label] = label, known
            for spelling in [canonical, *spellings]:
                aliases[_normalise(str(spelling))] = known
        return RoiTable(roi_map, names, aliases)


def load_roi_table(path: Path | None) -> RoiTable:
    """The built-in table (the AAPM 2017 ROIs and their usual spellings), extended by the YAML file
    ``path`` when given: ``Lung_R: [RT LUNG, Lung rt]`` adds spellings, ``Liver: [LIVER]`` a structure."""
    import yaml

    table = RoiTable(
        AAPM_ROI_MAP, thorax_names(), {**ROI_ALIASES, **{_normalise(k): k for k in AAPM_ROI_MAP}}
    )
    if path is None:
        return table
    more = yaml.safe_load(path.read_text()) or {}
    if not isinstance(more, dict) or not all(isinstance(v, list | type(None)) for v in more.values()):
        raise ValueError(f"{path}: expected ROI_NAME: [other spellings, ...] lines")
    return table.extended({str(k): [str(x) for x in (v or [])] for k, v in more.items()})


@dataclass(frozen=True, eq=False)
class Case:
    """One CT volume with its reference labels, indexed (slice, row, column).

    ``z_ranges`` maps a label value to the slices ``(start, stop)`` (half-open) where its reference
    is defined; a label without an entry is defined on every slice. Contours of the oesophagus
    and spinal cord stop where the contouring physician stopped, not where the organ does.
    """

    case_id: str
    hu: np.ndarray
    labels: np.ndarray
    spacing: Spacing
    label_names: Mapping[int, str]
    z_ranges: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    # Voxels not scored for a label (a tumour cut out of the lungs): the same mask is removed from
    # the reference and from the prediction of that structure.
    excluded: Mapping[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hu.ndim != 3 or self.hu.shape != self.labels.shape:
            raise ValueError(f"case {self.case_id}: hu {self.hu.shape} and labels {self.labels.shape} differ")
        if self.labels.dtype != np.uint8:
            raise ValueError(f"case {self.case_id}: labels are uint8; got {self.labels.dtype}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"case {self.case_id}: spacing is three positive mm values; got {self.spacing}")
        for label, (start, stop) in self.z_ranges.items():
            if not 0 <= start <= stop <= self.hu.shape[0]:
                raise ValueError(f"case {self.case_id}: z range {(start, stop)} of label {label} is outside")

    def volume_ml(self, label: int) -> float:
        return float(np.count_nonzero(self.labels == label)) * float(np.prod(self.spacing)) / 1000.0


def thorax_names() -> dict[int, str]:
    return {s.label: s.name for s in synthetic.THORAX_STRUCTURES}


# --- synthetic ------------------------------------------------------------------------------------


def synthetic_cases(
    n: int,
    shape: tuple[int, int, int] = (32, 128, 128),
    spacing: Spacing = (8.0, 3.0, 3.0),
    seed: int = 0,
) -> list[Case]:
    """``n`` synthetic phantoms, seeds ``seed`` .. ``seed + n - 1`` (ids ``synthetic-<seed>``)."""
    if n < 1:
        raise ValueError(f"n must be positive; got {n}")
    cases = []
    for s in range(seed, seed + n):
        phantom = synthetic.make_phantom(shape, spacing, seed=s)
        cases.append(
            Case(f"synthetic-{s:04d}", phantom.hu, phantom.labels, phantom.spacing, phantom.label_names)
        )
    return cases


# --- NIfTI ----------------------------------------------------------------------------------------


def read_nifti_pair(image: Path, label: Path, label_names: Mapping[int, str] | None = None) -> Case:
    """A case from a NIfTI CT (HU) and a NIfTI label map on the same grid; id from the file name."""
    hu, spacing = volume_files.read_nifti(image)
    labels, label_spacing = volume_files.read_nifti(label)
    if hu.shape != labels.shape or not np.allclose(spacing, label_spacing, atol=1e-3):
        raise ValueError(f"{image} and {label} are not on one grid")
    case_id = re.sub(r"\.nii(\.gz)?$", "", Path(image).name)
    return Case(
        case_id,
        np.asarray(hu),
        np.asarray(labels).astype(np.uint8),
        spacing,
        dict(label_names or thorax_names()),
    )


def read_nifti_folder(folder: Path) -> list[Case]:
    """Every ``images/ID.nii[.gz]`` with its ``labels/ID.nii[.gz]`` under ``folder``."""
    images = sorted((folder / "images").glob("*.nii*"))
    if not images:
        raise FileNotFoundError(f"no images/*.nii or *.nii.gz under {folder}")
    cases = []
    for image in images:
        label = folder / "labels" / image.name
        if not label.exists():
            raise FileNotFoundError(f"{image} has no label map {label}")
        cases.append(read_nifti_pair(image, label))
    return cases


# --- DICOM ----------------------------------------------------------------------------------------


def read_ct_series(ct_folder: Path) -> tuple[list[Dataset], np.ndarray, Spacing]:
    """The CT slices of a folder (other files beside them are skipped) as the node serves them:
    loaded by :func:`segmenters.ct_series.load_series`, so a network is trained on exactly the
    volumes it will be given. Returns the sorted headers, the HU volume and its spacing (mm)."""
    slices = [path for path in sorted(Path(ct_folder).rglob("*")) if path.is_file() and is_ct_image(path)]
    if not slices:
        raise FileNotFoundError(f"no CT images in {ct_folder}")
    return _read_ct_files(slices, str(ct_folder))


def _read_ct_files(slices: Sequence[Path], where: str) -> tuple[list[Dataset], np.ndarray, Spacing]:
    try:
        series = load_series(list(slices))
    except UnsuitableSeriesError as err:
        raise ValueError(f"{where}: {err}") from err
    return series.datasets, series.volume.hu, series.volume.spacing


def is_ct_image(path: Path) -> bool:
    """Whether ``path`` is a DICOM CT image (an RTSTRUCT, a SEG or any other file beside it is not)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
    except (pydicom.errors.InvalidDicomError, OSError):
        return False
    return bool(ds.get("SOPClassUID") == CTImageStorage or ds.get("Modality") == "CT")


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def read_dicom_rtstruct(
    ct_files: Sequence[Path],
    rtstruct_file: Path,
    table: RoiTable | None = None,
    case_id: str | None = None,
    exclusions: Mapping[str, Sequence[str]] | None = None,
) -> Case:
    """A case from a CT series' files and its RT Structure Set.

    ``table`` says which ROIs are read (any spelling it knows: "Lung-Left" is "Lung_L") and as
    which labels; other ROIs (a GTV, the body) are ignored. Where ROIs overlap the later one wins.
    Each ROI's z range is the slices its contours cover. ``exclusions`` maps an ROI (such as a GTV)
    to the ROIs it is cut out of for scoring (``Case.excluded``).
    """
    table = table or load_roi_table(None)
    datasets, hu, spacing = _read_ct_files(ct_files, str(rtstruct_file.parent))
    masks = read_rtstruct_masks(rtstruct_file, datasets)
    by_canonical: dict[str, str] = {}
    for name, mask in masks.items():
        if mask.any():
            by_canonical.setdefault(table.canonical(name), name)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    z_ranges: dict[int, tuple[int, int]] = {}
    for canonical, label in table.roi_map.items():
        if canonical not in by_canonical:
            log.warning("no contours for ROI %s in %s", canonical, rtstruct_file)
            continue
        mask = masks[by_canonical[canonical]]
        labels[mask] = label
        slices = np.flatnonzero(mask.any(axis=(1, 2)))
        z_ranges[label] = (int(slices[0]), int(slices[-1]) + 1)
    excluded: dict[int, np.ndarray] = {}
    for cut, targets in (exclusions or {}).items():
        source = by_canonical.get(table.canonical(cut))
        if source is None:
            raise ValueError(
                f"{rtstruct_file}: no contours of ROI {cut!r} to exclude (ROIs: {', '.join(masks)})"
            )
        for target in targets:
            cut_from = table.roi_map.get(table.canonical(target))
            if cut_from is None:
                raise ValueError(f"cannot exclude {cut!r} from {target!r}: not an ROI of the table")
            excluded[cut_from] = excluded.get(cut_from, np.zeros(hu.shape, dtype=bool)) | masks[source]
    present = {label: table.label_names.get(label, f"label {label}") for label in z_ranges}
    case_id = case_id or rtstruct_file.resolve().parent.parent.name
    return Case(case_id, hu, labels, spacing, present, z_ranges, excluded)


def read_rtstruct_folder(
    folder: Path, table: RoiTable | None = None, exclusions: Mapping[str, Sequence[str]] | None = None
) -> list[Case]:
    """Every CT series under ``folder`` that an RT Structure Set refers to, as archives and TPS
    exports lay them out (the AAPM 2017 ``CASE/ct`` + ``CASE/rtstruct`` layout, a study folder with
    several series, one flat folder): files are told apart by their Modality and SOP Class, each
    structure set finds its CT series by the series UID it references, and other objects (a SEG,
    other images) are skipped. A case is named after the folder that holds its CT and structure set."""
    folder = Path(folder)
    series: dict[str, list[Path]] = {}
    structure_sets: list[tuple[Path, set[str]]] = []
    skipped: dict[str, int] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        if ds.get("SOPClassUID") == CTImageStorage or ds.get("Modality") == "CT":
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(path)
        elif ds.get("SOPClassUID") == RT_STRUCTURE_SET_STORAGE:
            structure_sets.append((path, _referenced_series(ds)))
        else:
            skipped[str(ds.get("Modality", "?"))] = skipped.get(str(ds.get("Modality", "?")), 0) + 1
    if skipped:
        log.info(
            "%s: skipped %s", folder, ", ".join(f"{n} {m} object(s)" for m, n in sorted(skipped.items()))
        )
    cases = []
    for rtstruct, references in structure_sets:
        found = [uid for uid in series if uid in references]
        if not found:
            log.warning("%s refers to no CT series under %s; skipped", rtstruct, folder)
            continue
        for uid in found:
            files = series[uid]
            common = Path(*_common_parts([rtstruct.parent, *(f.parent for f in files)]))
            case_id = folder.resolve().name if common == folder else str(common.relative_to(folder))
            if len(found) > 1 or sum(1 for _, refs in structure_sets if uid in refs) > 1:
                case_id = f"{case_id}/{rtstruct.stem}"
            cases.append(read_dicom_rtstruct(files, rtstruct, table, case_id, exclusions))
    if not cases:
        raise FileNotFoundError(
            f"no CT series under {folder} with an RT Structure Set referring to it "
            f"({len(series)} CT series, {len(structure_sets)} structure set(s) found)"
        )
    return cases


def _referenced_series(rtstruct: Dataset) -> set[str]:
    return {
        str(referenced.SeriesInstanceUID)
        for frame in rtstruct.get("ReferencedFrameOfReferenceSequence", [])
        for study in frame.get("RTReferencedStudySequence", [])
        for referenced in study.get("RTReferencedSeriesSequence", [])
    }


def _common_parts(paths: Sequence[Path]) -> tuple[str, ...]:
    parts = [p.parts for p in paths]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return tuple(common)


def read_dicom_seg(
    ct_folder: Path, seg_file: Path, structures: Sequence[Structure] | None = None, case_id: str | None = None
) -> Case:
    """A case from a CT series and a DICOM-SEG of it.

    Without ``structures``, segment number n becomes label n, named by its segment label. With
    ``structures``, each segment becomes the label of the structure with the same coded type and
    laterality, and segments that no structure codes (a tumour, say) are left out: a SEG numbers
    its segments 1..n whatever label values made them (segnode's own SEGs leave out the structures
    a series lacks), so only the codes say which is which. Where segments overlap the higher
    segment number wins.
    """
    import highdicom as hd

    datasets, hu, spacing = read_ct_series(ct_folder)
    seg = hd.seg.segread(seg_file)
    targets = _segment_targets(seg.SegmentSequence, structures, seg_file)
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    rows = [k for k, uid in enumerate(uids) if uid in referenced]
    if not rows:
        raise ValueError(f"{seg_file} references none of the images in {ct_folder}")
    labels = np.zeros(hu.shape, dtype=np.uint8)
    numbers = sorted(targets)
    if numbers:
        pixels = seg.get_pixels_by_source_instance(
            [uids[k] for k in rows], segment_numbers=numbers, assert_missing_frames_are_empty=True
        )
        part = np.zeros((len(rows), *hu.shape[1:]), dtype=np.uint8)
        for index, number in enumerate(numbers):
            part[pixels[..., index] > 0] = targets[number][0]
        labels[rows] = part
    names = dict(targets.values())
    return Case(case_id or Path(seg_file).stem, hu, labels, spacing, names)


def _segment_targets(
    segments: Sequence[Dataset], structures: Sequence[Structure] | None, seg_file: Path
) -> dict[int, tuple[int, str]]:
    """Segment number -> (label value, name) of each segment the case keeps."""
    if not structures:
        targets = {int(s.SegmentNumber): (int(s.SegmentNumber), str(s.SegmentLabel)) for s in segments}
        if max(targets, default=0) > 255:
            raise ValueError(f"{seg_file}: segment numbers above 255 do not fit a uint8 label map")
        return targets
    # The first of two structures coded alike wins.
    by_code = {_structure_key(structure): structure for structure in reversed(structures)}
    targets = {}
    for item in segments:
        key = _segment_key(item)
        match = by_code.get(key)
        if match is None:
            log.warning(
                "%s: segment %s (%s) codes none of the structures; left out",
                seg_file,
                item.SegmentNumber,
                item.SegmentLabel,
            )
            continue
        targets[int(item.SegmentNumber)] = (match.label, match.name)
    return targets


def _structure_key(structure: Structure) -> tuple[str, ...]:
    """(scheme, value) of the structure's type, then of its laterality if it has one."""
    concepts = (structure.type,) if structure.laterality is None else (structure.type, structure.laterality)
    return tuple(part for c in concepts for part in (c.scheme, c.value))


def _segment_key(item: Dataset) -> tuple[str, ...]:
    """(scheme, value) of a segment's property type, then of its modifiers (laterality) as the
    Segment Description macro nests them in the type's code item: comparable with _structure_key."""
    code = item.SegmentedPropertyTypeCodeSequence[0]
    concepts = [code, *code.get("SegmentedPropertyTypeModifierCodeSequence", [])]
    return tuple(part for c in concepts for part in (str(c.CodingSchemeDesignator), str(c.CodeValue)))


# --- splits and data specs ------------------------------------------------------------------------


def split_cases(
    case_ids: Sequence[str], seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
) -> tuple[list[str], list[str], list[str]]:
    """A patient-level (train, validation, test) split of case ids: deterministic for a seed and a
    set of ids (their order does not matter), every part non-empty when there are 3 or more.

    Split by patient, never by slice: slices of one patient are near copies of each other, and
    a slice-level split would score the model on its own training data.
    """
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"fractions are three non-negative numbers; got {fractions}")
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise ValueError("case ids repeat; a split is by patient")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n = len(order)
    total = sum(fractions)
    n_val = round(n * fractions[1] / total)
    n_test = round(n * fractions[2] / total)
    if n >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
        n_val = min(n_val, n - 1 - n_test)
    else:
        n_val, n_test = min(n_val, n), 0
    n_train = n - n_val - n_test
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]


SYNTHETIC_FIELD_MM = (256.0, 384.0, 384.0)  # a whole thorax at any synthetic shape

DATA_HELP = """Data sets (--data):

\b
  synthetic:N[@SEED]     N synthetic phantoms (demo only, no patient data), seeds SEED.. (default
                         0 for training, 10000 for evaluation so the two never overlap),
                         256 x 384 x 384 mm whatever --synthetic-shape.
  nifti:FOLDER           FOLDER/images/ID.nii[.gz] (CT in HU) with FOLDER/labels/ID.nii[.gz]
                         (uint8 labels: 1 body, 2 right lung, 3 left lung, 4 heart,
                         5 oesophagus, 6 spinal cord, 7 airways), in any orientation: each
                         file is turned by its affine into the DICOM one.
  dicom-rtstruct:FOLDER  every CT series under FOLDER that an RT Structure Set refers to, in any
                         layout archives export (AAPM 2017's CASE/ct + CASE/rtstruct, a study
                         folder with several series, a flat folder); SEGs and other objects are
                         skipped. ROIs Lung_L, Lung_R, Heart, Esophagus, SpinalCord or spellings
                         such as Lung-Left (more with --roi-names).
"""


def load_cases(
    spec: str,
    *,
    default_seed: int = 0,
    synthetic_shape: tuple[int, int, int] = (32, 128, 128),
    roi_table: RoiTable | None = None,
    exclusions: Mapping[str, Sequence[str]] | None = None,
) -> list[Case]:
    """The cases a ``--data`` spec names (see ``DATA_HELP``); ``roi_table`` and ``exclusions`` apply
    to structure sets."""
    kind, _, rest = spec.partition(":")
    if exclusions and kind != "dicom-rtstruct":
        raise ValueError("excluding one ROI from another needs structure sets (dicom-rtstruct:FOLDER)")
    if kind == "synthetic":
        count, _, seed = rest.partition("@")
        if not count.isdigit() or (seed and not seed.isdigit()):
            raise ValueError(f"expected synthetic:N or synthetic:N@SEED; got {spec!r}")
        spacing = tuple(extent / n for extent, n in zip(SYNTHETIC_FIELD_MM, synthetic_shape, strict=True))
        return synthetic_cases(
            int(count),
            synthetic_shape,
            (spacing[0], spacing[1], spacing[2]),
            int(seed) if seed else default_seed,
        )
    if kind == "nifti":
        return read_nifti_folder(Path(rest))
    if kind == "dicom-rtstruct":
        return read_rtstruct_folder(Path(rest), roi_table, exclusions)
    raise ValueError(
        f"unknown data spec {spec!r}; expected synthetic:N, nifti:FOLDER or dicom-rtstruct:FOLDER"
    )


def by_id(cases: Iterable[Case]) -> dict[str, Case]:
    return {case.case_id: case for case in cases}
