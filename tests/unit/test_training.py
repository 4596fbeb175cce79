"""Training, evaluation, data readers and their commands, on tiny phantoms and the real thorax."""

from __future__ import annotations

import csv
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import segmenters.served.runner
from segmenters import datasets, synthetic, volume_files
from segmenters.base import Volume
from segmenters.checkpoint import NetworkSegmenter, load_checkpoint
from segmenters.cli import train_command
from segmenters.evaluation import comparison_table, evaluate
from segmenters.plots import PNG_SIGNATURE
from segmenters.training import TrainConfig, TrainResult, _augment, _mirror_lut, train
from workers.cli import evaluate_command

THORAX = Path(__file__).resolve().parents[3] / "shared" / "data" / "ct-thorax-lung1-002"
SHAPE, SPACING = (8, 48, 48), (32.0, 8.0, 8.0)  # a whole phantom thorax, coarsely
SHAPE_3D, SPACING_3D = (16, 48, 48), (16.0, 8.0, 8.0)  # the same at twice the slices, for the V-Net
PATCH = (16, 32, 32)
STRUCTURES = synthetic.THORAX_STRUCTURES


def tiny(**changes: object) -> TrainConfig:
    values: dict[str, object] = {
        "width": 8,
        "max_epochs": 3,
        "pixel_spacing_mm": None,
        "crop_size": 48,
        "learning_rate": 3e-3,
        "lr_decay": 1.0,
        "demo": True,
    }
    values.update(changes)
    return TrainConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cases() -> list[datasets.Case]:
    return datasets.synthetic_cases(6, SHAPE, SPACING, seed=0)


