"""How far the classical lungs lie from the shared thorax's clinical contours, and how much of that
gap is the contour's own edge rather than a region missed or added.

    .venv/bin/python -m benchmarks.lung_reference [--data FOLDER]

For each lung: Dice and HD95 over the whole volume; the Dice the prediction would have if every error
farther than 1 or 2 mm (in-plane) from its own edge were mended, which bounds what any boundary rule
can reach against this reference; and the reference's edge, slice by slice, as a signed offset from
the prediction's (mm, + outside), in runs of slices that share it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from segmenters import metrics
from segmenters.base import Volume
from segmenters.classical import LEFT_LUNG, RIGHT_LUNG, ClassicalSegmenter
from segmenters.datasets import load_cases
from tests.shared_data import THORAX

EDGE_MM = (1.0, 2.0)
OFFSET_WITHIN_MM = 3.0  # edge points farther apart than this are a regional error, not the edge's
MIN_SLICE_VOXELS = 3000  # slices where a lung is this small (apex, base) give no stable offset


def _in_plane_distance(mask: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Per slice, each voxel's in-plane distance (mm) to the nearest voxel outside ``mask``."""
    return np.stack([ndi.distance_transform_edt(s, sampling=pixel_mm) for s in mask])


def edge_offsets(pred: np.ndarray, ref: np.ndarray, pixel_mm: float) -> list[tuple[int, float]]:
    """(slice, mean signed distance in mm of the reference's edge from the prediction's)."""
    out = []
    for z in range(pred.shape[0]):
        if min(np.count_nonzero(pred[z]), np.count_nonzero(ref[z])) < MIN_SLICE_VOXELS:
            continue
        edge = ref[z] & ~ndi.binary_erosion(ref[z])
        inside = ndi.distance_transform_edt(pred[z], sampling=pixel_mm)
        outside = ndi.distance_transform_edt(~pred[z], sampling=pixel_mm)
        signed = np.where(pred[z], -inside, outside)[edge]
        near = signed[np.abs(signed) <= OFFSET_WITHIN_MM]
        if near.size:
            out.append((z, float(near.mean())))
    return out


def runs(offsets: list[tuple[int, float]], step_mm: float = 0.5) -> list[tuple[int, int, float]]:
    """Consecutive slices whose offsets stay within ``step_mm`` of their run's mean: (first, last, mean)."""
    found: list[list[tuple[int, float]]] = []
    for z, value in offsets:
        if found and abs(value - float(np.mean([v for _, v in found[-1]]))) <= step_mm:
            found[-1].append((z, value))
        else:
            found.append([(z, value)])
    return [(run[0][0], run[-1][0], float(np.mean([v for _, v in run]))) for run in found]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=THORAX)
    args = parser.parse_args()
    case = load_cases(f"dicom-rtstruct:{args.data}")[0]
    pred = ClassicalSegmenter().predict(Volume(case.hu, case.spacing))
    pixel_mm = float(case.spacing[1])
    names = {name.lower(): value for value, name in case.label_names.items()}
    for label, name in ((RIGHT_LUNG, "right lung"), (LEFT_LUNG, "left lung")):
        p, r = pred == label, case.labels == names[name]
        fp, fn = p & ~r, r & ~p
        dice, _ = metrics.dice_iou(p, r)
        hd95, _ = metrics.hd95_msd(p, r, case.spacing)
        total = np.count_nonzero(p) + np.count_nonzero(r)
        print(f"{name}: Dice {dice:.4f}, HD95 {hd95:.2f} mm, FP {fp.sum()} FN {fn.sum()} voxels")
        inside, outside = _in_plane_distance(p, pixel_mm), _in_plane_distance(~p, pixel_mm)
        for limit in EDGE_MM:
            edge = np.count_nonzero(fp & (inside <= limit)) + np.count_nonzero(fn & (outside <= limit))
            print(
                f"  errors within {limit:.0f} mm of the prediction's edge: {edge} voxels; "
                f"Dice with only these left: {1 - edge / total:.4f}"
            )
        spans = ", ".join(f"{a}-{b}: {m:+.1f}" for a, b, m in runs(edge_offsets(p, r, pixel_mm)))
        print(f"  reference edge from the prediction's, mm by slices: {spans}")


if __name__ == "__main__":
    main()
