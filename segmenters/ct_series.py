"""Load a CT series from its files into a volume a segmenter can use, or reject it with a reason.

A segmenter assumes a regular 3D grid. DICOM does not promise one: a series is a bag of slices,
each with its own orientation, position and pixel grid, in any order, possibly with a slice lost
on the way or acquired with a tilted gantry. ``load_series`` checks every assumption the volume
makes, sorts the slices by their position along the slice normal (never by InstanceNumber, which
scanners number as they like), and only then decodes the pixels, in parallel across processes:
the JPEG 2000 decoder (pylibjpeg-openjpeg) holds the GIL, so threads do not make it faster.

Training, evaluation and serving all load series here, so a network is served exactly the data it
was trained on. Every refusal is an :class:`UnsuitableSeriesError` whose message names counts,
positions and UIDs so a person can see what is wrong, and never a patient identifier.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import multiprocessing.forkserver
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (
    RE_VALID_UID,
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)

from segmenters.base import Volume

log = logging.getLogger(__name__)

MULTI_FRAME_CT = frozenset({EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage})


class UnsuitableSeriesError(ValueError):
    """The files are no regular CT volume; the message says why, for a person to act on."""


class DecodeFailedError(RuntimeError):
    """Decoding failed for a cause outside the data (a decoder process died)."""


def _is_uid(value: object) -> bool:
    """A syntactically valid UID, by pydicom's rule (PS3.5 9.1)."""
    return isinstance(value, str) and len(value) <= 64 and re.match(RE_VALID_UID, value) is not None


MIN_SLICES = 3
ORIENTATION_TOL = 1e-4  # direction cosines that differ by more are different orientations
PIXEL_SPACING_TOL_MM = 1e-4
DUPLICATE_POSITION_TOL_MM = 0.01
GAP_FACTOR = 1.5  # a step this many times the median spacing means a slice is missing
SPACING_REL_TOL = 0.02  # steps may differ from the median by 2 % (rounding of written positions) ...
SPACING_ABS_TOL_MM = 0.01  # ... or by 0.01 mm, whichever is larger
MAX_TILT_DEG = 0.1  # in-plane drift of the positions, per mm along the normal, as an angle
# Parallel decoding of compressed slices pays for its process start-up only above about this many
# pixels (16 slices of 512 x 512); uncompressed slices are always read in-process.
PARALLEL_MIN_PIXELS = 16 * 512 * 512


@dataclass(frozen=True, eq=False)
class SeriesVolume:
    """A checked, sorted and decoded CT series.

    ``datasets[k]`` is the header (no Pixel Data) of the slice ``volume.hu[k]``, so the list can be
    given to highdicom as ``source_images`` for a label map of ``volume.hu.shape``.
    """

    volume: Volume
    datasets: list[Dataset]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]  # in volume slice order
    image_orientation: tuple[float, float, float, float, float, float]
    first_position: tuple[float, float, float]  # ImagePositionPatient of volume.hu[0]
    slice_positions_mm: tuple[float, ...]  # position of each slice along the slice normal
    slice_thickness_mm: float | None  # as written; may differ from the spacing (overlapping slices)
    decode_processes: int = 1  # how many processes decoded the pixel data

    @property
    def spacing_between_slices_mm(self) -> float:
        return self.volume.spacing[0]