@pytest.fixture(scope="module")
def trained(cases: list[datasets.Case], tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return train(cases[:4], cases[4:], STRUCTURES, tiny(), tmp_path_factory.mktemp("model"), progress=False)


@pytest.fixture(scope="module")
def cases_3d() -> list[datasets.Case]:
    return datasets.synthetic_cases(6, SHAPE_3D, SPACING_3D, seed=0)


@pytest.fixture(scope="module")
def trained_vnet(cases_3d: list[datasets.Case], tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    # V-Net's tiny 3D network (ELU, batch norm over two patches) needs a larger step, as in test_networks.
    config = tiny(
        architecture="vnet", width=4, max_epochs=5, batch_size=2, learning_rate=1e-2, patch_size=PATCH
    )
    out = tmp_path_factory.mktemp("vnet")
    return train(cases_3d[:4], cases_3d[4:], STRUCTURES, config, out, progress=False)


def decode_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB PNG without filters (what plots.encode_png writes) as (rows, columns, 3)."""
    assert data[:8] == PNG_SIGNATURE
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert (depth, colour) == (8, 2)
            size = (height, width)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(size[0], 1 + 3 * size[1])
    assert not raw[:, 0].any()  # filter type 0 on every row
    return raw[:, 1:].reshape(size[0], size[1], 3)


@pytest.mark.slow  # a training run
def test_training_lowers_the_loss_and_writes_its_outputs(trained: TrainResult) -> None:
    losses = [h.train_loss for h in trained.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert trained.history[-1].val_loss < trained.history[0].val_loss
    out = trained.checkpoint.parent
    model, card = load_checkpoint(trained.checkpoint)
    assert not model.training and card.demo and card.architecture == "unet"
    assert card.num_classes == len(STRUCTURES) + 1
    assert "val_miou" in card.validation_metrics
    saved = json.loads((out / "model_card.json").read_text())
    codes = {s["type"]["value"] for s in saved["structures"]}
    assert {"39607008", "80891009", "32849002", "2748008"} <= codes  # lung, heart, oesophagus, cord
    with open(out / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"train_loss", "val_loss", "val_dice", "val_miou", "dice_Heart"} <= set(rows[0])
    for name in ("loss.png", "dice_miou.png"):
        image = decode_png((out / name).read_bytes())
        assert image.shape == (320, 480, 3)
        assert (image != 255).any(axis=2).sum() > 500  # axes and lines drawn


def test_early_stopping_stops_when_the_validation_loss_does_not_improve(
    cases: list[datasets.Case], tmp_path: Path
) -> None:
    # lr 0 fixes the weights; min_delta ignores the drift of batch-norm running statistics.
    config = tiny(max_epochs=6, learning_rate=0.0, patience=1, min_delta=1.0, augment=False)
    result = train(cases[:1], cases[1:2], STRUCTURES, config, tmp_path, progress=False)
    assert result.stopped_early and len(result.history) == 2 and result.best_epoch == 1


@pytest.mark.slow  # a training run
def test_vnet_trains_on_patches_and_serves_with_its_patch_size(
    trained_vnet: TrainResult, cases_3d: list[datasets.Case], monkeypatch: pytest.MonkeyPatch
) -> None:
    losses = [h.train_loss for h in trained_vnet.history]
    assert len(losses) == 5 and losses[-1] < 0.7 * losses[0], losses
    assert trained_vnet.history[-1].val_loss < trained_vnet.history[0].val_loss
    out = trained_vnet.checkpoint.parent
    assert {p.name for p in trained_vnet.files} >= {"model.pt", "history.csv", "loss.png", "dice_miou.png"}
    card = trained_vnet.card
    assert card.architecture == "vnet" and card.patch_size == PATCH and card.context_slices == 0
    assert json.loads((out / "model_card.json").read_text())["patch_size"] == list(PATCH)
    assert "16x32x32" in card.training_data

    windows: list[object] = []
    real = segmenters.served.runner.predict_volume

    def spy(*args: object, **kwargs: object) -> np.ndarray:
        windows.append(kwargs["patch_size"])
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(segmenters.served.runner, "predict_volume", spy)
    segmenter = NetworkSegmenter(trained_vnet.checkpoint, device="cpu", batch_size=2)
    assert segmenter.model_card == card
    case = cases_3d[4]
    labels = segmenter.predict(Volume(case.hu, case.spacing))
    assert labels.shape == case.hu.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {s.label for s in STRUCTURES} | {0}
    odd = segmenter.predict(Volume(case.hu[:11, 3:43, 5:45], case.spacing))  # no multiple of the patch
    assert odd.shape == (11, 40, 40)
    assert windows == [PATCH, PATCH]


def test_config_checks_patches_and_crops() -> None:
    assert TrainConfig(architecture="vnet").context_slices == 0  # a 3D patch holds its neighbours
    assert TrainConfig(architecture="vnet").patch_size == (32, 96, 96)
    with pytest.raises(ValueError, match="multiples of 16"):
        TrainConfig(architecture="vnet", patch_size=(32, 96, 90))
    with pytest.raises(ValueError, match="three"):
        TrainConfig(architecture="vnet", patch_size=(32, 96))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="crop_size"):
        TrainConfig(architecture="vnet", crop_size=64, patch_size=(32, 96, 96))
    with pytest.raises(ValueError, match="multiple"):
        TrainConfig(crop_size=50)
    with pytest.raises(ValueError, match="scale"):
        TrainConfig(scale=(0.0, 1.1))
    assert not TrainConfig().flip_lr


def test_augmenting_a_box_with_a_margin_cuts_out_the_patch_and_flips_with_the_labels() -> None:
    # No turn, scaling or shift: each patch is the centre of its box, mirrored (labels swapped) when
    # flipped, in 3D (a box 40 x 48 around a 32 x 32 patch) as in 2D.
    config = TrainConfig(rotation_deg=0.0, scale=(1.0, 1.0), translation=0.0, flip_lr=True)
    swap = _mirror_lut(STRUCTURES)
    x = torch.rand(6, 1, 4, 40, 48)
    y = torch.randint(0, len(STRUCTURES) + 1, (6, 4, 40, 48))
    out_x, out_y = _augment(x, y, config, np.random.default_rng(0), swap, size=(4, 32, 32))
    assert out_x.shape == (6, 1, 4, 32, 32) and out_y.shape == (6, 4, 32, 32)
    centre_x, centre_y = x[..., 4:36, 8:40], y[..., 4:36, 8:40]
    flipped = [bool(torch.equal(out_y[i], swap[centre_y[i].flip(-1)])) for i in range(6)]
    assert any(flipped) and not all(flipped)
    for i, flip in enumerate(flipped):
        expected = centre_x[i].flip(-1) if flip else centre_x[i]
        assert torch.allclose(out_x[i], expected, atol=1e-4)
        assert torch.equal(out_y[i], swap[centre_y[i].flip(-1)] if flip else centre_y[i])
    # Turned and shifted, image and labels move together.
    labels = torch.zeros(4, 4, 48, 48, dtype=torch.long)
    labels[:, :, 12:30, 16:40] = 4
    image, moved = _augment(labels[:, None].float(), labels, TrainConfig(), np.random.default_rng(1), None)
    assert torch.equal(image[:, 0] > 2.0, moved == 4) and not torch.equal(moved, labels)


def test_split_cases_is_deterministic_patient_level_and_never_empty() -> None:
    ids = [f"p{i:02d}" for i in range(20)]
    train_ids, val_ids, test_ids = datasets.split_cases(ids, seed=3)
    assert (len(train_ids), len(val_ids), len(test_ids)) == (14, 3, 3)
    assert sorted(train_ids + val_ids + test_ids) == ids
    assert datasets.split_cases(list(reversed(ids)), seed=3) == (train_ids, val_ids, test_ids)
    assert datasets.split_cases(ids, seed=4) != (train_ids, val_ids, test_ids)
    for n in range(3, 8):
        assert all(datasets.split_cases([str(i) for i in range(n)], seed=0))


def test_evaluate_writes_one_row_per_checkpoint_case_and_structure(
    trained: TrainResult, cases: list[datasets.Case], tmp_path: Path
) -> None:
    out = tmp_path / "results.csv"
    rows = evaluate([trained.checkpoint, "classical"], cases[4:], out, device="cpu")
    with open(out) as handle:
        written = list(csv.DictReader(handle))
    # The network labels all 7 structures; the classical segmenter body, lungs and airways.
    assert len(written) == len(rows) == 2 * len(STRUCTURES) + 2 * 4
    assert set(written[0]) == {"checkpoint", "case", "structure", "dice", "iou", "hd95_mm", "msd_mm"}
    table = comparison_table(rows)
    assert "mIoU" in table and "Right lung" in table and "classical" in table


def assert_test_scored(out: Path, split: dict[str, list[str]]) -> None:
    """test_metrics.csv holds a row per test case and structure; both cards carry its summary."""
    with open(out / "test_metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["case"] for r in rows} == set(split["test"])
    assert len(rows) == len(STRUCTURES) * len(split["test"])
    _, card = load_checkpoint(out / "model.pt")
    assert card.test_metrics["test_cases"] == len(split["test"])
    assert card.test_metrics["test_dice"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]))
    assert {"test_miou", "dice_Heart"} <= set(card.test_metrics)
    # An infinite distance (a structure missed in some case) stays in the CSV, out of the card.
    finite = all(math.isfinite(float(r["hd95_mm"])) for r in rows)
    assert ("test_hd95_mm" in card.test_metrics) == finite
    strict = json.loads((out / "model_card.json").read_text(), parse_constant=_refuse)
    assert strict["test_metrics"] == card.test_metrics


def _refuse(constant: str) -> float:
    raise AssertionError(f"{constant} is not JSON")


def test_commands_train_and_evaluate(tmp_path: Path) -> None:
    runner = CliRunner()
    data = ["--data", "synthetic:3", "--synthetic-shape", "8x32x32"]
    small = ["--width", "8", "--epochs", "1", "--pixel-spacing", "12", "--crop", "32", "--quiet"]
    result = runner.invoke(train_command, [*data, *small, "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "model.pt").is_file()
    split = json.loads((tmp_path / "m" / "split.json").read_text())
    assert all(len(split[k]) == 1 for k in ("train", "val", "test"))
    assert "mIoU" in result.output and "test (1 cases)" in result.output
    assert_test_scored(tmp_path / "m", split)
    out = tmp_path / "r.csv"
    result = runner.invoke(evaluate_command, [str(tmp_path / "m" / "model.pt"), *data, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "mIoU" in result.output and out.is_file()
    assert "nifti:FOLDER" in runner.invoke(train_command, ["--help"]).output


@pytest.mark.slow  # a training run
def test_command_trains_the_vnet_and_scores_its_test_cases(tmp_path: Path) -> None:
    runner = CliRunner()
    data = ["--data", "synthetic:7", "--synthetic-shape", "16x32x32"]  # 12 mm pixels, 16 mm slices
    small = ["--width", "4", "--epochs", "1", "--pixel-spacing", "12", "--crop", "32", "--batch-size", "2"]
    out = tmp_path / "vnet"
    args = [*data, *small, "--arch", "vnet", "--patch", "16x32x32", "--quiet", "--out", str(out)]
    result = runner.invoke(train_command, args)
    assert result.exit_code == 0, result.output
    split = json.loads((out / "split.json").read_text())
    assert len(split["test"]) == 1 and len(split["train"]) == 5
    assert_test_scored(out, split)
    _, card = load_checkpoint(out / "model.pt")
    assert card.architecture == "vnet" and card.patch_size == (16, 32, 32)
    refused = runner.invoke(train_command, [*args[:-1], str(tmp_path / "x"), "--patch", "16x32x30"])
    assert refused.exit_code == 2 and "multiples of 16" in refused.output


def test_nifti_pair_reads_back_a_phantom(tmp_path: Path) -> None:
    phantom = synthetic.make_phantom((8, 32, 32), (30.0, 12.0, 12.0), seed=5)
    volume_files.write_nifti(phantom, tmp_path / "a.nii.gz", tmp_path / "l.nii.gz")
    case = datasets.read_nifti_pair(tmp_path / "a.nii.gz", tmp_path / "l.nii.gz")
    assert np.array_equal(case.labels, phantom.labels) and np.array_equal(case.hu, phantom.hu)
    assert case.spacing == phantom.spacing and case.case_id == "a"


@pytest.mark.slow  # real data: in CI, not in the edit loop
def test_rtstruct_reader_on_the_real_thorax() -> None:
    (case,) = datasets.read_rtstruct_folder(THORAX)
    n = case.hu.shape[0]
    assert case.hu.shape == (111, 512, 512) and case.spacing[0] == pytest.approx(3.0)
    assert -1100 < case.hu.min() < -900 and case.hu.max() > 500  # air and bone, in HU
    names = {name: label for label, name in case.label_names.items()}
    for lung in ("Right lung", "Left lung"):
        assert 1000 < case.volume_ml(names[lung]) < 4000
    assert 300 < case.volume_ml(names["Heart"]) < 1500
    start, stop = case.z_ranges[names["Esophagus"]]
    assert stop - start < n
    cord = case.z_ranges[names["Spinal cord"]]
    assert cord[1] - cord[0] <= n  # this cord is contoured on every slice
    assert case.z_ranges[names["Heart"]][1] - case.z_ranges[names["Heart"]][0] < n // 2
