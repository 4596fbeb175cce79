"""Segmentation metrics on masks whose Dice, IoU and surface distances are known by hand.

The surface-distance definitions follow MONAI (see segmenters/metrics.py): surfaces are a mask XOR
its erosion, HD95 is the larger of the two directed 95th percentiles, MSD the mean of both
directed sets pooled. Where a value is not obvious, the reasoning is in the test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from segmenters import metrics
from segmenters.metrics import (
    StructureScore,
    dice_iou,
    hd95_msd,
    mean_iou,
    score_case,
    score_masks,
    summarize,
    surface,
    surface_distances,
)


def _cube(
    shape: tuple[int, int, int], start: tuple[int, int, int], size: int | tuple[int, int, int]
) -> np.ndarray:
    sizes = (size, size, size) if isinstance(size, int) else size
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + n) for s, n in zip(start, sizes, strict=True))] = True
    return mask


def _ball(shape: tuple[int, int, int], radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing, strict=True)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    return np.asarray(z**2 + y**2 + x**2 <= radius_mm**2)


def _brute_force_distances(
    a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances by comparing every pair of surface voxel centres."""
    pa = np.argwhere(surface(a)) * np.asarray(spacing)
    pb = np.argwhere(surface(b)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(axis=-1))
    return d.min(axis=1), d.min(axis=0)


# --- overlap ---------------------------------------------------------------------------------------


def test_identical_masks_score_perfectly() -> None:
    mask = _cube((20, 20, 20), (5, 5, 5), 8)
    score = score_masks(mask, mask, (2.0, 0.7, 0.7), "cube")
    assert score == StructureScore("cube", 1.0, 1.0, 0.0, 0.0, 512, 512)


def test_disjoint_single_voxels_are_apart_by_their_distance() -> None:
    # Each mask is one voxel, which is its own surface: every distance is the one between them.
    spacing = (3.0, 1.0, 0.5)
    a = _cube((10, 10, 10), (1, 2, 2), 1)
    b = _cube((10, 10, 10), (5, 2, 6), 1)  # 4 slices (12 mm) and 4 columns (2 mm) away
    score = score_masks(a, b, spacing)
    expected = math.hypot(12.0, 2.0)
    assert (score.dice, score.iou) == (0.0, 0.0)
    assert score.hd95_mm == pytest.approx(expected)
    assert score.msd_mm == pytest.approx(expected)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("spacing", [(2.0, 0.5, 1.0), (3.0, 0.8, 0.8), (1.0, 1.0, 1.0)])
def test_cube_shifted_by_two_voxels(axis: int, spacing: tuple[float, float, float]) -> None:
    """A 10^3 cube and the same cube 2 voxels further along one axis.

    Overlap: 8 x 10 x 10 = 800 voxels of 1000 each, so Dice = 1600 / 2000 = 0.8 and IoU =
    800 / 1200 = 2/3, whatever the spacing.

    Distances (shift s = 2 voxels of spacing h along the axis): each cube has 10^3 - 8^3 = 488
    surface voxels. Of cube A's, the side-face voxels at levels 2..9 along the axis lie on B's
    surface (288 voxels, 0 mm); the side ring at level 1 is one step from B's end face (36, h);
    the whole end face at level 0 is two steps from it (100, 2h), and nothing is further: B's far
    end face is 2h beyond A's. So the 100 voxels at 2h are 20 % of the set and the 95th
    percentile is 2h; by symmetry the same holds from B to A. HD95 = 2h.
    """
    shape = (16, 16, 16)
    a = _cube(shape, (2, 2, 2), 10)
    start = [2, 2, 2]
    start[axis] += 2
    b = _cube(shape, (start[0], start[1], start[2]), 10)
    score = score_masks(a, b, spacing)
    assert score.dice == pytest.approx(0.8)
    assert score.iou == pytest.approx(2.0 / 3.0)
    assert score.hd95_mm == pytest.approx(2.0 * spacing[axis])
    to_b, to_a = _brute_force_distances(a, b, spacing)
    assert score.msd_mm == pytest.approx((to_b.sum() + to_a.sum()) / (to_b.size + to_a.size))
    assert np.count_nonzero(to_b == 0.0) == 288
    assert np.count_nonzero(np.isclose(to_b, 2.0 * spacing[axis])) >= 100