def load_series(paths: Sequence[Path], *, decode_workers: int | None = None) -> SeriesVolume:
    """Read, check, sort and decode the CT slices in ``paths``.

    ``decode_workers`` processes decode the pixel data; ``None`` uses every core available to this
    process for a compressed series big enough for that to pay, and decodes in-process otherwise;
    ``1`` decodes in-process. Raises :class:`UnsuitableSeriesError` for anything that is not a regular
    CT volume.
    """
    if not paths:
        raise UnsuitableSeriesError("the series has no instances")
    headers = [_read_header(Path(p)) for p in paths]
    for path, ds in headers:
        _check_instance(path, ds)
    _check_same(headers)
    if len(headers) < MIN_SLICES:
        if len(headers) == 1:
            raise UnsuitableSeriesError("a single-slice series cannot be segmented in 3D")
        raise UnsuitableSeriesError(
            f"a series of {len(headers)} slices cannot be segmented in 3D (at least {MIN_SLICES} needed)"
        )

    first = headers[0][1]
    iop = _floats(first.ImageOrientationPatient)
    row_dir, col_dir = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row_dir, col_dir)
    _check_orientation(headers, iop)
    _check_pixel_grid(headers)

    positions = np.array([_floats(ds.ImagePositionPatient) for _, ds in headers])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    headers = [headers[i] for i in order]
    positions, along = positions[order], along[order]
    steps = np.diff(along)
    _check_duplicates(steps, along)
    _check_tilt(positions, along, normal, float(min(_floats(first.PixelSpacing))))
    spacing = _check_spacing(steps, along)

    hu, processes = _decode_volume(headers, decode_workers)
    pixel_spacing = _floats(first.PixelSpacing)
    volume = Volume(
        hu=hu,
        spacing=(spacing, pixel_spacing[0], pixel_spacing[1]),
        axes_lps=(_vec(normal), _vec(col_dir), _vec(row_dir)),
    )
    thickness = first.get("SliceThickness")
    return SeriesVolume(
        volume=volume,
        datasets=[ds for _, ds in headers],
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for _, ds in headers),
        image_orientation=(iop[0], iop[1], iop[2], iop[3], iop[4], iop[5]),
        first_position=_vec(positions[0]),
        slice_positions_mm=tuple(float(a) for a in along),
        decode_processes=processes,
        slice_thickness_mm=float(thickness) if thickness not in (None, "") else None,
    )


# --- headers ----------------------------------------------------------------------------------


def _read_header(path: Path) -> tuple[Path, Dataset]:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except FileNotFoundError:
        raise UnsuitableSeriesError(f"file {path.name} of the series is missing") from None
    except Exception as exc:  # any parser failure on untrusted bytes means a bad file
        raise UnsuitableSeriesError(
            f"file {path.name} is not a readable DICOM file ({type(exc).__name__}); "
            "it may be truncated or corrupt: resend the series"
        ) from exc
    _fill_identity_from_meta(ds)
    return path, ds


