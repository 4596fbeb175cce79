"""A segmenter with no trained weights: body, lungs and airways from CT numbers alone.

It is the node's always-available segmenter (no GPU, no model files), and a baseline that a learned
model has to beat. Everything is thresholds on Hounsfield units, morphology and connected components
with scipy.ndimage. The heavy steps run on a subsampled working grid (about 2.5 mm voxels), then the
boundaries are put back at full resolution from the full-resolution CT numbers, which keeps a
300 x 512 x 512 series within a few seconds on one core and within a few full-size arrays of memory.

Sizes are in millimetres and millilitres (from ``Volume.spacing``), never in voxels, so the same
settings hold for any pixel size or slice spacing. Slices are taken to be axial or near it (CT as
acquired); "in-plane" steps work slice by slice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from segmenters.anatomy import structure
from segmenters.base import AlgorithmInfo, Concept, Structure, Volume

logger = logging.getLogger(__name__)

BODY, RIGHT_LUNG, LEFT_LUNG, AIRWAYS = 1, 2, 3, 4

STRUCTURES: tuple[Structure, ...] = (
    structure(BODY, "body"),
    structure(RIGHT_LUNG, "right_lung"),
    structure(LEFT_LUNG, "left_lung"),
    structure(AIRWAYS, "airways"),
)

# Thresholds and sizes. Each is a physical quantity, so it holds for any grid.
BODY_MIN_HU = -500.0  # tissue of the body; air, mattress foam and blankets fall below
AIR_MAX_HU = -320.0  # aerated lung (with dependent, less aerated parts) and airway lumen fall below
LUMEN_MAX_HU = -900.0  # airway lumen (about -1000) but not lung parenchyma (about -850)
WORK_PIXEL_MM = 2.5  # in-plane voxel size of the working grid
WORK_SLICE_MM = 2.5  # thin slices are subsampled towards this spacing too
TABLE_OPENING_MM = 3.0  # radius of an in-plane opening that cuts off the couch's shell and blankets
LIMB_MIN_RADIUS_MM = 15.0  # a body part beside the trunk (an arm) holds a square this far across
LIMB_MIN_FRACTION = 0.01  # ... and at least this fraction of the trunk's volume
SKIN_MARGIN_MM = 5.0  # lungs and airways lie at least this far inside the skin
AIRWAY_WALL_MM = 2.5  # the grown lumen is widened by this, out to the lung threshold
LUNG_MIN_ML = 10.0  # smaller air pockets are not lung
LUNG_MAX_MEAN_HU = -600.0  # a lung's mean CT number, emphysema to consolidation, lies below this
GAS_MIN_FRACTION = 0.4  # bowel gas has more than this fraction of voxels below GAS_HU ...
GAS_HU = -950.0
GAS_MAX_ML = 500.0  # ... and nothing this large is bowel gas
TRACHEA_AREA_MM2 = (40.0, 700.0)  # cross-section of the trachea in an axial slice
TRACHEA_MIN_LENGTH_MM = 30.0  # a trachea seed must continue this far
AIRWAY_MAX_ML = 250.0  # a region grown from the trachea beyond this has leaked into the lungs
AIRWAY_THRESHOLDS_HU = (-950.0, -975.0, -990.0)  # tried in turn until the growth does not leak
TRACHEA_MAX_OFF_MIDLINE_MM = 30.0  # the trachea lies near the body's mid-line
TRACHEA_MAX_SHIFT_MM = 6.0  # the trachea moves less than this from one slice to the next
MERGED_SHARE = 0.15  # a lung component with more than this share on each side is two lungs
SPLIT_MAX_EROSIONS = 12  # erosions tried to separate two lungs that touch
SPLIT_MIN_SHARE = 0.1  # the smaller of two eroded pieces holds at least this share of the larger
# A ball this wide rolled along each lung's outline, slice by slice, takes in the dense lung that the
# air threshold leaves out where it touches the edge: consolidation and atelectasis, nodules on the
# pleura, vessels at the hilum (what a clinical lung contour includes) ...
ROLLING_BALL_MM = 8.0
# Holes a lung's slice closes around are lung (vessels, small nodules) up to this area; a larger one
# is what the lung wraps around: the diaphragm's dome with the liver or stomach under it, a tumour.
LUNG_HOLE_MAX_MM2 = 1000.0
DENSE_LUNG_MAX_HU = 150.0  # ... as long as it is soft tissue, not bone

_BAND = np.uint8(255)  # marks working voxels on a boundary, settled at full resolution
_BAND_BLOCKS = 1 << 18  # boundary voxels of the working grid settled at a time

_PLANE = np.zeros((3, 3, 3), dtype=bool)
_PLANE[1] = ndi.generate_binary_structure(2, 1)  # in-plane 4-connectivity: 2D work on a 3D array
_FACE = ndi.generate_binary_structure(3, 1)  # 6-connectivity in 3D


@dataclass(frozen=True)
class _Grid:
    """The working grid: subsampling steps along (slice, row, column) and its voxel geometry."""

    steps: tuple[int, int, int]
    spacing: tuple[float, float, float]  # mm, of the working grid
    axes_lps: tuple[tuple[float, ...], ...]

    @property
    def voxel_ml(self) -> float:
        return self.spacing[0] * self.spacing[1] * self.spacing[2] / 1000.0

    def radius(self, mm: float) -> int:
        """A distance in mm as a whole number of in-plane pixels."""
        return round(mm / min(self.spacing[1], self.spacing[2]))

    def lateral_mm(self, index: np.ndarray) -> np.ndarray:
        """Patient x (towards the patient's left) in mm of voxel indices of shape (..., 3), from the
        first voxel: differences of it tell left from right whatever the image orientation."""
        x = np.array([self.axes_lps[i][0] * self.spacing[i] for i in range(3)])
        return np.asarray(index @ x, dtype=np.float64)


class ClassicalSegmenter:
    """Body, right and left lung, and trachea with main bronchi, from thresholds and morphology.

    The lungs follow the habit of radiotherapy contours: vessels inside the lung are included, the
    hilum, the tumour and the trachea and main bronchi are not. The airway label is the trachea and
    the bronchi outside the lungs; it is left out (merged into body) when no trachea is found in the
    top of the scan, which is the case for a scan that starts below the carina.
    """

    @property
    def algorithm(self) -> AlgorithmInfo:
        # CID 7162 (Segmentation Algorithm Families): the method is thresholds, morphology and
        # connected components, with no learning.
        return AlgorithmInfo(
            name="segnode-classical",
            version="1.0",
            family=Concept("123104", "Morphological Operations", "DCM"),
            kind="AUTOMATIC",
        )

    @property
    def structures(self) -> Sequence[Structure]:
        return STRUCTURES

    def predict(self, volume: Volume) -> np.ndarray:
        grid = _working_grid(volume)
        low = _subsample(volume.hu, grid.steps)
        labels = np.zeros(low.shape, dtype=np.uint8)
        dense = np.zeros(low.shape, dtype=bool)
        body = _body(low, grid)
        box = _bounding_box(body)
        if box is not None:
            labels[box], dense[box] = _inside_body(low[box], body[box], grid)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "classical segmentation: %s",
                ", ".join(
                    f"{s.name} {np.count_nonzero(labels == s.label) * grid.voxel_ml:.0f} ml"
                    for s in STRUCTURES
                ),
            )
        return _to_full_resolution(labels, volume.hu, grid, dense)


def body_mask(volume: Volume) -> np.ndarray:
    """The patient's outline alone (bool, ``volume.hu.shape``): the body with everything inside it
    (lungs and airways included), without the table, blankets and air around it.

    The same outline :class:`ClassicalSegmenter` draws, for another segmenter to crop its input to
    or to clear labels outside the patient (:mod:`segmenters.cropping`). Only the body step runs,
    without the lung and trachea search: 0.35 s instead of 0.56 s for 111 slices of 512 x 512 on
    one core, most of what is left being the edge put back at full resolution.
    """
    grid = _working_grid(volume)
    body = _body(_subsample(volume.hu, grid.steps), grid)
    full = _to_full_resolution(body.view(np.uint8), volume.hu, grid)
    # With no lung label the map holds only 0 and BODY (1): its bytes are the mask, no copy.
    return full.view(bool)


def _working_grid(volume: Volume) -> _Grid:
    dz, dy, dx = volume.spacing
    steps = (
        max(1, round(WORK_SLICE_MM / dz)),
        max(1, round(WORK_PIXEL_MM / dy)),
        max(1, round(WORK_PIXEL_MM / dx)),
    )
    spacing = (dz * steps[0], dy * steps[1], dx * steps[2])
    return _Grid(steps, spacing, tuple(tuple(float(c) for c in axis) for axis in volume.axes_lps))


def _subsample(hu: np.ndarray, steps: tuple[int, int, int]) -> np.ndarray:
    """Every steps-th voxel, as a compact array (int16 or float32, never a float64 copy)."""
    view = hu[:: steps[0], :: steps[1], :: steps[2]]
    if np.issubdtype(view.dtype, np.integer) and view.dtype.itemsize <= 2:
        return np.ascontiguousarray(view)
    return view.astype(np.float32)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding ``mask``, or None when it is empty."""
    if not mask.any():
        return None
    box = ndi.find_objects(mask.view(np.uint8))[0]
    return tuple(box)


def _inside_body(low: np.ndarray, body: np.ndarray, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """The label map inside the body's box: lungs and airways carved out of the body; and where
    lung is dense (taken in by the rolling ball), whose full-resolution boundary is not air."""
    inside_air = _erode_in_plane(body, grid.radius(SKIN_MARGIN_MM)) & (low < AIR_MAX_HU)
    lungs = _lung_air(low, inside_air, grid)
    airways = np.zeros(low.shape, dtype=bool)
    trachea = _find_trachea(low, lungs, grid)
    if trachea is not None:
        lumen = _grow_airways(low, lungs, trachea.seed, grid)
        # What stays lung once the airways are out; air pieces wholly above the trachea's top
        # (larynx, pharynx) are not lung.
        lungs = _lung_air(low, lungs & ~lumen, grid)
        lungs = _drop_above(lungs, trachea.top, grid)
        airways = _cut_above(lumen, trachea.top, grid)
    lungs = _drop_gas_under_lungs(lungs, grid)
    right, left = _split_lungs(lungs, body, grid)
    hole = LUNG_HOLE_MAX_MM2 / (grid.spacing[1] * grid.spacing[2])
    right = _fill_in_plane(right, hole)
    left = _fill_in_plane(left, hole) & ~right
    # The rolling ball: dense lung along each outline, inside the ribs, never the other lung's, and
    # never air already found not to be lung (gas below the diaphragm, in a concavity of the base).
    gas = inside_air & ~(right | left)
    may_be_dense = (
        _erode_in_plane(body, grid.radius(SKIN_MARGIN_MM)) & (low < DENSE_LUNG_MAX_HU) & ~airways & ~gas
    )
    ball = grid.radius(ROLLING_BALL_MM)
    dense_right = _close_in_plane(right, ball) & may_be_dense & ~right & ~left
    right |= dense_right
    dense_left = _close_in_plane(left, ball) & may_be_dense & ~right & ~left
    left |= dense_left
    airways &= ~(right | left)
    labels = np.zeros(low.shape, dtype=np.uint8)
    labels[body] = BODY
    labels[right] = RIGHT_LUNG
    labels[left] = LEFT_LUNG
    labels[airways] = AIRWAYS
    return labels, dense_right | dense_left


def _body(low: np.ndarray, grid: _Grid) -> np.ndarray:
    """The patient's outline, holes filled slice by slice: the trunk and any thick part beside it.

    An in-plane opening cuts the table shell and blankets off the patient; of what remains, the
    largest 3D component is the trunk, and other components count as body only when they are thick
    (arms), which table parts and positioning aids are not.
    """
    tissue = low > BODY_MIN_HU
    opening = grid.radius(TABLE_OPENING_MM)
    opened = _dilate_in_plane(_erode_in_plane(tissue, opening), opening)
    components, count = ndi.label(opened, structure=_FACE)
    if count == 0:
        return np.zeros(low.shape, dtype=bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    trunk = int(sizes.argmax())
    thick = np.unique(components[_erode_in_plane(opened, grid.radius(LIMB_MIN_RADIUS_MM))])
    keep = np.zeros(count + 1, dtype=bool)
    keep[thick] = sizes[thick] >= LIMB_MIN_FRACTION * sizes[trunk]
    keep[trunk] = True
    keep[0] = False
    body = keep[components]
    # Give back the skin detail the opening took, but not the table further out.
    body = _dilate_in_plane(body, opening) & tissue
    return _fill_in_plane(body)


def _lung_air(low: np.ndarray, inside_air: np.ndarray, grid: _Grid) -> np.ndarray:
    """Air inside the body that is lung (with the airways): large, not pure gas, not dense.

    Bowel gas is told from lung by its CT numbers: gas is mostly below -950 HU, aerated lung mostly
    above. A very large component is lung whatever its numbers (emphysema).
    """
    components, count = ndi.label(inside_air, structure=_FACE)
    if count == 0:
        return np.zeros(low.shape, dtype=bool)
    ids = components[inside_air]
    values = low[inside_air]
    size = np.bincount(ids, minlength=count + 1)
    mean = np.bincount(ids, weights=values, minlength=count + 1) / np.maximum(size, 1)
    gas = np.bincount(ids, weights=values < GAS_HU, minlength=count + 1) / np.maximum(size, 1)
    ml = size * grid.voxel_ml
    lung = (ml >= LUNG_MIN_ML) & (mean < LUNG_MAX_MEAN_HU) & ((gas < GAS_MIN_FRACTION) | (ml >= GAS_MAX_ML))
    lung[0] = False
    return np.asarray(lung[components])


def _drop_gas_under_lungs(lungs: np.ndarray, grid: _Grid) -> np.ndarray:
    """Air that lies under larger air is gas in the stomach or bowel below the diaphragm, however
    lung-like its CT numbers or size: the lungs lie side by side, never one under the other.

    Components are taken largest first; one goes when most of its voxels have a kept, larger
    component above them in the same column.
    """
    components, count = ndi.label(lungs, structure=_FACE)
    if count < 2:
        return lungs
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    superior = _superior(grid)
    index = np.arange(lungs.shape[0])[:, None, None]
    # Per column, the most superior slice of what is kept so far (superior: the largest index when
    # slices run foot to head; the order is flipped otherwise).
    height = index if superior > 0 else lungs.shape[0] - 1 - index
    top = np.full(lungs.shape[1:], -1, dtype=np.int64)
    keep = np.zeros(count + 1, dtype=bool)
    boxes = ndi.find_objects(components)
    for component in np.argsort(sizes)[::-1][:count]:
        box = boxes[component - 1]
        voxels = components[box] == component  # in its own box, not the whole grid
        z, y, x = np.nonzero(voxels)
        z, y, x = z + box[0].start, y + box[1].start, x + box[2].start
        under = np.count_nonzero(top[y, x] > height[z, 0, 0])
        if under > 0.5 * z.size:
            logger.debug("air of %.0f ml under the lungs is not lung", z.size * grid.voxel_ml)
            continue
        keep[component] = True
        np.maximum.at(top, (y, x), height[z, 0, 0])
    return np.asarray(keep[components])


@dataclass(frozen=True)
class _Trachea:
    seed: np.ndarray  # bool, one cross-section of the trachea
    top: int  # the slice of the trachea's upper end in the scan


def _grow_airways(low: np.ndarray, lungs: np.ndarray, seed: np.ndarray, grid: _Grid) -> np.ndarray:
    """The airway lumen connected to the trachea seed, or nothing.

    The growth stays in the lung air (which the trachea joins through the bronchi) and uses a
    threshold well below lung parenchyma, so it follows the lumen; when it still spreads into the
    lungs (too large), a stricter threshold is tried, and if every one leaks there is no airway
    label rather than a wrong one.
    """
    for threshold in AIRWAY_THRESHOLDS_HU:
        components, _ = ndi.label(lungs & (low < threshold), structure=_FACE)
        ids = np.unique(components[seed])
        ids = ids[ids > 0]
        if ids.size == 0:
            continue
        grown = np.isin(components, ids)
        if np.count_nonzero(grown) * grid.voxel_ml > AIRWAY_MAX_ML:
            continue
        # Out to the lumen's edge at the lung threshold, as the lungs are drawn.
        return _dilate_in_plane(_fill_in_plane(grown), grid.radius(AIRWAY_WALL_MM)) & lungs
    logger.debug("airway growth leaked at every threshold; no airway label")
    return np.zeros(low.shape, dtype=bool)


def _superior(grid: _Grid) -> int:
    """+1 when the slice index grows towards the head, -1 when towards the feet."""
    return 1 if grid.axes_lps[0][2] > 0 else -1


def _above(n_slices: int, top: int, grid: _Grid) -> slice:
    """The slices above slice ``top``."""
    return slice(top + 1, n_slices) if _superior(grid) > 0 else slice(0, top)


def _cut_above(mask: np.ndarray, top: int, grid: _Grid) -> np.ndarray:
    out = mask.copy()
    out[_above(mask.shape[0], top, grid)] = False
    return out


def _drop_above(mask: np.ndarray, top: int, grid: _Grid) -> np.ndarray:
    """``mask`` without its components that lie wholly above slice ``top``."""
    components, _ = ndi.label(mask, structure=_FACE)
    out = mask.copy()
    for i, box in enumerate(ndi.find_objects(components), start=1):
        if box is None:
            continue
        wholly_above = box[0].start > top if _superior(grid) > 0 else box[0].stop <= top
        if wholly_above:
            out[box] &= components[box] != i
    return out


def _find_trachea(low: np.ndarray, lungs: np.ndarray, grid: _Grid) -> _Trachea | None:
    """The trachea: a dark, roundish, trachea-sized region near the body's mid-line that continues
    down through several centimetres, found going down from the top slice; or None.

    It is looked for in the lung air, which the trachea joins through the bronchi and bowel gas
    never does. The search stops at the middle of the lungs, and only scans with a roughly axial
    slice axis are searched. A run broken by the larynx's narrow vocal cords starts again below.
    """
    if abs(grid.axes_lps[0][2]) < 0.8 or not lungs.any():
        return None
    up = _superior(grid)
    lung_mid = float(np.median(np.flatnonzero(lungs.any(axis=(1, 2)))))
    needed = max(2, math.ceil(TRACHEA_MIN_LENGTH_MM / grid.spacing[0]))
    order = range(low.shape[0] - 1, -1, -1) if up > 0 else range(low.shape[0])
    run: list[int] = []
    previous: np.ndarray | None = None
    for z in order:
        if (z - lung_mid) * up < 0:
            break
        near = None
        if previous is not None:
            near = _dilate_in_plane(previous[np.newaxis], grid.radius(TRACHEA_MAX_SHIFT_MM))[0]
        candidate = _trachea_candidate(low[z], lungs[z], z, grid, near)
        if candidate is None or (near is not None and not (candidate & near).any()):
            run = []
        if candidate is not None:
            run.append(z)
        previous = candidate
        if len(run) >= needed and candidate is not None:
            seed = np.zeros(low.shape, dtype=bool)
            seed[z] = candidate
            return _Trachea(seed, run[0])
    return None


def _trachea_candidate(
    hu: np.ndarray, air: np.ndarray, z: int, grid: _Grid, previous: np.ndarray | None
) -> np.ndarray | None:
    """In one slice, the air region that looks most like the trachea, or None.

    Trachea-sized, roundish, lumen-dark and within a few centimetres of the mid-line; of several
    (air in the oesophagus), the one continuing the previous slice's, else the largest.
    """
    regions, count = ndi.label(air)
    if count == 0:
        return None
    pixel_mm2 = grid.spacing[1] * grid.spacing[2]
    lo_area, hi_area = TRACHEA_AREA_MM2
    midline = _slice_midline(hu, z, grid)
    best: np.ndarray | None = None
    best_score = -1.0
    for i, box in enumerate(ndi.find_objects(regions), start=1):
        if box is None:
            continue
        region = regions[box] == i
        pixels = np.count_nonzero(region)
        if not lo_area <= pixels * pixel_mm2 <= hi_area or pixels < 0.5 * region.size:
            continue  # wrong size, or not roundish
        if np.median(hu[box][region]) > LUMEN_MAX_HU:
            continue  # lung apex, not lumen
        centre = np.array(
            [[z, (box[0].start + box[0].stop - 1) / 2.0, (box[1].start + box[1].stop - 1) / 2.0]]
        )
        if abs(float(grid.lateral_mm(centre)[0]) - midline) > TRACHEA_MAX_OFF_MIDLINE_MM:
            continue
        mask = np.zeros(hu.shape, dtype=bool)
        mask[box] = region
        score = float(pixels) + (1e9 if previous is not None and (mask & previous).any() else 0.0)
        if score > best_score:
            best, best_score = mask, score
    return best


def _slice_midline(hu: np.ndarray, z: int, grid: _Grid) -> float:
    """Patient x (mm) of the centre of the body tissue in one slice."""
    rows, cols = np.nonzero(hu > BODY_MIN_HU)
    if rows.size == 0:
        return 0.0
    centre = np.array([[z, rows.mean(), cols.mean()]])
    return float(grid.lateral_mm(centre)[0])


def _split_lungs(lungs: np.ndarray, body: np.ndarray, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Right and left lung: each component by its side of the body's mid-line.

    A component with a good share on both sides is two lungs that touch (the anterior junction)
    and is separated.
    """
    right = np.zeros(lungs.shape, dtype=bool)
    left = np.zeros(lungs.shape, dtype=bool)
    components, _ = ndi.label(lungs, structure=_FACE)
    midline = float(grid.lateral_mm(_centre(body)[np.newaxis])[0])
    for i, box in enumerate(ndi.find_objects(components), start=1):
        if box is None:
            continue
        part = components[box] == i
        x = _lateral_grid(part.shape, box, grid) - midline
        share_left = np.count_nonzero(part & (x > 0)) / np.count_nonzero(part)
        if MERGED_SHARE < share_left < 1.0 - MERGED_SHARE:
            part_right, part_left = _separate(part, x, grid)
        elif share_left >= 0.5:
            part_right, part_left = np.zeros_like(part), part
        else:
            part_right, part_left = part, np.zeros_like(part)
        right[box] |= part_right
        left[box] |= part_left
    return right, left


def _centre(mask: np.ndarray) -> np.ndarray:
    """Mean (slice, row, column) index of a non-empty mask, from its projections."""
    centre = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        counts = np.count_nonzero(mask, axis=others)
        centre.append(float(np.dot(counts, np.arange(counts.size)) / counts.sum()))
    return np.array(centre)


def _lateral_grid(shape: tuple[int, ...], box: tuple[slice, ...], grid: _Grid) -> np.ndarray:
    """Patient x (mm) of every voxel of a box, as a broadcastable sum (no full index arrays)."""
    x = np.zeros((1, 1, 1), dtype=np.float32)
    for axis in range(3):
        index = np.arange(box[axis].start, box[axis].start + shape[axis], dtype=np.float32)
        along = index * np.float32(grid.axes_lps[axis][0] * grid.spacing[axis])
        x = x + along.reshape([-1 if a == axis else 1 for a in range(3)])
    return x


def _separate(part: np.ndarray, x: np.ndarray, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Split one component spanning both sides into right and left.

    Erode until it falls into two large pieces, then give every voxel to the nearer piece; when
    erosion does not separate it, cut at the body's mid-sagittal plane.
    """
    core = part
    for _ in range(SPLIT_MAX_EROSIONS):
        core = ndi.binary_erosion(core, structure=_PLANE)
        pieces, count = ndi.label(core, structure=_FACE)
        if count == 0:
            break
        if count < 2:
            continue
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        first, second = np.argsort(sizes)[::-1][:2]
        if sizes[second] < SPLIT_MIN_SHARE * sizes[first]:
            continue
        seeds = np.where(pieces == first, 1, 0) + np.where(pieces == second, 2, 0)
        nearest = ndi.distance_transform_edt(
            seeds == 0, sampling=grid.spacing, return_distances=False, return_indices=True
        )
        owner = seeds[tuple(nearest)]
        a, b = part & (owner == 1), part & (owner == 2)
        xa = float(np.broadcast_to(x, part.shape)[a].mean())
        xb = float(np.broadcast_to(x, part.shape)[b].mean())
        return (a, b) if xa < xb else (b, a)
    logger.debug("lungs not separable by erosion; cut at the mid-line")
    return part & (x < 0), part & (x >= 0)


def _to_full_resolution(
    labels: np.ndarray, hu: np.ndarray, grid: _Grid, dense: np.ndarray | None = None
) -> np.ndarray:
    """The working-grid labels on the CT grid, with boundaries placed by the full-resolution HU.

    Where a voxel's neighbourhood on the working grid holds one label, it takes that label. Near a
    boundary it takes a lung or airway label if it is air (soft tissue, in ``dense`` lung) and one
    is near, otherwise background if it is air next to the outside, otherwise body. Boundary voxels
    are settled a block of working voxels at a time, so temporaries stay small whatever the series'
    size.
    """
    sz, sy, sx = grid.steps
    size = (3 if sz > 1 else 1, 3, 3)
    high = ndi.maximum_filter(labels, size=size)
    low = ndi.minimum_filter(labels, size=size)
    core = np.where(high != low, _BAND, labels)
    air_label = ndi.maximum_filter(np.where(labels >= RIGHT_LUNG, labels, np.uint8(0)), size=size)
    near_outside = low == 0
    del high, low

    full = np.empty(hu.shape, dtype=np.uint8)
    _upsample_into(full, core, grid.steps)
    band = np.nonzero(core == _BAND)
    last = np.array(hu.shape) - 1
    for start in range(0, band[0].size, _BAND_BLOCKS):
        bz, by, bx = (axis[start : start + _BAND_BLOCKS] for axis in band)
        # Each block's voxels on the CT grid; a block cut by the volume's edge repeats its last
        # voxel, which is then settled twice to the same label.
        z = np.minimum(bz[:, None] * sz + np.arange(sz), last[0])[:, :, None, None]
        y = np.minimum(by[:, None] * sy + np.arange(sy), last[1])[:, None, :, None]
        x = np.minimum(bx[:, None] * sx + np.arange(sx), last[2])[:, None, None, :]
        values = hu[z, y, x]
        lung = air_label[bz, by, bx][:, None, None, None]
        out = np.where(
            near_outside[bz, by, bx][:, None, None, None] & (values <= BODY_MIN_HU),
            np.uint8(0),
            np.uint8(BODY),
        )
        ceiling: float | np.ndarray = AIR_MAX_HU
        if dense is not None:
            ceiling = np.where(dense[bz, by, bx], DENSE_LUNG_MAX_HU, AIR_MAX_HU)[:, None, None, None]
        np.copyto(out, lung, where=(lung > 0) & (values < ceiling))
        full[z, y, x] = out
    return full


def _upsample_into(full: np.ndarray, labels: np.ndarray, steps: tuple[int, int, int]) -> None:
    """Nearest-neighbour upsampling by whole steps: each working voxel fills its block of ``full``."""
    sz, sy, sx = steps
    for i in range(sz):
        for j in range(sy):
            for k in range(sx):
                target = full[i::sz, j::sy, k::sx]
                target[...] = labels[: target.shape[0], : target.shape[1], : target.shape[2]]


def _erode_in_plane(mask: np.ndarray, radius: int) -> np.ndarray:
    """Erosion by a square reaching ``radius`` pixels from its centre, in each slice (outside the
    array counts as background). Two 1D passes, whatever the radius."""
    if radius <= 0:
        return mask.copy()
    size = 2 * radius + 1
    out = ndi.minimum_filter1d(mask.view(np.uint8), size, axis=1, mode="constant", cval=0)
    out = ndi.minimum_filter1d(out, size, axis=2, mode="constant", cval=0)
    return out.view(bool)


def _dilate_in_plane(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation by a square reaching ``radius`` pixels from its centre, in each slice."""
    if radius <= 0:
        return mask.copy()
    size = 2 * radius + 1
    out = ndi.maximum_filter1d(mask.view(np.uint8), size, axis=1, mode="constant", cval=0)
    out = ndi.maximum_filter1d(out, size, axis=2, mode="constant", cval=0)
    return out.view(bool)


def _close_in_plane(mask: np.ndarray, radius: int) -> np.ndarray:
    """Closing by an octagon of ``radius`` pixels (a disk's near enough shape) in each slice: what
    a ball that size cannot enter. Worked in the mask's own box, 3 x 3 squares and crosses a pass
    at a time, each pass a few whole-array boolean operations."""
    found = ndi.find_objects(mask.view(np.uint8))
    if radius <= 0 or not found or found[0] is None:
        return mask.copy()
    box = found[0]
    inner = np.pad(mask[box], ((0, 0), (2 * radius, 2 * radius), (2 * radius, 2 * radius)))
    for step in range(radius):
        inner = _grow_3x3(inner, square=step % 2 == 0)
    for step in range(radius):
        inner = ~_grow_3x3(~inner, square=step % 2 == 0)
    closed = mask.copy()
    rows, cols = box[1], box[2]
    # What the closing adds lies within the mask's box; beyond it, only padding that shrank back.
    closed[box] |= inner[
        :, 2 * radius : 2 * radius + rows.stop - rows.start, 2 * radius : 2 * radius + cols.stop - cols.start
    ]
    return closed


def _grow_3x3(mask: np.ndarray, square: bool) -> np.ndarray:
    """Dilation by a 3 x 3 square (or cross) in each slice."""
    out = mask.copy()
    out[:, 1:, :] |= mask[:, :-1, :]
    out[:, :-1, :] |= mask[:, 1:, :]
    if square:
        rows = out.copy()
        out[:, :, 1:] |= rows[:, :, :-1]
        out[:, :, :-1] |= rows[:, :, 1:]
    else:
        out[:, :, 1:] |= mask[:, :, :-1]
        out[:, :, :-1] |= mask[:, :, 1:]
    return out


def _fill_in_plane(mask: np.ndarray, max_hole_pixels: float = math.inf) -> np.ndarray:
    """Fill holes slice by slice: background not connected in-plane to the slice's edge (and, with
    ``max_hole_pixels``, no larger than that)."""
    if not mask.any():
        return mask
    box = ndi.find_objects(mask.view(np.uint8))[0]
    box = (
        box[0],
        slice(max(0, box[1].start - 1), box[1].stop + 1),
        slice(max(0, box[2].start - 1), box[2].stop + 1),
    )
    inner = mask[box]
    background, _ = ndi.label(~inner, structure=_PLANE)
    edge = np.unique(
        np.concatenate(
            [
                background[:, 0, :].ravel(),
                background[:, -1, :].ravel(),
                background[:, :, 0].ravel(),
                background[:, :, -1].ravel(),
            ]
        )
    )
    outside = np.zeros(int(background.max()) + 1, dtype=bool)
    outside[edge] = True
    if math.isfinite(max_hole_pixels):
        outside |= np.bincount(background.ravel(), minlength=outside.size) > max_hole_pixels
    outside[0] = False
    filled = mask.copy()
    filled[box] = ~outside[background]
    return filled
