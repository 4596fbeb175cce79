"""Checkpoints and model cards: save, load, serve through the Segmenter interface."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from segmenters.base import ANATOMICAL_STRUCTURE, Concept, Segmenter, Structure, Volume
from segmenters.checkpoint import ModelCard, NetworkSegmenter, load_checkpoint, save_checkpoint
from segmenters.networks import build_network

DEMO = Path(__file__).resolve().parents[2] / "segmenters" / "demo"

STRUCTURES = (
    Structure(
        1, "Right lung", ANATOMICAL_STRUCTURE, Concept("39607008", "Lung"), Concept("24028007", "Right")
    ),
    Structure(2, "Heart", ANATOMICAL_STRUCTURE, Concept("80891009", "Heart")),
)


def card(**changes: object) -> ModelCard:
    values: dict[str, object] = {
        "name": "segnode-test-unet",
        "version": "0.1",
        "architecture": "unet",
        "width": 8,
        "context_slices": 1,
        "structures": STRUCTURES,
        "pixel_spacing_mm": 2.0,
        "window": (-1000.0, 1000.0),
        "demo": True,
        "training_data": "12 synthetic phantoms",
        "validation_metrics": {"dice_mean": 0.9},
    }
    values.update(changes)
    return ModelCard(**values)  # type: ignore[arg-type]


def test_card_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = card()
    model = build_network("unet", original.in_channels, original.num_classes, width=8)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, original)
    loaded, loaded_card = load_checkpoint(path)
    assert loaded_card == original
    assert loaded_card.in_channels == 3 and loaded_card.num_classes == 3
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(loaded(x), model.eval()(x))
    assert not list(tmp_path.glob(".*.part"))


def test_network_segmenter_serves_labels_on_the_series_grid(tmp_path: Path) -> None:
    torch.manual_seed(0)
    c = card()
    save_checkpoint(tmp_path / "m.pt", build_network("unet", c.in_channels, c.num_classes, width=8), c)
    segmenter = NetworkSegmenter(tmp_path / "m.pt", device="cpu", batch_size=4)
    assert isinstance(segmenter, Segmenter)
    assert segmenter.algorithm.name == "segnode-test-unet (demo model)"
    assert segmenter.algorithm.family.value == "123110"
    hu = np.random.default_rng(0).normal(0, 300, (6, 50, 70)).astype(np.float32)
    labels = segmenter.predict(Volume(hu, (3.0, 0.8, 0.8)))  # resampled to 2 mm and back
    assert labels.shape == (6, 50, 70) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_checkpoint_of_another_format_is_refused(tmp_path: Path) -> None:
    torch.save({"format": 99}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a segnode checkpoint"):
        load_checkpoint(tmp_path / "x.pt")


def test_cards_carry_test_metrics_and_a_patch_size_and_older_cards_still_load(tmp_path: Path) -> None:
    old = ModelCard.from_dict(json.loads((DEMO / "model_card.json").read_text()))
    assert old.patch_size is None and old.test_metrics == {} and old.architecture == "unet"
    torch.manual_seed(0)
    c = card(
        architecture="vnet",
        width=4,
        context_slices=0,
        patch_size=(16, 32, 32),
        test_metrics={"test_dice": 0.5},
    )
    save_checkpoint(tmp_path / "v.pt", build_network("vnet", 1, c.num_classes, width=4), c)
    assert load_checkpoint(tmp_path / "v.pt")[1] == c
    assert json.loads(c.to_json())["patch_size"] == [16, 32, 32]


# A supine series stored another way: how its array indexes the supine one, and its axes (slice,
# row, column) as signed indices of the supine axes (1-based: -2 is the supine rows reversed).
STORED: dict[str, tuple[Callable[[np.ndarray], np.ndarray], tuple[int, int, int]]] = {
    "prone": (lambda a: a[:, ::-1, ::-1], (1, -2, -3)),  # rows back to front, columns left to right
    "feet first": (lambda a: a[::-1, :, ::-1], (-1, 2, -3)),  # slices head to foot
    "coronal": (lambda a: a.transpose(1, 0, 2), (2, 1, 3)),  # planes front to back
}


def _stored(volume: Volume, how: str) -> Volume:
    index, axes = STORED[how]
    directions = [tuple(float(np.sign(a)) * v for v in volume.axes_lps[abs(a) - 1]) for a in axes]
    spacing = tuple(volume.spacing[abs(a) - 1] for a in axes)
    return Volume(np.ascontiguousarray(index(volume.hu)), spacing, tuple(directions))  # type: ignore[arg-type]


@pytest.mark.parametrize("how", ["prone", "feet first", "coronal"])
def test_a_network_sees_every_series_as_supine_head_first_axial(how: str) -> None:
    # The demo network is not symmetric: without reorienting, a prone series (rotated 180 degrees)
    # gives other labels than the same anatomy supine. Turned first, the labels are the supine
    # ones, indexed like the series: its right lung is the supine right lung.
    from segmenters.synthetic import make_phantom

    phantom = make_phantom((12, 96, 96), (5.0, 4.0, 4.0), seed=1)
    supine = Volume(phantom.hu, phantom.spacing)
    segmenter = NetworkSegmenter(DEMO / "demo-thorax-unet.pt", device="cpu", amp=False)
    expected = segmenter.predict(supine)
    got = segmenter.predict(_stored(supine, how))
    np.testing.assert_array_equal(got, STORED[how][0](expected))
    assert len(np.unique(expected)) > 3  # lungs and more, not an empty map