def _fill_identity_from_meta(ds: Dataset) -> None:
    """Take an empty SOP Class / Instance UID from the file meta information, which must hold the same.

    Some anonymisers empty these in the data set but keep the file meta: the instance is still
    identified, and highdicom needs the values in the data set to reference it.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    for keyword, meta_keyword in (
        ("SOPClassUID", "MediaStorageSOPClassUID"),
        ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
    ):
        if not ds.get(keyword) and _is_uid(meta.get(meta_keyword)):
            setattr(ds, keyword, meta.get(meta_keyword))


def _label(path: Path, ds: Dataset | None) -> str:
    """How a message names an instance: its SOP Instance UID when that is a UID, else the file name."""
    uid = ds.get("SOPInstanceUID") if ds is not None else None
    return f"instance {uid}" if _is_uid(uid) else f"file {path.name}"


def _check_instance(path: Path, ds: Dataset) -> None:
    name = _label(path, ds)
    sop_class = UID(str(ds.get("SOPClassUID", "")))
    if sop_class in MULTI_FRAME_CT:
        raise UnsuitableSeriesError(
            f"{name} is a multi-frame {sop_class.name} object, which is not supported; "
            "send the series as classic CT Image Storage (one slice per instance)"
        )
    if not sop_class:
        raise UnsuitableSeriesError(
            f"{name} has no SOP Class UID: it is no complete DICOM instance (truncated or corrupt?)"
        )
    if sop_class != CTImageStorage:
        what = f"a {sop_class.name} object ({sop_class})" if sop_class.name != sop_class else sop_class
        raise UnsuitableSeriesError(
            f"{name} is {what}, not a CT image; only CT Image Storage series can be segmented"
        )
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if not ds.get(keyword):
            raise UnsuitableSeriesError(f"{name} has no {keyword}; it cannot be referenced safely")
        if not _is_uid(ds.get(keyword)):
            raise UnsuitableSeriesError(f"{name}: {keyword} is not a valid DICOM UID")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise UnsuitableSeriesError(f"{name} holds several frames; only single-frame CT slices are supported")
    for keyword, size in (("ImageOrientationPatient", 6), ("ImagePositionPatient", 3), ("PixelSpacing", 2)):
        value = ds.get(keyword)
        try:
            values = _floats(value) if value not in (None, "") else []
        except (TypeError, ValueError):
            values = []
        if len(values) != size or not all(math.isfinite(v) for v in values):
            raise UnsuitableSeriesError(f"{name} has no valid {keyword}; its geometry is unknown")
    if any(v <= 0 for v in _floats(ds.PixelSpacing)):
        raise UnsuitableSeriesError(f"{name} has a PixelSpacing that is not positive")
    for keyword in ("Rows", "Columns", "BitsAllocated", "RescaleSlope", "RescaleIntercept"):
        if ds.get(keyword) in (None, ""):
            raise UnsuitableSeriesError(f"{name} has no {keyword}; Hounsfield units cannot be computed")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise UnsuitableSeriesError(f"{name} is not a greyscale image (SamplesPerPixel {ds.SamplesPerPixel})")
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    if not syntax:
        raise UnsuitableSeriesError(f"{name} has no transfer syntax in its file meta information")
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        known = f"transfer syntax {syntax} ({syntax.name})" if syntax.name != syntax else None
        raise UnsuitableSeriesError(
            f"{name} uses {known or f'the unknown transfer syntax {syntax}'}, which this node cannot "
            "decode; send the series uncompressed or with a common lossless compression"
        )


def _check_same(headers: list[tuple[Path, Dataset]]) -> None:
    for keyword, what in (
        ("StudyInstanceUID", "studies"),
        ("SeriesInstanceUID", "series"),
        ("FrameOfReferenceUID", "frames of reference"),
    ):
        values = {str(ds.get(keyword)) for _, ds in headers}
        if len(values) > 1:
            raise UnsuitableSeriesError(f"the instances belong to {len(values)} different {what}")
    sops = [str(ds.SOPInstanceUID) for _, ds in headers]
    if len(set(sops)) != len(sops):
        raise UnsuitableSeriesError(
            f"{len(sops) - len(set(sops))} instance(s) were given twice (same SOP Instance UID)"
        )


def _check_orientation(headers: list[tuple[Path, Dataset]], iop: list[float]) -> None:
    ref = np.array(iop)
    row, col = ref[:3], ref[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise UnsuitableSeriesError(
            f"ImageOrientationPatient {_fmt(iop)} is not two perpendicular unit vectors"
        )
    odd = [
        (path, ds)
        for path, ds in headers
        if np.max(np.abs(np.array(_floats(ds.ImageOrientationPatient)) - ref)) > ORIENTATION_TOL
    ]
    if odd:
        path, ds = odd[0]
        raise UnsuitableSeriesError(
            f"mixed orientations: {len(odd)} of {len(headers)} slices are not oriented like the first "
            f"({_label(path, ds)} has {_fmt(_floats(ds.ImageOrientationPatient))}, "
            f"the first {_fmt(iop)}); send a series with one orientation"
        )


def _check_pixel_grid(headers: list[tuple[Path, Dataset]]) -> None:
    def grid(ds: Dataset) -> tuple[int, int, float, float]:
        ps = _floats(ds.PixelSpacing)
        return int(ds.Rows), int(ds.Columns), ps[0], ps[1]

    ref = grid(headers[0][1])
    for path, ds in headers[1:]:
        g = grid(ds)
        if g[:2] != ref[:2] or max(abs(g[2] - ref[2]), abs(g[3] - ref[3])) > PIXEL_SPACING_TOL_MM:
            raise UnsuitableSeriesError(
                "mixed pixel grids: the first slice is "
                f"{ref[0]} x {ref[1]} pixels of {ref[2]:g} x {ref[3]:g} mm, {_label(path, ds)} is "
                f"{g[0]} x {g[1]} pixels of {g[2]:g} x {g[3]:g} mm"
            )


# --- positions --------------------------------------------------------------------------------


def _check_duplicates(steps: np.ndarray, along: np.ndarray) -> None:
    dup = np.flatnonzero(steps < DUPLICATE_POSITION_TOL_MM)
    if dup.size:
        raise UnsuitableSeriesError(
            f"{dup.size} slice(s) repeat the position of another slice (first at {along[dup[0]]:.2f} mm "
            "along the slice normal); the series holds more than one stack of slices"
        )


def _check_tilt(positions: np.ndarray, along: np.ndarray, normal: np.ndarray, pixel_mm: float) -> None:
    """Reject positions that drift within the image plane as they advance along the normal.

    A gantry-tilted acquisition keeps the image plane but shears the stack: each slice is offset
    along the column direction, so the slices do not form a rectangular grid.
    """
    rel = positions - positions[0]
    dist = along - along[0]
    in_plane = rel - np.outer(dist, normal)
    # Least-squares drift per mm along the normal (a line through the first slice).
    drift = (dist @ in_plane) / float(dist @ dist)
    # Scattered offsets first: they are no tilt, and would fit one badly.
    scatter = float(np.max(np.linalg.norm(in_plane - np.outer(dist, drift), axis=1)))
    if scatter > pixel_mm / 2:
        raise UnsuitableSeriesError(
            f"the slice positions do not lie on one line: slices are shifted by up to {scatter:.2f} mm "
            "within the image plane"
        )
    tilt_deg = math.degrees(math.atan(float(np.linalg.norm(drift))))
    if tilt_deg > MAX_TILT_DEG:
        raise UnsuitableSeriesError(
            f"gantry/detector tilt of {tilt_deg:.1f} degrees is not supported; "
            "send the series reconstructed without tilt"
        )


def _check_spacing(steps: np.ndarray, along: np.ndarray) -> float:
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    if gaps.size:
        k = int(gaps[0])
        raise UnsuitableSeriesError(
            f"slice(s) missing: a gap of {steps[k]:.2f} mm between the slices at {along[k]:.2f} mm and "
            f"{along[k + 1]:.2f} mm along the slice normal, where slices are {median:.2f} mm apart "
            f"({gaps.size} gap(s) in all); resend the complete series"
        )
    tol = max(SPACING_ABS_TOL_MM, SPACING_REL_TOL * median)
    odd = np.flatnonzero(np.abs(steps - median) > tol)
    if odd.size:
        k = int(odd[0])
        raise UnsuitableSeriesError(
            f"irregular slice spacing: {odd.size} step(s) differ from the median of {median:.3f} mm by "
            f"more than {tol:.3f} mm (e.g. {steps[k]:.3f} mm after {along[k]:.2f} mm)"
        )
    return float(np.mean(steps))


# --- pixels -----------------------------------------------------------------------------------


def _decode_volume(headers: list[tuple[Path, Dataset]], decode_workers: int | None) -> tuple[np.ndarray, int]:
    """Decode every slice (in worker processes when that pays) and convert it to HU.

    Returns the HU array and the number of decoder processes used.
    """
    first = headers[0][1]
    shape = (len(headers), int(first.Rows), int(first.Columns))
    rescale = [(float(ds.RescaleSlope), float(ds.RescaleIntercept)) for _, ds in headers]
    integral = all(s.is_integer() and i.is_integer() for s, i in rescale)
    hu = np.empty(shape, dtype=np.int16 if integral else np.float32)
    # Uncompressed pixel data are only copied: decoder processes would cost more than they save.
    compressed = any(UID(ds.file_meta.TransferSyntaxUID).is_encapsulated for _, ds in headers)
    workers = decode_workers
    if workers is None:
        big = shape[0] * shape[1] * shape[2] >= PARALLEL_MIN_PIXELS
        workers = _available_cores() if compressed and big else 1
    for k, decoded in enumerate(_decode_all([str(p) for p, _ in headers], workers)):
        path, ds = headers[k]
        if isinstance(decoded, str):
            raise UnsuitableSeriesError(f"{_label(path, ds)} could not be decoded: {decoded}")
        if decoded.shape != shape[1:]:
            raise UnsuitableSeriesError(
                f"{_label(path, ds)} decodes to {decoded.shape} pixels, not the {shape[1:]} of its header"
            )
        slope, intercept = rescale[k]
        if hu.dtype == np.int16:
            ends = (float(decoded.min()) * slope + intercept, float(decoded.max()) * slope + intercept)
            if min(ends) < -32768 or max(ends) > 32767:
                hu = hu.astype(np.float32)  # rare: HU beyond int16; keep the memory-cheap type otherwise
        if hu.dtype == np.int16:
            # In int32, written straight into the volume: no temporary array per slice.
            if slope == 1:
                np.add(decoded, int(intercept), out=hu[k], dtype=np.int32, casting="unsafe")
            else:
                scaled = np.multiply(decoded, int(slope), dtype=np.int32)
                np.add(scaled, int(intercept), out=hu[k], casting="unsafe")
        else:
            hu[k] = decoded.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return hu, _effective_workers(workers, len(headers))


def _effective_workers(workers: int, n_paths: int) -> int:
    workers = max(1, min(workers, n_paths))
    if workers > 1 and multiprocessing.current_process().daemon:
        # A daemonic process may not start processes of its own.
        log.warning("decoding in-process: this worker process is daemonic and cannot start decoders")
        return 1
    return workers


def allow_decoder_processes() -> None:
    """Let this Celery pool process start decoder processes of its own; call it once, after the fork.

    billiard, Celery's multiprocessing, marks its pool processes daemonic, and the standard library
    refuses a daemonic process children: every series would be decoded on one core. billiard also
    puts its own process object in the standard library's place, whose authentication key refuses
    to be pickled for a standard library fork server. Both are undone here: the decoders are this
    process's own (children of its fork server, which ends with it), not orphans of the pool.
    """
    current = multiprocessing.current_process()
    # billiard's object: its public setters would store billiard's types, hence the private dict.
    config = current._config  # type: ignore[attr-defined]
    config["daemon"] = False
    config["authkey"] = multiprocessing.process.AuthenticationString(  # type: ignore[attr-defined]
        bytes(current.authkey)
    )


def start_decoder_server() -> None:
    """Start the decoders' fork server now (a worker at start-up), not during the first job."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        _mp_context()
        multiprocessing.forkserver.ensure_running()


