"""Where the 3D training patches come from: foreground-biased draws, crops with padding, tilings."""

from __future__ import annotations

import numpy as np
import pytest

from segmenters import patches

PATCH = (4, 8, 8)


def labels_with_a_small_structure() -> np.ndarray:
    """20 x 40 x 40 voxels of background with a 2 x 2 x 2 structure (label 5) near a corner and a
    large one (label 1) filling a quarter of the volume."""
    labels = np.zeros((20, 40, 40), dtype=np.uint8)
    labels[:, 20:, 20:] = 1
    labels[3:5, 2:4, 30:32] = 5
    return labels


def test_half_of_the_patches_are_centred_on_a_structure_each_met_alike() -> None:
    labels = labels_with_a_small_structure()
    sampler = patches.PatchSampler([labels], [(0, 20)], [1, 5, 7], PATCH, np.random.default_rng(0))
    assert sampler.patches_per_epoch() == 20 * 40 * 40 // (4 * 8 * 8)
    rng = np.random.default_rng(1)
    draws = [sampler.draw(rng) for _ in range(400)]
    assert {i for i, _ in draws} == {0}
    boxes = [labels[z : z + 4, r : r + 8, c : c + 8] for _, (z, r, c) in draws]
    assert all(box.shape == PATCH for box in boxes)  # inside the volume
    # 2 x 2 x 2 of 64,000 voxels: drawn uniformly, hardly ever; here about half the foreground draws.
    small = np.mean([(box == 5).any() for box in boxes])
    assert 0.15 < small < 0.4, small
    assert np.mean([(box == 1).any() for box in boxes]) > 0.4


def test_centres_stay_where_the_labels_are_defined_and_empty_cases_are_never_drawn() -> None:
    labels = labels_with_a_small_structure()
    sampler = patches.PatchSampler(
        [labels, labels], [(10, 10), (12, 16)], [5], PATCH, np.random.default_rng(0)
    )
    assert sampler.patches_per_epoch() == 4 * 40 * 40 // (4 * 8 * 8)
    rng = np.random.default_rng(2)
    for _ in range(100):
        i, (z, _, _) = sampler.draw(rng)
        assert i == 1 and 12 <= z + PATCH[0] // 2 < 16  # no structure there: centred in the range
    with pytest.raises(ValueError, match="no training case"):
        patches.PatchSampler([labels], [(3, 3)], [5], PATCH, np.random.default_rng(0))


def test_crop_box_pads_outside_and_tile_starts_cover_every_voxel() -> None:
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    box = patches.crop_box(a, (-1, 1, 2), (3, 3, 3), fill=-7)
    assert box.shape == (3, 3, 3)
    assert (box[0] == -7).all() and (box[:, 2] == -7).all() and (box[:, :, 2] == -7).all()
    assert np.array_equal(box[1:, :2, :2], a[:, 1:3, 2:4])
    assert (patches.crop_box(a, (5, 5, 5), (2, 2, 2), fill=0) == 0).all()
    assert patches.tile_starts(10, 16) == [0]
    assert patches.tile_starts(32, 16) == [0, 16]
    assert patches.tile_starts(40, 16) == [0, 16, 24]
