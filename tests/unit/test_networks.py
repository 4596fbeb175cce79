"""The segmentation networks: shapes, the layers that define each one, that each one learns, and
whole-volume inference in batches.

Everything runs on the CPU with tiny widths. "Learns" means: a few Adam steps on a synthetic task
(a bright disk and a dark square on grey noise, three classes) bring the cross-entropy well down.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segmenters.networks import (
    ARCHITECTURES,
    TrainsOnInstances,
    UnknownArchitectureError,
    build_network,
    count_parameters,
    pad_to_multiple,
)
from segmenters.networks.inference import predict_volume
from segmenters.networks.mask_rcnn import MaskRCNNSegmenter

NAMES_2D = [name for name, spec in ARCHITECTURES.items() if spec.spatial_dims == 2]
TINY = {"vnet": 4}  # widths for the tests; 8 where not named
# V-Net's tiny 3D network (ELU, batch norm over one volume) needs a larger step to learn in 30 steps.
LEARNING_RATE = {"vnet": 1e-2}
NUM_CLASSES = 3


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    torch.manual_seed(0)
    yield


def _tiny(name: str, in_channels: int = 1) -> nn.Module:
    return build_network(name, in_channels, NUM_CLASSES, width=TINY.get(name, 8))


def _disk_and_square(n: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 1, size, size) in [0, 1] and labels: 1 for a bright disk, 2 for a dark square."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    images = 0.5 + 0.05 * rng.standard_normal((n, 1, size, size))
    labels = np.zeros((n, size, size), dtype=np.int64)
    for i in range(n):
        cy, cx = rng.integers(18, size - 18, 2)
        disk = (rows - cy) ** 2 + (cols - cx) ** 2 <= int(rng.integers(10, 16)) ** 2
        sy, sx = rng.integers(2, size - 24, 2)
        side = int(rng.integers(16, 24))
        square = (rows >= sy) & (rows < sy + side) & (cols >= sx) & (cols < sx + side) & ~disk
        images[i, 0][disk] += 0.4
        images[i, 0][square] -= 0.4
        labels[i][disk], labels[i][square] = 1, 2
    return torch.from_numpy(images.astype(np.float32)), torch.from_numpy(labels)


def _ball_and_cube(size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The same task in 3D: a volume (1, 1, size, size, size) with a bright ball and a dark cube."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:size, :size, :size]
    volume = 0.5 + 0.05 * rng.standard_normal((1, 1, size, size, size))
    labels = np.zeros((1, size, size, size), dtype=np.int64)
    ball = (z - 20) ** 2 + (y - 12) ** 2 + (x - 20) ** 2 <= 81
    cube = np.zeros_like(ball)
    cube[4:16, 18:30, 2:14] = True
    cube &= ~ball
    volume[0, 0][ball] += 0.4
    volume[0, 0][cube] -= 0.4
    labels[0][ball], labels[0][cube] = 1, 2
    return torch.from_numpy(volume.astype(np.float32)), torch.from_numpy(labels)


def test_registry_names_every_architecture_and_its_dimensions() -> None:
    assert set(ARCHITECTURES) == {
        "fcn",
        "unet",
        "unetpp",
        "attention_unet",
        "vnet",
        "segnet",
        "deeplabv3",
        "pspnet",
        "mask_rcnn",
    }
    assert {name for name, spec in ARCHITECTURES.items() if spec.spatial_dims == 3} == {"vnet"}
    assert all(16 % spec.multiple == 0 for spec in ARCHITECTURES.values())


@pytest.mark.parametrize("name", NAMES_2D)
def test_2d_logits_at_input_resolution(name: str) -> None:
    with torch.no_grad():
        assert _tiny(name).eval()(torch.rand(2, 1, 64, 64)).shape == (2, NUM_CLASSES, 64, 64)
        # 2.5D (a slice and one neighbour each side) on a non-square slice.
        wide = _tiny(name, in_channels=3).eval()(torch.rand(1, 3, 48, 80))
        assert wide.shape == (1, NUM_CLASSES, 48, 80)


def test_vnet_logits_at_input_resolution() -> None:
    with torch.no_grad():
        assert _tiny("vnet")(torch.rand(1, 1, 32, 64, 64)).shape == (1, NUM_CLASSES, 32, 64, 64)


def test_default_vnet_is_monais() -> None:
    from monai.networks.nets import VNet

    ours = build_network("vnet", 1, NUM_CLASSES)
    theirs = VNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES)
    assert [tuple(p.shape) for p in ours.parameters()] == [tuple(p.shape) for p in theirs.parameters()]


@pytest.mark.slow  # trains every architecture: a dozen seconds
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_learns_a_toy_segmentation(name: str) -> None:
    model = _tiny(name)
    images, labels = _disk_and_square(4) if ARCHITECTURES[name].spatial_dims == 2 else _ball_and_cube()
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE.get(name, 3e-3))
    model.train()
    losses = []
    # A detector needs more steps: it must find the objects before their masks can be learned.
    for _ in range(70 if isinstance(model, TrainsOnInstances) else 30):
        optimiser.zero_grad()
        if isinstance(model, TrainsOnInstances):
            loss = model.training_loss(images, labels)
        else:
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    final = float(np.mean(losses[-3:]))
    if isinstance(model, TrainsOnInstances):
        # A detector's losses (proposals, boxes, masks) have no class-frequency baseline: it learns
        # when they fall and the class maps it paints from its detections find the objects.
        assert final < 0.7 * losses[0], f"{name}: loss {losses[0]:.3f} -> {final:.3f}"
        with torch.no_grad():
            predicted = model.eval()(images).argmax(dim=1)
        for c in (1, 2):
            found, truth = predicted == c, labels == c
            dice = 2 * float((found & truth).sum()) / float(found.sum() + truth.sum())
            assert dice > 0.8, f"{name}: class {c} Dice {dice:.3f}"
        return
    # The loss of a model that only knows how common each class is: to get below it, a network has to
    # find the objects, not just learn that most pixels are background.
    frequencies = torch.bincount(labels.flatten()).double() / labels.numel()
    prior = float(-(frequencies * frequencies.log()).sum())
    assert final < 0.7 * losses[0], f"{name}: loss {losses[0]:.3f} -> {final:.3f}"
    assert final < prior, f"{name}: loss {final:.3f}, class frequencies alone give {prior:.3f}"


def test_mask_rcnn_trains_on_each_structures_connected_components() -> None:
    from segmenters.networks.mask_rcnn import _instances

    y = torch.zeros(40, 50, dtype=torch.int64)
    y[2:10, 3:13] = 1  # two components of class 1
    y[20:30, 5:8] = 1
    y[12:18, 30:45] = 2
    y[35:37, 40:41] = 2  # a 2-pixel speck: no instance
    y[0:5, 45:50] = 255  # the loss's ignore value: background to a detector
    found = _instances(y, 3, torch.device("cpu"))
    assert found["labels"].tolist() == [1, 1, 2]
    assert found["boxes"].tolist() == [[3, 2, 13, 10], [5, 20, 8, 30], [30, 12, 45, 18]]
    assert found["masks"].shape == (3, 40, 50)
    assert [int(m.sum()) for m in found["masks"]] == [80, 30, 90]
    empty = _instances(torch.zeros(8, 8, dtype=torch.int64), 3, torch.device("cpu"))
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 8, 8)


def test_mask_rcnn_paints_its_best_detection_per_class_into_log_probabilities() -> None:
    model = _tiny("mask_rcnn")
    assert isinstance(model, MaskRCNNSegmenter)
    mask_a, mask_b = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    mask_a[0, :2, :2] = 0.9
    mask_b[0, 1:3, 1:3] = 1.0
    detection = {
        "labels": torch.tensor([1, 1, 2]),
        "scores": torch.tensor([0.9, 0.3, 0.2]),
        "masks": torch.stack([mask_a, mask_b, mask_b]),
    }
    log_probs = model._class_log_probs(detection, torch.Size((4, 4)))
    assert torch.allclose(log_probs.exp().sum(dim=0), torch.ones(4, 4))
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[:2, :2] = 1  # 0.81 beats the background's 0.19
    # (1, 2): class 1's 0.3 x 1.0 and class 2's 0.2 leave the background 0.7
    assert torch.equal(log_probs.argmax(dim=0), expected)


def _modules(model: nn.Module, kind: type[nn.Module] | tuple[type[nn.Module], ...]) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def test_fcn_has_transposed_convolutions_batch_norm_and_dropout() -> None:
    model = _tiny("fcn")
    assert len(_modules(model, nn.ConvTranspose2d)) == 3  # 16 -> 8 -> 4 -> 1, with two skip fusions
    assert _modules(model, nn.BatchNorm2d)
    assert _modules(model, (nn.Dropout, nn.Dropout2d))


def test_segnet_upsamples_with_the_pooling_indices() -> None:
    model = _tiny("segnet")
    assert _modules(model, nn.MaxUnpool2d)
    assert all(pool.return_indices for pool in _modules(model, nn.MaxPool2d))
    assert not _modules(model, (nn.ConvTranspose2d, nn.Upsample))
    # Each unpooling puts values only where the matching pooling found its maxima.
    seen: list[torch.Tensor] = []
    _modules(model, nn.MaxUnpool2d)[0].register_forward_hook(lambda _m, _args, out: seen.append(out))
    with torch.no_grad():
        model.eval()(torch.rand(1, 1, 64, 64))
    assert [tuple(s.shape[-2:]) for s in seen] == [(8, 8), (16, 16), (32, 32), (64, 64)]
    assert all((s != 0).float().mean() <= 0.25 for s in seen)  # at most one value per 2 x 2 window


def test_deeplab_and_pspnet_dilate_and_pool_context() -> None:
    for name in ("deeplabv3", "pspnet"):
        convs = _modules(_tiny(name), nn.Conv2d)
        assert max(c.dilation[0] for c in convs if isinstance(c, nn.Conv2d)) > 1
    deeplab_dilations = {
        c.dilation[0] for c in _modules(_tiny("deeplabv3"), nn.Conv2d) if isinstance(c, nn.Conv2d)
    }
    assert {12, 24, 36} <= deeplab_dilations  # ASPP
    assert _modules(_tiny("deeplabv3"), nn.AdaptiveAvgPool2d)  # ASPP's image pooling
    bins = {m.output_size for m in _modules(_tiny("pspnet"), nn.AdaptiveAvgPool2d)}
    assert bins == {1, 2, 3, 6}


@pytest.mark.parametrize(
    ("name", "in_channels", "num_classes", "width", "dropout", "error"),
    [
        ("resnet50", 1, 3, 8, 0.1, UnknownArchitectureError),
        ("unet", 0, 3, 8, 0.1, ValueError),
        ("unet", 1, 1, 8, 0.1, ValueError),
        ("unet", 1, 3, 7, 0.1, ValueError),
        ("unet", 1, 3, 8, 1.0, ValueError),
        ("vnet", 3, 3, 8, 0.1, ValueError),  # base width 4 is no multiple of 3 input channels
    ],
)
def test_build_network_rejects_what_cannot_work(
    name: str, in_channels: int, num_classes: int, width: int, dropout: float, error: type[Exception]
) -> None:
    with pytest.raises(error):
        build_network(name, in_channels, num_classes, width=width, dropout=dropout)


def test_pad_to_multiple_pads_at_the_end_and_crops_back() -> None:
    x = torch.rand(2, 3, 40, 50)
    padded, crop = pad_to_multiple(x, 16)
    assert padded.shape == (2, 3, 48, 64)
    assert torch.equal(padded[crop], x)
    assert padded[..., 40:, :].abs().sum() == 0 and padded[..., 50:].abs().sum() == 0
    same, crop = pad_to_multiple(x[..., :32, :48], 16)
    assert same.shape == (2, 3, 32, 48) and torch.equal(same[crop], x[..., :32, :48])
    assert pad_to_multiple(torch.rand(1, 1, 20, 33, 16), 16)[0].shape == (1, 1, 32, 48, 16)


def test_count_parameters() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    assert count_parameters(model) == 3 * 2 + 2 + 2 + 2
    model[1].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 8


# --- whole-volume inference -------------------------------------------------------------------------


class _Calls:
    """Records every forward pass of a module: its input shape and whether it ran in eval mode."""

    def __init__(self, model: nn.Module) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.eval_mode: list[bool] = []
        model.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        self.shapes.append(tuple(args[0].shape))
        self.eval_mode.append(not module.training)


class _CentreThreshold(nn.Module):
    """Logits (background, foreground) that say "foreground" where the centre channel is above 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, x.shape[1] // 2 : x.shape[1] // 2 + 1]
        return torch.cat([0.5 - centre, centre - 0.5], dim=1)