def _decode_all(paths: list[str], workers: int) -> Iterator[np.ndarray | str]:
    """Stored pixel values of each file (or why it failed), in order; yielded as they arrive."""
    workers = _effective_workers(workers, len(paths))
    if workers == 1:
        yield from _decode_chunk(paths)
        return
    # About four chunks per worker: even load, few round trips.
    size = max(1, math.ceil(len(paths) / (workers * 4)))
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context())
    try:
        for chunk in pool.map(_decode_chunk, chunks):
            yield from chunk
    except BrokenProcessPool as exc:
        raise DecodeFailedError(
            "a pixel decoder process died while decoding the series (out of memory, or a decoder "
            "crash on damaged data); retry the job, and check the worker's memory if it recurs"
        ) from exc
    finally:
        # A rejected slice stops the consumer: do not decode the chunks still queued.
        pool.shutdown(wait=True, cancel_futures=True)


def _decode_chunk(paths: list[str]) -> list[np.ndarray | str]:
    """Runs in a decoder process: plain arrays and strings travel back, never exceptions."""
    return [_decode_one(p) for p in paths]


def _decode_one(path: str) -> np.ndarray | str:
    # pydicom's pixel_array(path) reads only the elements decoding needs; what it cannot read (a
    # deflated data set, damage) is read again whole, which says what is wrong.
    with contextlib.suppress(Exception):  # told apart below
        return np.asarray(pixel_array(path))
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes means a bad file
        return f"the file is truncated or corrupt ({type(exc).__name__})"
    if "PixelData" not in ds:
        return "it has no Pixel Data (a header without an image)"
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on damaged data
        return f"its pixel data are damaged or truncated ({type(exc).__name__}: {str(exc)[:160]})"
    return np.asarray(arr)


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver: decoders fork from a clean server process, not from this one.

    This process may hold threads (a Celery worker, torch) and fork can deadlock on their locks.
    The server is started once per process, with this module (pydicom, numpy, the codecs) imported
    beforehand, so each later decoder process starts in milliseconds instead of re-importing.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", __name__])  # only read when the server starts
    return ctx


# --- small helpers ----------------------------------------------------------------------------


def _floats(value: object) -> list[float]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [float(v) for v in value]
    return [float(value)]  # type: ignore[arg-type]


def _vec(v: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