def test_cube_shift_mean_surface_distance_by_hand() -> None:
    """The MSD of the shifted cubes above with spacing (2, 0.5, 1) mm, shift along axis 0.

    From A to B: 100 voxels at 4 mm and 36 at 2 mm (see above); the 64 inner voxels of A's
    far end face (z = 9) are closest to B's side faces in the same plane: min(0.5 * my, 1 * mx)
    mm, where my, mx in 1..4 are the steps to the nearest side, each taken by two rows/columns.
    Summed over the 16 (my, mx) pairs, 4 voxels each: 4 * (2 + 4 + 5.5 + 7) = 74 mm. So each
    direction sums to 400 + 72 + 74 = 546 mm over 488 voxels, and MSD = 546 / 488 mm.
    """
    spacing = (2.0, 0.5, 1.0)
    a = _cube((16, 16, 16), (2, 2, 2), 10)
    b = _cube((16, 16, 16), (4, 2, 2), 10)
    hd95, msd = hd95_msd(a, b, spacing)
    assert hd95 == pytest.approx(4.0)
    assert msd == pytest.approx(546.0 / 488.0)


def test_anisotropic_spacing_scales_distances_along_its_axis_only() -> None:
    a = _cube((16, 16, 16), (2, 2, 2), 10)
    b = _cube((16, 16, 16), (2, 2, 5), 10)  # 3 columns further
    assert hd95_msd(a, b, (1.0, 1.0, 1.0))[0] == pytest.approx(3.0)
    assert hd95_msd(a, b, (5.0, 5.0, 1.0))[0] == pytest.approx(3.0)  # slices and rows do not matter
    assert hd95_msd(a, b, (1.0, 1.0, 0.6))[0] == pytest.approx(1.8)


def test_sphere_inside_a_larger_sphere_is_apart_by_the_radius_difference() -> None:
    spacing = (0.5, 0.5, 0.5)
    small = _ball((60, 60, 60), 10.0, spacing)
    large = _ball((60, 60, 60), 12.0, spacing)
    score = score_masks(small, large, spacing)
    # Voxelised spheres: distances scatter about 2 mm by up to a voxel.
    assert score.hd95_mm == pytest.approx(2.0, abs=0.5)
    assert score.msd_mm == pytest.approx(2.0, abs=0.35)
    assert score.dice == pytest.approx(2 * 10**3 / (10**3 + 12**3), abs=0.02)


def test_hd95_is_the_larger_directed_percentile_as_monai_not_the_pooled_one() -> None:
    """A cube, and the same cube with a small block 11 voxels off it.

    The block's 34 surface voxels are 6.5 % of the prediction's 522, so the 95th percentile from
    the prediction is at least 11 mm (MONAI's HD95). Pooled with the reference's 488 distances of
    0 mm they are 3.4 %, and the pooled 95th percentile (medpy's hd95) would be 0.
    """
    ref = _cube((40, 40, 40), (10, 10, 10), 10)
    pred = ref | _cube((40, 40, 40), (30, 13, 13), (3, 3, 4))
    to_ref, to_pred = surface_distances(pred, ref, (1.0, 1.0, 1.0))
    assert to_ref.size == 522 and to_pred.size == 488
    assert np.percentile(np.concatenate([to_ref, to_pred]), 95) == 0.0
    assert hd95_msd(pred, ref, (1.0, 1.0, 1.0))[0] >= 11.0


