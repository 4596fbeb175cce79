"""Where a 3D network's training patches come from, and how a case is cut into them.

A whole CT does not fit a 3D network in training, so it learns from patches: boxes of
(slices, rows, columns) voxels. Drawn uniformly, most patches of a thorax hold body wall and air and
few hold the oesophagus or the spinal cord, so :class:`PatchSampler` centres a share of them
(``FOREGROUND_FRACTION``) on a voxel of one structure, chosen uniformly among the structures the case
holds (nnU-Net's oversampling, by class): a small structure is then met about as often as a large
one. Validation cuts each case into a tiling (``tile_starts``) instead, so that its loss covers every
voxel and does not depend on a draw.

Plain numpy, no torch: what is done with a patch (augmentation, the loss) is the trainer's business.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

FOREGROUND_FRACTION = 0.5  # of the patches, centred on a structure; the rest anywhere in the case
FOREGROUND_SAMPLES = 10_000  # voxels kept per structure and case to centre patches on (bounded memory)

Box = tuple[int, int, int]


class PatchSampler:
    """Random patch positions in a set of labelled volumes.

    ``ranges[i]`` is the half-open slice range of volume ``i`` where its labels are defined: patch
    centres lie there (a patch may reach beyond it; the trainer ignores those voxels). Volumes with an
    empty range are never drawn. ``structures`` are the label values a patch may be centred on.
    """

    def __init__(
        self,
        labels: Sequence[np.ndarray],
        ranges: Sequence[tuple[int, int]],
        structures: Sequence[int],
        patch: Box,
        rng: np.random.Generator,
    ) -> None:
        self.patch = patch
        self.cases = [i for i, (start, stop) in enumerate(ranges) if stop > start]
        if not self.cases:
            raise ValueError("no training case has a slice where every structure's reference is defined")
        self.shapes = [tuple(a.shape) for a in labels]
        self.ranges = list(ranges)
        self.foreground = [_foreground(a, r, structures, rng) for a, r in zip(labels, ranges, strict=True)]

    def patches_per_epoch(self) -> int:
        """As many patches as hold the defined voxels once: an epoch sees about as much of the data
        as a 2D epoch, which shows every slice once."""
        voxels = sum(
            (self.ranges[i][1] - self.ranges[i][0]) * self.shapes[i][1] * self.shapes[i][2]
            for i in self.cases
        )
        return max(1, math.ceil(voxels / math.prod(self.patch)))

    def draw(self, rng: np.random.Generator) -> tuple[int, Box]:
        """A case index and the start of a patch inside it (inside the volume wherever it fits)."""
        i = self.cases[int(rng.integers(len(self.cases)))]
        shape, (z0, z1), found = self.shapes[i], self.ranges[i], self.foreground[i]
        if found and rng.random() < FOREGROUND_FRACTION:
            voxels = found[sorted(found)[int(rng.integers(len(found)))]]
            flat = int(voxels[int(rng.integers(len(voxels)))])
            centre = tuple(int(c) for c in np.unravel_index(flat, shape))
        else:
            centre = (int(rng.integers(z0, z1)), int(rng.integers(shape[1])), int(rng.integers(shape[2])))
        start = tuple(
            min(max(c - p // 2, 0), max(n - p, 0)) for c, p, n in zip(centre, self.patch, shape, strict=True)
        )
        return i, (start[0], start[1], start[2])


def _foreground(
    labels: np.ndarray, z_range: tuple[int, int], structures: Sequence[int], rng: np.random.Generator
) -> dict[int, np.ndarray]:
    """For each structure the volume holds inside ``z_range``: flat indices of (at most
    ``FOREGROUND_SAMPLES`` of) its voxels, drawn at random."""
    z0, z1 = z_range
    offset = z0 * labels.shape[1] * labels.shape[2]
    found: dict[int, np.ndarray] = {}
    for label in structures:
        flat = np.flatnonzero(labels[z0:z1] == label)
        if flat.size > FOREGROUND_SAMPLES:
            flat = flat[rng.choice(flat.size, FOREGROUND_SAMPLES, replace=False)]
        if flat.size:
            found[label] = flat + offset
    return found


def crop_box(a: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """The box of ``size`` at ``start`` (which may lie partly outside ``a``), ``fill`` where it does."""
    out = np.full(tuple(size), fill, dtype=a.dtype)
    src = tuple(slice(max(s, 0), min(s + n, dim)) for s, n, dim in zip(start, size, a.shape, strict=True))
    if all(part.stop > part.start for part in src):
        dst = tuple(slice(part.start - s, part.stop - s) for part, s in zip(src, start, strict=True))
        out[dst] = a[src]
    return out


def tile_starts(n: int, p: int) -> list[int]:
    """Starts of patches of length ``p`` covering ``n`` voxels: the last one ends at ``n`` (overlapping
    its neighbour), so no patch sees padding unless the case is shorter than a patch."""
    if n <= p:
        return [0]
    starts = list(range(0, n - p + 1, p))
    if starts[-1] != n - p:
        starts.append(n - p)
    return starts