class _ChannelsAsLogits(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _ct(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 1500, shape).astype(np.int16)


def test_predict_volume_runs_slice_batches_into_a_uint8_map() -> None:
    model = _tiny("fcn")
    calls = _Calls(model)
    labels = predict_volume(model, _ct((40, 64, 64)), batch_size=8, device=torch.device("cpu"))
    assert labels.shape == (40, 64, 64) and labels.dtype == np.uint8
    assert labels.max() < NUM_CLASSES
    assert calls.shapes == [(8, 1, 64, 64)] * 5  # never the whole volume at once
    assert all(calls.eval_mode) and model.training  # eval for the call, training flag restored


def test_predict_volume_25d_gives_each_slice_its_neighbours() -> None:
    model = _tiny("fcn", in_channels=5)
    calls = _Calls(model)
    labels = predict_volume(model, _ct((40, 64, 64)), context_slices=2, batch_size=8, device="cpu")
    assert labels.shape == (40, 64, 64) and labels.dtype == np.uint8
    assert calls.shapes == [(8, 5, 64, 64)] * 5
    # Slice i has the value 10 i HU: its channels are slices i-1, i, i+1 (repeated at the ends), so the
    # brightest channel, as a class, is 2 except on the last slice, where channels 1 and 2 tie.
    ramp = np.broadcast_to((np.arange(40) * 10.0)[:, None, None], (40, 16, 16)).copy()
    labels = predict_volume(_ChannelsAsLogits(), ramp, context_slices=1, batch_size=7)
    assert (labels[:-1] == 2).all() and (labels[-1] == 1).all()


def test_predict_volume_windows_pads_and_crops() -> None:
    hu = _ct((21, 60, 50))  # neither the batch nor the slice size divides evenly
    model = _CentreThreshold()
    calls = _Calls(model)
    labels = predict_volume(model, hu, batch_size=8, window=(-1000, 1000))
    np.testing.assert_array_equal(labels, (hu > 0).astype(np.uint8))
    assert calls.shapes == [(8, 1, 64, 64), (8, 1, 64, 64), (5, 1, 64, 64)]


def test_predict_volume_3d_by_slabs_of_sliding_windows() -> None:
    hu = _ct((40, 40, 40))
    model = _CentreThreshold()
    calls = _Calls(model)
    labels = predict_volume(model, hu, patch_size=(16, 32, 32), batch_size=2, slab_slices=16)
    np.testing.assert_array_equal(labels, (hu > 0).astype(np.uint8))  # slabs stitched without shifts
    assert all(s[0] <= 2 and s[2:] == (16, 32, 32) for s in calls.shapes)

    vnet = _tiny("vnet")
    labels = predict_volume(vnet, hu[:20], patch_size=(16, 32, 32), batch_size=4)
    assert labels.shape == (20, 40, 40) and labels.dtype == np.uint8


def test_predict_volume_rejects_bad_arguments() -> None:
    hu = _ct((4, 32, 32))
    with pytest.raises(ValueError, match="context_slices"):
        predict_volume(_CentreThreshold(), hu, patch_size=(16, 16, 16), context_slices=1)
    with pytest.raises(ValueError, match="patch_size"):
        predict_volume(_CentreThreshold(), hu, patch_size=(10, 16, 16))
    with pytest.raises(ValueError, match="3D"):
        predict_volume(_CentreThreshold(), hu[0])