def test_kd_tree_distances_equal_the_distance_transform(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    spacing = (2.5, 0.7, 0.9)
    a = _ball((24, 40, 40), 9.0, spacing) & (rng.random((24, 40, 40)) > 0.1)
    b = np.roll(_ball((24, 40, 40), 8.0, spacing), 3, axis=2)
    edt = surface_distances(a, b, spacing)
    monkeypatch.setattr(metrics, "EDT_MAX_VOXELS", 0)
    tree = surface_distances(a, b, spacing)
    for x, y in zip(edt, tree, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-9)
    brute = _brute_force_distances(a, b, spacing)
    for x, y in zip(edt, brute, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-9)


def test_surface_is_the_mask_xor_its_scipy_erosion() -> None:
    rng = np.random.default_rng(0)
    for shape in ((7, 9, 11), (1, 5, 5), (30, 1, 4)):
        mask = ndi.binary_opening(rng.random(shape) > 0.3) | (rng.random(shape) > 0.9)
        np.testing.assert_array_equal(surface(mask), mask ^ ndi.binary_erosion(mask))


def test_masks_touching_the_array_edge_have_a_surface_there() -> None:
    full = np.ones((4, 5, 6), dtype=bool)
    assert surface(full).sum() == full.size - 2 * 3 * 4  # all but the 2 x 3 x 4 core
    score = score_masks(full, full, (1.0, 1.0, 1.0))
    assert (score.dice, score.hd95_mm, score.msd_mm) == (1.0, 0.0, 0.0)


# --- empty masks -----------------------------------------------------------------------------------


def test_both_empty_is_a_perfect_score() -> None:
    empty = np.zeros((5, 5, 5), dtype=bool)
    assert score_masks(empty, empty, (1.0, 1.0, 1.0), "x") == StructureScore("x", 1.0, 1.0, 0.0, 0.0, 0, 0)


@pytest.mark.parametrize("pred_empty", [True, False])
def test_one_empty_is_zero_overlap_and_infinite_distance(pred_empty: bool) -> None:
    empty = np.zeros((5, 5, 5), dtype=bool)
    mask = _cube((5, 5, 5), (1, 1, 1), 2)
    pred, ref = (empty, mask) if pred_empty else (mask, empty)
    score = score_masks(pred, ref, (1.0, 1.0, 1.0))
    assert (score.dice, score.iou) == (0.0, 0.0)
    assert math.isinf(score.hd95_mm) and math.isinf(score.msd_mm)
    assert (score.voxels_pred, score.voxels_ref) == ((0, 8) if pred_empty else (8, 0))


def test_dice_iou_of_empty_masks() -> None:
    empty = np.zeros((2, 2, 2), dtype=bool)
    assert dice_iou(empty, empty) == (1.0, 1.0)


def test_surface_distances_refuse_empty_masks() -> None:
    empty = np.zeros((3, 3, 3), dtype=bool)
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(empty, _cube((3, 3, 3), (0, 0, 0), 1), (1.0, 1.0, 1.0))


def test_bad_input_is_refused() -> None:
    a = np.zeros((3, 3, 3), dtype=bool)
    with pytest.raises(ValueError, match="shape"):
        score_masks(a, np.zeros((3, 3, 4), dtype=bool), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        score_masks(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        score_masks(a, a, (1.0, 1.0))  # type: ignore[arg-type]


# --- label maps, z ranges and aggregation --------------------------------------------------------------


def _label_maps() -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros((20, 16, 16), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[5:15, 2:8, 2:8] = 1
    pred[0:20, 2:8, 2:8] = 1  # the same tube, but over every slice
    ref[5:10, 10:14, 10:14] = 2
    pred[5:10, 10:14, 11:15] = 2  # one column off: 3 of 4 columns overlap
    return pred, ref


def test_score_case_scores_each_label_in_order() -> None:
    pred, ref = _label_maps()
    scores = score_case(pred, ref, {2: "B", 1: "A", 3: "C"}, (2.0, 1.0, 1.0))
    assert [s.structure for s in scores] == ["B", "A", "C"]
    b, a, c = scores
    assert b.dice == pytest.approx(0.75) and b.iou == pytest.approx(3 / 5)
    assert a.dice == pytest.approx(2 * 360 / (720 + 360))
    assert (c.dice, c.iou, c.hd95_mm, c.msd_mm, c.voxels_pred, c.voxels_ref) == (1.0, 1.0, 0.0, 0.0, 0, 0)
    # The same masks through score_masks.
    assert a == score_masks(pred == 1, ref == 1, (2.0, 1.0, 1.0), "A")


def test_z_range_scores_a_structure_on_its_slices_only() -> None:
    pred, ref = _label_maps()
    whole, limited = (
        score_case(pred, ref, {1: "A"}, (2.0, 1.0, 1.0), z_range=z)[0] for z in (None, {"A": (5, 15)})
    )
    assert whole.dice < 0.7
    assert (limited.dice, limited.iou, limited.hd95_mm, limited.msd_mm) == (1.0, 1.0, 0.0, 0.0)
    assert limited.voxels_pred == limited.voxels_ref == 360
    # Slices where the reference has nothing: what the prediction has there is all wrong.
    outside = score_case(pred, ref, {1: "A"}, (2.0, 1.0, 1.0), z_range={"A": (15, 20)})[0]
    assert outside.dice == 0.0 and math.isinf(outside.hd95_mm)
    empty = score_case(pred, ref, {2: "B"}, (2.0, 1.0, 1.0), z_range={"B": (12, 12)})[0]
    assert empty.dice == 1.0 and empty.voxels_pred == 0


def test_score_case_refuses_bad_arguments() -> None:
    pred, ref = _label_maps()
    with pytest.raises(ValueError, match="not in labels"):
        score_case(pred, ref, {1: "A"}, (1.0, 1.0, 1.0), z_range={"Z": (0, 1)})
    with pytest.raises(ValueError, match="outside slices"):
        score_case(pred, ref, {1: "A"}, (1.0, 1.0, 1.0), z_range={"A": (5, 25)})
    with pytest.raises(ValueError, match="background"):
        score_case(pred, ref, {0: "background"}, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="integers"):
        score_case(pred.astype(np.float32), ref.astype(np.float32), {1: "A"}, (1.0, 1.0, 1.0))


def test_labels_above_the_wanted_ones_are_ignored() -> None:
    pred, ref = _label_maps()
    pred[0, 0, 0] = ref[0, 0, 0] = 9
    assert score_case(pred, ref, {2: "B"}, (1.0, 1.0, 1.0))[0].dice == pytest.approx(0.75)


def test_summaries_average_over_cases_and_infinity_shows() -> None:
    def score(name: str, dice: float, hd: float, pred: int = 10, ref: int = 10) -> StructureScore:
        return StructureScore(name, dice, dice / (2 - dice), hd, hd / 2, pred, ref)

    cases = [
        [score("Lung", 0.9, 4.0), score("Heart", 0.8, 6.0)],
        [score("Lung", 0.7, 8.0), score("Heart", 0.0, math.inf, pred=0)],
        [score("Lung", 0.8, 6.0)],
    ]
    lung, heart = summarize(cases)
    assert (lung.structure, lung.cases, lung.one_empty) == ("Lung", 3, 0)
    assert lung.dice == pytest.approx(0.8)
    assert lung.hd95_mm == pytest.approx(6.0) and lung.msd_mm == pytest.approx(3.0)
    assert (heart.cases, heart.one_empty) == (2, 1)
    assert heart.dice == pytest.approx(0.4)
    assert math.isinf(heart.hd95_mm) and math.isinf(heart.msd_mm)
    assert mean_iou([lung, heart]) == pytest.approx((lung.iou + heart.iou) / 2)
    assert mean_iou(cases[0]) == pytest.approx((0.9 / 1.1 + 0.8 / 1.2) / 2)
    with pytest.raises(ValueError):
        mean_iou([])
