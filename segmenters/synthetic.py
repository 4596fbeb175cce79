"""A synthetic thoracic CT: a demo phantom, not a patient, made in code from a seed.

It serves the tests (known labels to score segmenters against), the demo (a series with no patient
data anywhere) and the training of a small demo model; nothing made from it is fit for clinical use.
Arrays are indexed (slice, row, column) for a head-first supine axial scan (slices foot to head,
rows anterior to posterior, columns patient right to left); the anatomy (torso, lungs with vessels,
heart, airways, oesophagus, aorta, spine and cord, ribs, sternum, upper abdomen, a couch) is laid
out in millimetres with plausible CT numbers and varies with the seed. Labels follow
``THORAX_STRUCTURES`` as radiotherapy contours do; volume_files.py writes phantoms as NIfTI or DICOM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage as ndi

from segmenters.anatomy import structure
from segmenters.base import Structure, Volume

BODY, RIGHT_LUNG, LEFT_LUNG, HEART, ESOPHAGUS, SPINAL_CORD, AIRWAY = 1, 2, 3, 4, 5, 6, 7

THORAX_STRUCTURES: tuple[Structure, ...] = (
    structure(BODY, "body"),
    structure(RIGHT_LUNG, "right_lung"),
    structure(LEFT_LUNG, "left_lung"),
    structure(HEART, "heart"),
    structure(ESOPHAGUS, "esophagus"),
    structure(SPINAL_CORD, "spinal_cord"),
    structure(AIRWAY, "airways"),
)

# CT numbers (HU) of the tissues.
AIR_HU = -1000.0
FAT_HU = -100.0
MEDIASTINAL_FAT_HU = -90.0
MUSCLE_HU = 40.0
LUNG_HU = -850.0
LUNG_GRADIENT_HU = 35.0  # denser posteriorly (dependent lung): +- this from front to back
VESSEL_HU = 40.0
MYOCARDIUM_HU = 35.0
BLOOD_HU = 50.0
AORTA_HU = 45.0
AIRWAY_WALL_HU = 70.0
CSF_HU = 10.0
CORD_HU = 30.0
CORTICAL_BONE_HU = 700.0
CANCELLOUS_BONE_HU = 250.0
DISC_HU = 90.0
RIB_HU = 550.0
STERNUM_HU = 400.0
LIVER_HU = 58.0
ABDOMEN_HU = 38.0
TABLE_SHELL_HU = 250.0
TABLE_CORE_HU = -950.0
MIN_HU, MAX_HU = -1024, 3071  # what a 12-bit CT stores
DEFAULT_NOISE_HU = 15.0
MAX_VARIATION = 2.0

# The mild in-plane smoothing: [1, 2, 1] / 4 along rows and columns. It scales white noise's
# standard deviation by 0.375 (sqrt(0.375) per axis), so the noise is drawn that much larger.
_SMOOTH = np.array([0.25, 0.5, 0.25], dtype=np.float32)
_SMOOTH_NOISE_GAIN = 0.375


@dataclass(frozen=True, eq=False)
class Phantom:
    """A synthetic thoracic CT (demo phantom) and its labels, indexed (slice, row, column).

    ``spacing`` is (between slices, rows, columns) in mm and ``origin`` the patient position (DICOM
    LPS, mm) of the centre of voxel (0, 0, 0); the axes are those of a plain axial scan (see
    ``Volume.axes_lps``'s default).
    """

    hu: np.ndarray  # int16, Hounsfield units
    labels: np.ndarray  # uint8, values of ``structures``
    spacing: tuple[float, float, float]
    seed: int
    origin: tuple[float, float, float]
    structures: tuple[Structure, ...] = field(default=THORAX_STRUCTURES)

    def volume(self) -> Volume:
        """The CT as a segmenter sees it."""
        return Volume(hu=self.hu, spacing=self.spacing)

    @property
    def label_names(self) -> dict[int, str]:
        """Label value -> structure name (what ``segmenters.metrics.score_case`` takes)."""
        return {s.label: s.name for s in self.structures}


# --- anatomy ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Anatomy:
    """The sizes and positions (mm) one seed draws. x to the patient's left, y posterior, z
    superior, from the centre of the scan."""

    torso_a: float  # half-width of the torso
    torso_b: float  # half-depth (anterior-posterior)
    torso_y: float  # centre of the torso ellipse
    fat: float  # subcutaneous fat thickness
    wall: float  # chest wall (muscle, ribs) inside the fat
    back_wall: float  # extra thickness of the posterior wall (back muscles)
    apex_z: float  # lung apices
    dome_r: float  # top of the right hemidiaphragm
    dome_l: float  # top of the left hemidiaphragm
    carina_z: float
    trachea_r: float  # lumen radius
    trachea_x: float
    heart_a: float  # heart ellipsoid: long in-plane, short in-plane, cranio-caudal radii
    heart_b: float
    heart_c: float
    heart_x: float
    heart_angle: float  # radians: the long axis turns from the x axis towards anterior
    aorta_r: float
    spine_a: float  # vertebral body half-width
    spine_b: float  # and half-depth
    lung_shift: float  # offset of the lung CT numbers
    eso_a: float  # oesophagus half-width
    eso_b: float  # and half-depth
    eso_bubble: bool


def _draw_anatomy(rng: np.random.Generator, variation: float) -> _Anatomy:
    def vary(nominal: float, spread: float) -> float:
        return float(nominal + variation * spread * rng.uniform(-1.0, 1.0))

    dome_r = vary(-65.0, 10.0)
    return _Anatomy(
        torso_a=vary(165.0, 15.0),
        torso_b=vary(118.0, 10.0),
        torso_y=vary(-12.0, 4.0),
        fat=vary(14.0, 6.0),
        wall=vary(12.0, 2.0),
        back_wall=vary(12.0, 3.0),
        apex_z=vary(128.0, 10.0),
        dome_r=dome_r,
        dome_l=dome_r - 12.0 + vary(0.0, 5.0),
        carina_z=vary(45.0, 8.0),
        trachea_r=vary(8.5, 1.5),
        trachea_x=vary(0.0, 3.0),
        heart_a=vary(65.0, 6.0),
        heart_b=vary(38.0, 4.0),
        heart_c=vary(55.0, 6.0),
        heart_x=vary(25.0, 6.0),
        heart_angle=math.radians(vary(30.0, 8.0)),
        aorta_r=vary(12.0, 1.5),
        spine_a=vary(18.0, 2.0),
        spine_b=vary(15.0, 1.5),
        lung_shift=vary(0.0, 20.0),
        eso_a=vary(9.0, 1.5),
        eso_b=vary(6.0, 1.0),
        eso_bubble=bool(rng.random() < 0.6),
    )


Box = tuple[slice, slice, slice]
AlongZ = float | Callable[[np.ndarray], np.ndarray]  # a number, or a function of z (mm)


class _Canvas:
    """The CT numbers and labels being painted, with the grid's coordinates in mm (z, y, x from
    the centre of the scan)."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
        self.shape = shape
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.start = -(np.asarray(shape, dtype=np.float64) - 1.0) / 2.0 * self.spacing  # mm of voxel 0
        self.axes = [
            (self.start[i] + np.arange(shape[i]) * self.spacing[i]).astype(np.float32) for i in range(3)
        ]
        self.hu = np.full(shape, AIR_HU, dtype=np.int16)
        self.labels = np.zeros(shape, dtype=np.uint8)

    def box(self, z: tuple[float, float], y: tuple[float, float], x: tuple[float, float]) -> Box | None:
        """The voxels whose centres lie in a box given in mm, or None when none do."""
        out = []
        for axis, (lo, hi) in enumerate((z, y, x)):
            n = self.shape[axis]
            first = int(np.clip(np.ceil((lo - self.start[axis]) / self.spacing[axis]), 0, n))
            stop = int(np.clip(np.floor((hi - self.start[axis]) / self.spacing[axis]) + 1, 0, n))
            if first >= stop:
                return None
            out.append(slice(first, stop))
        return out[0], out[1], out[2]

    def coords(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """z, y, x in mm of a box, shaped to broadcast to it."""
        return (
            self.axes[0][box[0]].reshape(-1, 1, 1),
            self.axes[1][box[1]].reshape(1, -1, 1),
            self.axes[2][box[2]].reshape(1, 1, -1),
        )

    def paint(
        self,
        box: Box,
        mask: np.ndarray,
        hu: float | np.ndarray,
        label: int | None = None,
        where: Sequence[int] | None = None,
    ) -> None:
        """Set the CT number (a value, or an array broadcast to the box) and optionally the label
        of the box's voxels in ``mask``; with ``where``, only of voxels now labelled one of those."""
        labels = self.labels[box]
        mask = np.broadcast_to(mask, labels.shape)
        if where is not None:
            mask = mask & _lookup(where)[labels]
        values = self.hu[box]
        if isinstance(hu, np.ndarray):
            values[mask] = np.rint(np.broadcast_to(hu, labels.shape)[mask])
        else:
            values[mask] = round(hu)
        if label is not None:
            labels[mask] = label

    def paint_flat(
        self, index: np.ndarray, hu: float, label: int | None = None, where: Sequence[int] | None = None
    ) -> None:
        """``paint`` for flat voxel indices (from ``stamp`` or ``discs``)."""
        labels = self.labels.reshape(-1)
        if where is not None:
            index = index[_lookup(where)[labels[index]]]
        self.hu.reshape(-1)[index] = round(hu)
        if label is not None:
            labels[index] = label

    def stamp(self, points: np.ndarray, radii: np.ndarray) -> np.ndarray:
        """Flat indices of the voxels whose centres lie in any of the axis-aligned
        ellipsoids at ``points`` (n, 3: z, y, x mm) with ``radii`` (n, 3 or 3, mm), and of each
        point's nearest voxel, so that a vessel thinner than a voxel stays visible. A row of
        ellipsoids makes a tube in any direction."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), points.shape)
        centre = (points - self.start) / self.spacing  # fractional voxel index
        reach = np.ceil(radii / self.spacing + 0.5).astype(np.int64)
        shape = np.asarray(self.shape)
        near = ((centre + reach >= 0) & (centre - reach <= shape - 1)).all(axis=1)
        centre, radii, reach = centre[near], radii[near], reach[near]
        hits: list[np.ndarray] = []
        groups, group_of = np.unique(reach, axis=0, return_inverse=True)
        for g, (rz, ry, rx) in enumerate(groups):
            offsets = [np.arange(-r, r + 1) for r in (rz, ry, rx)]
            members = np.flatnonzero(group_of.ravel() == g)
            chunk = max(1, 4_000_000 // ((2 * rz + 1) * (2 * ry + 1) * (2 * rx + 1)))
            for first in range(0, members.size, chunk):
                sel = members[first : first + chunk]
                nearest = np.rint(centre[sel]).astype(np.int64)
                # Squared distance along each axis in units of the radius: a separable sum.
                d2 = [
                    (
                        ((nearest[:, i, None] + offsets[i]) - centre[sel, i, None])
                        * self.spacing[i]
                        / radii[sel, i, None]
                    )
                    ** 2
                    for i in range(3)
                ]
                inside = d2[0][:, :, None, None] + d2[1][:, None, :, None] + d2[2][:, None, None, :] <= 1.0
                inside[:, rz, ry, rx] = True
                p, iz, iy, ix = np.nonzero(inside)
                hits.append(
                    np.stack(
                        [
                            nearest[p, 0] + offsets[0][iz],
                            nearest[p, 1] + offsets[1][iy],
                            nearest[p, 2] + offsets[2][ix],
                        ],
                        axis=1,
                    )
                )
        return self._flat(np.concatenate(hits) if hits else np.zeros((0, 3), dtype=np.int64))

    def discs(self, points: np.ndarray, ry: float, rx: float) -> np.ndarray:
        """Flat indices of an elliptic cross-section (ry, rx mm) centred at each point (z, y, x mm)
        on the slice nearest to it: a tube along z, one slice at a time, exactly in-plane."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        ny, nx = self.shape[1], self.shape[2]
        k = np.rint((points[:, 0] - self.start[0]) / self.spacing[0]).astype(np.int64)
        inside = (k >= 0) & (k < self.shape[0])
        points, k = points[inside], k[inside]
        out = []
        # Slices sharing a centre share a cross-section: a straight tube is one 2D mask.
        centres, group_of = np.unique(points[:, 1:], axis=0, return_inverse=True)
        for g, (y, x) in enumerate(centres):
            box = self.box((-math.inf, math.inf), (y - ry, y + ry), (x - rx, x + rx))
            if box is None:
                continue
            yy = self.axes[1][box[1]].reshape(-1, 1) - y
            xx = self.axes[2][box[2]].reshape(1, -1) - x
            rows, cols = np.nonzero((yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0)
            in_plane = (rows + box[1].start) * nx + (cols + box[2].start)
            slices = k[group_of.ravel() == g]
            out.append((slices[:, None] * (ny * nx) + in_plane[None, :]).ravel())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _flat(self, index: np.ndarray) -> np.ndarray:
        """Flat indices of the (z, y, x) voxel indices that lie inside the grid. Overlapping
        ellipsoids repeat voxels; painting twice is harmless and cheaper than removing them."""
        ok = ((index >= 0) & (index < np.asarray(self.shape))).all(axis=1)
        return np.ravel_multi_index(tuple(index[ok].T), self.shape)


def _lookup(values: Sequence[int]) -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    table[list(values)] = True
    return table


def _tube(vertices: ArrayLike, radii: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Points and radii along a polyline (z, y, x mm) whose radius goes linearly from vertex to
    vertex, spaced half a radius apart so that the spheres merge into a smooth tube."""
    v = np.asarray(vertices, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64)
    points, sizes = [v[:1]], [r[:1]]
    for i in range(len(v) - 1):
        length = float(np.linalg.norm(v[i + 1] - v[i]))
        steps = max(1, math.ceil(length / max(0.25, 0.5 * min(r[i], r[i + 1]))))
        t = np.arange(1, steps + 1, dtype=np.float64)[:, None] / steps
        points.append(v[i] + t * (v[i + 1] - v[i]))
        sizes.append(r[i] + t[:, 0] * (r[i + 1] - r[i]))
    return np.concatenate(points), np.concatenate(sizes)


def _vertical(canvas: _Canvas, z_lo: float, z_hi: float, y: AlongZ, x: AlongZ) -> np.ndarray:
    """Centres (n, 3: z, y, x mm) of a tube along z on the slices in [z_lo, z_hi]; ``y`` and ``x``
    are numbers or functions of z."""
    z = canvas.axes[0].astype(np.float64)
    z = z[(z >= z_lo) & (z <= z_hi)]
    ys = y(z) if callable(y) else np.full(z.shape, float(y))
    xs = x(z) if callable(x) else np.full(z.shape, float(x))
    return np.stack([z, ys, xs], axis=1)


def _unit(v: Sequence[float] | np.ndarray) -> np.ndarray:
    u = np.asarray(v, dtype=np.float64)
    return np.asarray(u / np.linalg.norm(u))


def _ellipse_half_width(half_x: np.ndarray | float, half_y: float, dy: np.ndarray) -> np.ndarray:
    """Half-width along x of an ellipse at offsets ``dy`` from its centre (-1 outside it): a voxel
    is inside when |x| <= this, one comparison per voxel instead of an ellipse equation."""
    q = 1.0 - (dy / np.float32(half_y)) ** 2
    return np.where(q >= 0.0, half_x * np.sqrt(np.maximum(q, 0.0)), np.float32(-1.0)).astype(np.float32)


def make_phantom(
    shape: tuple[int, int, int] = (64, 128, 128),
    spacing: tuple[float, float, float] = (5.0, 3.0, 3.0),
    seed: int = 0,
    variation: float = 1.0,
    noise_hu: float = DEFAULT_NOISE_HU,
) -> Phantom:
    """A synthetic thoracic CT (demo phantom) of ``shape`` (slices, rows, columns) and ``spacing``
    (mm, same order), drawn from ``seed``: the same arguments give the same phantom.

    ``variation`` scales the anatomical variation between seeds: 0 gives every seed the nominal
    anatomy (vessels, the oesophageal bubble and the noise still differ), 1 the plausible adult
    range, up to ``MAX_VARIATION`` wider still (beyond, sizes would turn negative). ``noise_hu``
    is the standard deviation of the image noise after smoothing.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape is (slices, rows, columns), each at least 1; got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing is three positive mm values; got {spacing}")
    if not 0.0 <= variation <= MAX_VARIATION:
        raise ValueError(f"variation is between 0 and {MAX_VARIATION}; got {variation}")
    if noise_hu < 0:
        raise ValueError(f"noise_hu must not be negative; got {noise_hu}")
    grid = (int(shape[0]), int(shape[1]), int(shape[2]))
    mm = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    rng = np.random.default_rng(seed)
    anatomy = _draw_anatomy(rng, variation)
    canvas = _Canvas(grid, mm)
    _paint_anatomy(canvas, anatomy, rng)
    _add_noise_and_smooth(canvas.hu, rng, noise_hu)
    start = canvas.start
    return Phantom(
        hu=canvas.hu,
        labels=canvas.labels,
        spacing=mm,
        seed=seed,
        origin=(float(start[2]), float(start[1]), float(start[0])),
    )


# --- anatomy, structure by structure -----------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Positions (mm) that follow from an anatomy: where the walls, spine and tubes lie."""

    back: float  # posterior skin (the back lies flat on the couch)
    cavity_front: float
    cavity_back: float
    canal_y: float
    spine_y: float  # centre of the vertebral bodies
    trachea_y: float  # at the carina
    eso_y: float
    aorta_x: float
    aorta_y: float
    arch_z: float
    heart_y: float
    heart_z: float

    @property
    def cavity_y(self) -> float:
        return 0.5 * (self.cavity_front + self.cavity_back)

    @property
    def cavity_b(self) -> float:
        return 0.5 * (self.cavity_back - self.cavity_front)


def _layout(a: _Anatomy) -> _Layout:
    back = a.torso_y + 0.93 * a.torso_b
    cavity_front = a.torso_y - a.torso_b + a.fat + a.wall
    canal_y = back - a.fat - 38.0
    spine_y = canal_y - 9.0 - a.spine_b
    eso_y = spine_y - a.spine_b - a.eso_b - 1.5
    trachea_y = eso_y - a.eso_b - 3.0 - a.trachea_r - 2.0
    # The heart lies against the front wall, clear of the oesophagus behind it (which wins when
    # a large heart in a shallow chest cannot have both).
    cos, sin = math.cos(a.heart_angle), math.sin(a.heart_angle)
    heart_depth = math.hypot(a.heart_a * sin, a.heart_b * cos)  # half its extent along y
    heart_y = min(cavity_front + heart_depth + 2.0, eso_y - a.eso_b - 3.0 - heart_depth)
    return _Layout(
        back=back,
        cavity_front=cavity_front,
        cavity_back=back - a.fat - a.wall - a.back_wall,
        canal_y=canal_y,
        spine_y=spine_y,
        trachea_y=trachea_y,
        eso_y=eso_y,
        aorta_x=a.eso_a + a.aorta_r + 8.0,
        aorta_y=spine_y - 8.0,
        arch_z=a.carina_z + 20.0,
        heart_y=heart_y,
        heart_z=a.dome_l + 0.75 * a.heart_c,
    )


def _torso_a(a: _Anatomy, z: np.ndarray) -> np.ndarray:
    """Half-width of the torso along z: the upper chest is a little narrower."""
    narrowing = np.clip((z - (a.apex_z - 60.0)) / 100.0, 0.0, 1.0)
    return np.asarray(a.torso_a * (1.0 - 0.08 * narrowing), dtype=np.float32)


def _diaphragm(a: _Anatomy, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Height (z mm) of the diaphragm at (y, x): two domes, highest in front of the middle of each
    side, falling to the deep posterior and lateral recesses."""
    curvature = 0.010
    dy = y + 30.0
    dy2 = np.where(dy > 0.0, 0.8 * dy, 0.45 * dy) ** 2  # the posterior recesses are the deepest
    right = a.dome_r - curvature * ((x + 60.0) ** 2 + dy2)
    left = a.dome_l - curvature * ((x - 60.0) ** 2 + dy2)
    return np.asarray(np.maximum(right, left), dtype=np.float32)


def _mediastinum_half_width(lay: _Layout, y: np.ndarray) -> np.ndarray:
    """Half-width (mm) of the mediastinum between the lungs: narrow in front (the lungs nearly meet
    behind the sternum), wider towards the spine."""
    share = np.clip((y - lay.cavity_front) / (lay.spine_y - lay.cavity_front), 0.0, 1.0)
    return np.asarray(12.0 + 16.0 * share, dtype=np.float32)


_LUNGS = (RIGHT_LUNG, LEFT_LUNG)


def _paint_anatomy(canvas: _Canvas, a: _Anatomy, rng: np.random.Generator) -> None:
    lay = _layout(a)
    _paint_torso(canvas, a, lay)
    _paint_lungs(canvas, a, lay)
    _carve_mediastinum(canvas, a, lay)
    _paint_aorta(canvas, a, lay)
    _paint_heart(canvas, a, lay)
    _paint_esophagus(canvas, a, lay, rng)
    _paint_airways(canvas, a, lay)
    _paint_spine(canvas, a, lay)
    _paint_ribs(canvas, a, lay)
    _paint_vessels(canvas, a, lay, rng)
    _paint_table(canvas, lay)


def _paint_torso(canvas: _Canvas, a: _Anatomy, lay: _Layout) -> None:
    """Body outline with its fat rim and the muscle inside, and what fills the chest cavity: fat in
    the mediastinum, the diaphragm, liver and stomach (with gas) below it, muscle beside the spine."""
    wide = float(_torso_a(a, canvas.axes[0]).max())
    box = canvas.box((-math.inf, math.inf), (a.torso_y - a.torso_b, lay.back), (-wide, wide))
    if box is None:
        return
    z, y, x = canvas.coords(box)
    half = _torso_a(a, z)
    dy = y - np.float32(a.torso_y)
    ax = np.abs(x)
    canvas.paint(box, (ax <= _ellipse_half_width(half, a.torso_b, dy)) & (y <= lay.back), FAT_HU, BODY)
    inner = ax <= _ellipse_half_width(half - a.fat, a.torso_b - a.fat, dy)
    canvas.paint(box, inner & (y <= lay.back - a.fat), MUSCLE_HU)

    box = canvas.box((-math.inf, math.inf), (lay.cavity_front, lay.cavity_back), (-wide, wide))
    if box is None:
        return
    z, y, x = canvas.coords(box)
    ax = np.abs(x)
    cavity = ax <= _ellipse_half_width(_torso_a(a, z) - a.fat - a.wall, lay.cavity_b, y - lay.cavity_y)
    floor = _diaphragm(a, y, x)
    canvas.paint(box, cavity & (z > floor), MEDIASTINAL_FAT_HU)
    canvas.paint(box, cavity & (z <= floor), MUSCLE_HU)  # the diaphragm, 5 mm thick
    below = cavity & (z <= floor - 5.0)
    canvas.paint(box, below & (x < 20.0), LIVER_HU)
    canvas.paint(box, below & (x >= 20.0), ABDOMEN_HU)
    canvas.paint(box, cavity & (ax < a.spine_a + 10.0) & (y > lay.spine_y), MUSCLE_HU)
    # Gas in the stomach under the left dome, anterior: it rises in a supine patient.
    gas = np.array([[a.dome_l - 35.0, -45.0, 55.0]])
    canvas.paint_flat(canvas.stamp(gas, np.array([14.0, 14.0, 25.0])), AIR_HU, where=(BODY,))


def _paint_lungs(canvas: _Canvas, a: _Anatomy, lay: _Layout) -> None:
    """Each lung: the chest cavity on its side of the mediastinum, above the diaphragm and below a
    domed apex, denser posteriorly (the dependent lung)."""
    wide = float(_torso_a(a, canvas.axes[0]).max())
    for label, side in ((RIGHT_LUNG, -1.0), (LEFT_LUNG, 1.0)):
        x_range = (-wide, -12.0) if side < 0 else (12.0, wide)
        box = canvas.box((-math.inf, a.apex_z), (lay.cavity_front, lay.cavity_back), x_range)
        if box is None:
            continue
        z, y, x = canvas.coords(box)
        width = _ellipse_half_width(_torso_a(a, z) - a.fat - a.wall, lay.cavity_b, y - lay.cavity_y)
        beside = (np.abs(x) <= width) & (side * x > _mediastinum_half_width(lay, y))
        apex = a.apex_z - 0.02 * ((x - side * 55.0) ** 2 + (y - lay.cavity_y - 15.0) ** 2)
        lung = beside & (z > _diaphragm(a, y, x)) & (z < apex)
        hu = LUNG_HU + a.lung_shift + LUNG_GRADIENT_HU * (y - lay.cavity_y) / lay.cavity_b
        canvas.paint(box, lung, hu, label)


def _carve_mediastinum(canvas: _Canvas, a: _Anatomy, lay: _Layout) -> None:
    """Keep the lungs a few mm off what lies between them: the fat round the heart, the aorta, the
    trachea and oesophagus, and the spine with the muscles beside it."""
    _paint_heart(canvas, a, lay, margin=6.0)
    trachea = _vertical(canvas, a.carina_z, math.inf, _trachea_y(a, lay), a.trachea_x)
    points, radii = _aorta(a, lay)
    carve = [
        canvas.discs(trachea, a.trachea_r + 6.0, a.trachea_r + 6.0),
        canvas.discs(_esophagus_points(canvas, a, lay), a.eso_b + 4.0, a.eso_a + 4.0),
        canvas.discs(
            _vertical(canvas, -math.inf, math.inf, lay.spine_y, 0.0), a.spine_b + 6.0, a.spine_a + 6.0
        ),
        canvas.stamp(points, radii[:, None] + 4.0),
    ]
    for index in carve:
        canvas.paint_flat(index, MEDIASTINAL_FAT_HU, BODY, where=_LUNGS)
    box = canvas.box(
        (-math.inf, math.inf), (lay.spine_y, lay.cavity_back), (-a.spine_a - 10.0, a.spine_a + 10.0)
    )
    if box is not None:
        canvas.paint(box, np.ones((1, 1, 1), dtype=bool), MUSCLE_HU, BODY, where=_LUNGS)


def _trachea_y(a: _Anatomy, lay: _Layout) -> Callable[[np.ndarray], np.ndarray]:
    """The trachea's y along z: it runs a little anterior towards the neck."""
    return lambda z: lay.trachea_y - 0.12 * (z - a.carina_z)


def _aorta(a: _Anatomy, lay: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """Ascending aorta from the heart's base, the arch over the left main bronchus (left of the
    trachea) and the descending aorta left of the spine: tube points (z, y, x) and radii."""
    ty, r = lay.trachea_y, a.aorta_r
    vertices = [
        (lay.heart_z + 0.4 * a.heart_c, lay.heart_y + 25.0, 0.0),
        (lay.arch_z - 5.0, ty - a.trachea_r - r - 6.0, -2.0),
        (lay.arch_z + 6.0, ty - 14.0, 16.0),
        (lay.arch_z + 4.0, ty + 6.0, lay.aorta_x + 1.0),
        (lay.arch_z - 8.0, lay.aorta_y, lay.aorta_x),
        (-400.0, lay.aorta_y, lay.aorta_x),
    ]
    return _tube(vertices, [r + 1.5, r + 1.0, r, r, r - 0.5, r - 1.5])


def _paint_aorta(canvas: _Canvas, a: _Anatomy, lay: _Layout) -> None:
    points, radii = _aorta(a, lay)
    canvas.paint_flat(canvas.stamp(points, radii[:, None]), AORTA_HU, BODY)


def _paint_heart(canvas: _Canvas, a: _Anatomy, lay: _Layout, margin: float | None = None) -> None:
    """The heart: an ellipsoid anterior-left on the diaphragm, its long axis turned to the left and
    forwards, with a brighter blood pool. With ``margin``, only the fat that many mm around it is
    carved out of the lungs."""
    grow = margin or 0.0
    ra, rb, rc = a.heart_a + grow, a.heart_b + grow, a.heart_c + grow
    box = canvas.box(
        (lay.heart_z - rc, lay.heart_z + rc),
        (lay.heart_y - ra, lay.heart_y + ra),
        (a.heart_x - ra, a.heart_x + ra),
    )
    if box is None:
        return
    z, y, x = canvas.coords(box)
    cos, sin = np.float32(math.cos(a.heart_angle)), np.float32(math.sin(a.heart_angle))
    dx, dy = x - np.float32(a.heart_x), y - np.float32(lay.heart_y)
    along = dx * cos - dy * sin
    across = dx * sin + dy * cos
    r2 = (along / ra) ** 2 + (across / rb) ** 2 + ((z - lay.heart_z) / rc) ** 2
    if margin is not None:
        canvas.paint(box, r2 <= 1.0, MEDIASTINAL_FAT_HU, BODY, where=_LUNGS)
        return
    canvas.paint(box, r2 <= 1.0, MYOCARDIUM_HU, HEART)
    canvas.paint(box, r2 <= 0.72**2, BLOOD_HU)


def _esophagus_points(canvas: _Canvas, a: _Anatomy, lay: _Layout) -> np.ndarray:
    """Centres of the oesophagus per slice: in front of the spine behind the trachea, slightly
    left; below the carina it moves left to pass the diaphragm into the stomach."""
    return _vertical(
        canvas,
        a.dome_l - 25.0,
        math.inf,
        lambda z: lay.eso_y - np.minimum(4.0, 0.04 * np.clip(a.carina_z - z, 0.0, None)),
        lambda z: 4.0 + np.minimum(24.0, 0.2 * np.clip(a.carina_z - z, 0.0, None)),
    )


def _paint_esophagus(canvas: _Canvas, a: _Anatomy, lay: _Layout, rng: np.random.Generator) -> None:
    points = _esophagus_points(canvas, a, lay)
    canvas.paint_flat(canvas.discs(points, a.eso_b, a.eso_a), MUSCLE_HU, ESOPHAGUS)
    bubble_z = a.carina_z + rng.uniform(-40.0, 20.0)
    if a.eso_bubble and len(points):
        centre = points[np.argmin(np.abs(points[:, 0] - bubble_z))]
        bubble = canvas.stamp(centre[None, :], np.array([4.0, 2.0, 2.5]))
        canvas.paint_flat(bubble, AIR_HU, where=(ESOPHAGUS,))


def _paint_airways(canvas: _Canvas, a: _Anatomy, lay: _Layout) -> None:
    """The trachea (lumen and wall) from the top of the scan to the carina, then the main bronchi,
    two lobar bronchi each, whose lumen opens into the lung."""
    trachea = _vertical(canvas, a.carina_z, math.inf, _trachea_y(a, lay), a.trachea_x)
    canvas.paint_flat(canvas.discs(trachea, a.trachea_r + 2.0, a.trachea_r + 2.0), AIRWAY_WALL_HU, BODY)
    lumen = [canvas.discs(trachea, a.trachea_r, a.trachea_r)]
    walls = []
    carina = np.array([a.carina_z, lay.trachea_y, a.trachea_x])
    r = a.trachea_r
    for side, angle, length in ((-1.0, 35.0, 42.0), (1.0, 50.0, 52.0)):
        t = math.radians(angle)
        end = carina + length * _unit((-math.cos(t), 0.2, side * math.sin(t)))
        for path, radii in (
            ([carina, end], [0.8 * r, 0.7 * r]),
            ([end, end + 28.0 * _unit((-0.9, 0.3, side * 0.35))], [0.55 * r, 0.4 * r]),  # lower lobe
            ([end, end + 24.0 * _unit((0.4, 0.0, side * 0.95))], [0.5 * r, 0.4 * r]),  # upper lobe
        ):
            points, sizes = _tube(path, radii)
            walls.append(canvas.stamp(points, sizes[:, None] + 1.8))
            lumen.append(canvas.stamp(points, sizes[:, None]))
    for index in walls:
        canvas.paint_flat(index, AIRWAY_WALL_HU, where=(BODY,))
    for index in lumen:
        canvas.paint_flat(index, AIR_HU, AIRWAY, where=(BODY, AIRWAY, *_LUNGS))


def _paint_spine(canvas: _Canvas, a: _Anatomy, lay: _Layout) -> None:
    """Vertebral bodies (cortex, cancellous bone, discs between), the bony ring round the canal
    with spinous and transverse processes, the canal's CSF and the spinal cord."""
    column = _vertical(canvas, -math.inf, math.inf, lay.spine_y, 0.0)
    disc = np.mod(column[:, 0], 26.0) < 6.0
    bone, soft = column[~disc], column[disc]
    canvas.paint_flat(canvas.discs(bone, a.spine_b, a.spine_a), CORTICAL_BONE_HU, BODY)
    canvas.paint_flat(canvas.discs(bone, a.spine_b - 2.5, a.spine_a - 2.5), CANCELLOUS_BONE_HU, BODY)
    canvas.paint_flat(canvas.discs(soft, a.spine_b, a.spine_a), DISC_HU, BODY)
    canal = _vertical(canvas, -math.inf, math.inf, lay.canal_y, 0.0)
    for dy, dx, ry, rx in ((18.0, 0.0, 8.0, 4.0), (-4.0, -24.0, 5.0, 9.0), (-4.0, 24.0, 5.0, 9.0)):
        process = canal + np.array([0.0, dy, dx])
        canvas.paint_flat(canvas.discs(process, ry, rx), 0.85 * CORTICAL_BONE_HU, BODY)
    canvas.paint_flat(canvas.discs(canal, 12.5, 14.0), CORTICAL_BONE_HU, BODY)
    canvas.paint_flat(canvas.discs(canal, 7.5, 9.0), CSF_HU, BODY)
    canvas.paint_flat(canvas.discs(canal, 4.0, 5.0), CORD_HU, SPINAL_CORD)


def _paint_ribs(canvas: _Canvas, a: _Anatomy, lay: _Layout) -> None:
    """Ribs in the chest wall, from beside the spine round towards the front, falling as they go,
    and the sternum in front. They only replace muscle and fat."""
    points, radii = [], []
    depth = a.fat + 6.0
    phi = np.linspace(0.16 * math.pi, 0.78 * math.pi, 24)  # from the back round to the front
    for side in (-1.0, 1.0):
        for i in range(12):
            z0 = a.apex_z - 10.0 - 24.0 * i
            half = float(_torso_a(a, np.array([z0]))[0]) - depth
            arc = np.stack(
                [
                    z0 - 80.0 * (phi - phi[0]) / (phi[-1] - phi[0]),
                    a.torso_y + (a.torso_b - depth) * np.cos(phi),
                    side * half * np.sin(phi),
                ],
                axis=1,
            )
            head = np.array([[z0 + 5.0, lay.canal_y - 4.0, side * 28.0]])
            p, r = _tube(np.concatenate([head, arc]), [3.2] * (len(arc) + 1))
            points.append(p)
            radii.append(r)
    shape = np.concatenate(radii)[:, None] * np.array([1.6, 1.0, 1.0])  # taller than thick
    canvas.paint_flat(canvas.stamp(np.concatenate(points), shape), RIB_HU, where=(BODY,))
    sternum = _vertical(
        canvas, lay.heart_z - 0.5 * a.heart_c, a.apex_z - 25.0, a.torso_y - a.torso_b + a.fat + 7.0, 0.0
    )
    canvas.paint_flat(canvas.discs(sternum, 5.0, 13.0), STERNUM_HU, where=(BODY,))


def _paint_vessels(canvas: _Canvas, a: _Anatomy, lay: _Layout, rng: np.random.Generator) -> None:
    """Pulmonary vessel trees: from each hilum, trunks run up and down (more down, to the larger
    lower lobes) and outwards, splitting in two four times, thinner each time. Painted only inside
    the lungs, where they stay part of the lung label."""
    points: list[np.ndarray] = []
    radii: list[np.ndarray] = []

    def grow(start: np.ndarray, direction: np.ndarray, length: float, radius: float, depth: int) -> None:
        vertices = [start]
        d = direction
        for _ in range(3):
            d = _unit(d + rng.normal(0.0, 0.15, 3))
            vertices.append(vertices[-1] + d * length / 3.0)
        p, r = _tube(vertices, np.linspace(radius, 0.85 * radius, len(vertices)))
        points.append(p)
        radii.append(r)
        if depth < 4:
            for _ in range(2):
                grow(vertices[-1], _unit(d + rng.normal(0.0, 0.5, 3)), 0.75 * length, 0.7 * radius, depth + 1)

    for side in (-1.0, 1.0):
        hilum = np.array([a.carina_z - 25.0 + rng.uniform(-5.0, 5.0), lay.trachea_y + 8.0, side * 30.0])
        for j in range(9):
            up = 1.0 if j < 3 else -1.0
            direction = _unit(
                (up * rng.uniform(0.5, 1.0), rng.uniform(-0.7, 0.7), side * rng.uniform(0.3, 0.9))
            )
            grow(hilum, direction, rng.uniform(35.0, 50.0), rng.uniform(3.5, 4.5), 0)
    index = canvas.stamp(np.concatenate(points), np.concatenate(radii)[:, None])
    canvas.paint_flat(index, VESSEL_HU, where=_LUNGS)


def _paint_table(canvas: _Canvas, lay: _Layout) -> None:
    """The CT couch below the patient, clear of the back: a curved shell round a foam core."""
    top = lay.back + 12.0
    box = canvas.box((-math.inf, math.inf), (top - 25.0, top + 45.0), (-230.0, 230.0))
    if box is None:
        return
    _, y, x = canvas.coords(box)
    depth = y - (top - 0.0004 * x**2)
    canvas.paint(box, (depth >= 0.0) & (depth < 40.0), TABLE_SHELL_HU, where=(0,))
    canvas.paint(box, (depth >= 3.0) & (depth < 37.0), TABLE_CORE_HU, where=(0,))


def _add_noise_and_smooth(hu: np.ndarray, rng: np.random.Generator, noise_hu: float) -> None:
    """Gaussian noise and the mild in-plane smoothing, in place, then whole CT numbers clipped as
    a scanner stores them. A slab at a time (everything is in-plane): small temporaries.

    The noise comes from a bank of a few slices' worth, each slice taking one at a random shift
    and sign: drawing 80 million normal numbers would cost more than all the anatomy.
    """
    n_slices, rows, cols = hu.shape
    sigma = noise_hu / _SMOOTH_NOISE_GAIN
    bank = (sigma * rng.standard_normal((min(n_slices, 8), rows, cols), dtype=np.float32)).astype(np.float32)
    picks = rng.integers(0, [len(bank), rows, cols, 2], size=(n_slices, 4))
    slab = 4
    for start in range(0, n_slices, slab):
        part = hu[start : start + slab].astype(np.float32)
        if noise_hu > 0:
            for i in range(part.shape[0]):
                b, dy, dx, flip = picks[start + i]
                noise = np.roll(bank[b], (int(dy), int(dx)), axis=(0, 1))
                part[i] += -noise if flip else noise
        part = ndi.correlate1d(part, _SMOOTH, axis=1, mode="nearest")
        part = ndi.correlate1d(part, _SMOOTH, axis=2, mode="nearest")
        np.clip(np.rint(part), MIN_HU, MAX_HU, out=part)
        hu[start : start + slab] = part
