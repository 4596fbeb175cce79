"""Networks served from other formats: TorchScript, ONNX and MONAI bundle exports of a network
`segnode train` made give the checkpoint's labels; a card's orientation and spacing reach the
network; a label without a code is refused before any SEG is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from node.cli import main
from segmenters.base import Volume
from segmenters.checkpoint import NetworkSegmenter
from segmenters.registry import DEMO_CHECKPOINT
from segmenters.served.card import ModelCardError, read_card
from segmenters.served.export import FORMATS
from segmenters.served.loading import load_served, served_card
from segmenters.synthetic import make_phantom
from tests.dicom_factory import make_ct_series

Axes = tuple[tuple[float, float, float], ...]
KINDS = {"torchscript": "model.ts", "onnx": "model.onnx", "monai_bundle": "."}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo network exported by `segnode export` in every format."""
    root = tmp_path_factory.mktemp("exports")
    paths = {}
    for fmt in FORMATS:
        ran = CliRunner().invoke(
            main, ["export", str(DEMO_CHECKPOINT), "--format", fmt, "--out", str(root / fmt)]
        )
        assert ran.exit_code == 0, ran.output
        paths[fmt] = (root / fmt / KINDS[fmt]).resolve()
        assert paths[fmt].exists()
    return paths


@pytest.mark.slow  # exports in three formats first: about 10 s
@pytest.mark.parametrize("kind", FORMATS)
def test_an_export_serves_the_labels_of_its_checkpoint(exports: dict[str, Path], kind: str) -> None:
    # Not the demo model's own grid: 2.5 mm pixels are resampled to its 3 mm on the way in and out.
    volume = make_phantom(shape=(20, 150, 150), spacing=(6.0, 2.5, 2.5), seed=7).volume()
    checkpoint = NetworkSegmenter(DEMO_CHECKPOINT, device="cpu", amp=False)
    served = load_served(kind, exports[kind], device="cpu", amp=False)
    expected = checkpoint.predict(volume)
    labels = served.predict(volume)
    assert labels.shape == volume.hu.shape and labels.dtype == np.uint8
    assert len(np.unique(expected)) >= 5
    # TorchScript and the bundle run the same torch code; onnxruntime's arithmetic may tip a voxel.
    agreement = float((labels == expected).mean())
    assert agreement == 1.0 if kind != "onnx" else agreement > 0.999
    assert served.structures == checkpoint.structures  # codes, names and colours travel with it
    assert served.algorithm == checkpoint.algorithm


class _RisesAlongFirstAxis(nn.Module):
    """A 3D "network" that labels 1 where CT numbers rise along the first array axis: it answers
    only if the series reaches it in the orientation its card names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rise = torch.zeros_like(x)
        rise[:, :, :-1] = x[:, :, 1:] - x[:, :, :-1]
        rise[:, :, -1] = rise[:, :, -2]
        return torch.cat([torch.zeros_like(x), rise * 1000.0], dim=1)


def _ramp_towards_patient_right(axes_lps: Axes, shape: tuple[int, ...]) -> Volume:
    """A volume whose CT numbers rise towards the patient's right (-x in DICOM's LPS), stored with
    its array axes along ``axes_lps``."""
    spacing = (4.0, 1.5, 1.5)
    grid = np.indices(shape).astype(np.float64)
    x_mm = sum(grid[i] * spacing[i] * axes_lps[i][0] for i in range(3))
    return Volume(hu=(-2.0 * x_mm).astype(np.float32), spacing=spacing, axes_lps=axes_lps)


SUPINE = ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0))
PRONE = ((0.0, 0.0, 1.0), (0.0, -1.0, 0.0), (-1.0, 0.0, 0.0))
FEET_FIRST = ((0.0, 0.0, -1.0), (0.0, 1.0, 0.0), (-1.0, 0.0, 0.0))
CORONAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (1.0, 0.0, 0.0))


def _scripted_card(folder: Path, orientation: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(_RisesAlongFirstAxis()), str(folder / "model.ts"))
    card = {
        "name": "rises-along-x",
        "version": "2",
        "labels": [{"label": 1, "anatomy": "body"}],
        "window": [-1000, 1000],
        "spatial_dims": 3,
        "patch_size": [16, 16, 16],
        "spacing_mm": [2.0, 2.0, 2.0],
        "orientation": orientation,
    }
    (folder / "model_card.json").write_text(json.dumps(card))
    return folder / "model.ts"


@pytest.mark.parametrize(
    "axes", [SUPINE, PRONE, FEET_FIRST, CORONAL], ids=["supine", "prone", "feet-first", "coronal"]
)
def test_the_network_gets_the_orientation_and_spacing_its_card_names(tmp_path: Path, axes: Axes) -> None:
    volume = _ramp_towards_patient_right(axes, (12, 40, 36))
    # RAS: the first array axis grows towards the patient's right, so the ramp rises along it.
    right = load_served("torchscript", _scripted_card(tmp_path / "ras", "RAS"), device="cpu")
    labels = right.predict(volume)
    assert labels.shape == volume.hu.shape  # resampled to 2 mm and back to the series grid
    assert (labels == 1).mean() > 0.95
    # LAS: the same network told the first axis grows to the left sees the ramp fall: nothing.
    left = load_served("torchscript", _scripted_card(tmp_path / "las", "LAS"), device="cpu")
    assert (left.predict(volume) == 1).mean() < 0.05


def _card(tmp_path: Path, **changes: object) -> Path:
    card: dict[str, object] = {
        "name": "thorax",
        "labels": [{"label": 1, "anatomy": "heart"}, {"label": 2, "anatomy": "left_lung"}],
        "window": [-1000, 1000],
    }
    card.update(changes)
    path = tmp_path / "model_card.json"
    path.write_text(json.dumps(card))
    return path


def test_a_card_codes_labels_by_the_anatomy_table_or_by_its_own_code(tmp_path: Path) -> None:
    liver = {
        "label": 3,
        "name": "Liver",
        "type": {"value": "10200004", "meaning": "Liver"},
        "rgb": [221, 130, 101],
    }
    card = read_card(_card(tmp_path, labels=[{"label": 1, "anatomy": "heart"}, liver], pixel_spacing_mm=1.5))
    heart, own = card.structures
    assert (heart.type.value, heart.type.scheme, heart.name) == ("80891009", "SCT", "Heart")
    assert (own.type.value, own.type.meaning, own.name, own.rgb) == (
        "10200004",
        "Liver",
        "Liver",
        (221, 130, 101),
    )
    assert card.spacing_mm == (0.0, 1.5, 1.5) and card.orientation == "SPL" and card.spatial_dims == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"labels": [{"label": 1, "name": "liver"}]}, "label 1 \\(liver\\) has no code"),
        (
            {"labels": [{"label": 4, "anatomy": "spleen"}]},
            "label 4: no structure 'spleen' in the anatomy table",
        ),
        ({"labels": [{"label": 1, "anatomy": "heart"}, {"label": 1, "anatomy": "body"}]}, "given twice"),
        ({"labels": []}, '"labels" lists the structures'),
        ({"window": [100, -100]}, "high > low"),
        ({"orientation": "SPP"}, "orientation 'SPP' must give each array axis' direction"),
        ({"spatial_dims": 3}, 'a 3D network needs "patch_size"'),
        ({"pixel_spacing_mm": 1, "spacing_mm": [1, 1, 1]}, "not both"),
    ],
)
def test_cards_that_cannot_serve_are_refused_with_the_reason(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ModelCardError, match=message):
        read_card(_card(tmp_path, **changes))


@pytest.mark.slow
def test_a_bundle_is_read_from_its_inference_config_and_refused_when_the_node_cannot_reproduce_it(
    exports: dict[str, Path], tmp_path: Path
) -> None:
    card = served_card("monai_bundle", exports["monai_bundle"])
    assert card.spacing_mm == (0.0, 3.0, 3.0) and card.window == (-1000.0, 1000.0)
    assert card.context_slices == 1 and card.spatial_dims == 2

    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    config = json.loads((exports["monai_bundle"] / "configs" / "inference.json").read_text())
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    metadata = {
        "network_data_format": {"outputs": {"pred": {"channel_def": {"0": "background", "1": "Spleen"}}}}
    }
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelCardError, match="label 1 'Spleen' has no code in the anatomy table"):
        served_card("monai_bundle", bundle)
    config["preprocessing"]["transforms"].append({"_target_": "NormalizeIntensityd", "keys": "image"})
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(ModelCardError, match="transform NormalizeIntensityd is not one the node reproduces"):
        served_card("monai_bundle", bundle)


@pytest.mark.slow
def test_config_check_refuses_a_network_whose_labels_are_not_coded(
    exports: dict[str, Path], tmp_path: Path
) -> None:
    uncoded = tmp_path / "uncoded"
    uncoded.mkdir()
    (uncoded / "model.onnx").write_bytes(exports["onnx"].read_bytes())
    _card(uncoded, labels=[{"label": 1, "name": "tumour"}])
    config = tmp_path / "segnode.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "segmenters": {
                    "good": {"torchscript": str(exports["torchscript"])},
                    "bundle": {"monai_bundle": str(exports["monai_bundle"])},
                    "bad": {"onnx": str(uncoded / "model.onnx")},
                },
                "rules": [{"name": "r", "segmenter": "bad"}],
            }
        )
    )
    ran = CliRunner().invoke(main, ["--config", str(config), "config", "check"])
    assert ran.exit_code != 0
    assert "segmenter 'bad': model card" in ran.output and "label 1 (tumour) has no code" in ran.output
    assert "'good'" not in ran.output.split("Segmenter")[0]  # the good ones raise nothing
    assert "torchscript network" in ran.output and "monai_bundle network" in ran.output


@pytest.mark.slow
def test_config_check_refuses_a_served_model_that_lacks_a_file_it_loads(
    exports: dict[str, Path], tmp_path: Path
) -> None:
    """What a worker would fail on when it loads the model is said by `config check` first."""
    import onnx

    assert sorted(p.name for p in exports["onnx"].parent.iterdir()) == ["model.onnx", "model_card.json"]
    split = tmp_path / "onnx"  # weights kept beside the graph, then left behind in a copy
    split.mkdir()
    shutil.copy(exports["onnx"].parent / "model_card.json", split)
    onnx.save_model(
        onnx.load(str(exports["onnx"])),
        str(split / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    (split / "model.onnx.data").unlink()
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    shutil.copy(exports["onnx"].parent / "model_card.json", garbled)
    (garbled / "model.onnx").write_bytes(exports["onnx"].read_bytes()[:1000])
    bundle = tmp_path / "bundle"
    shutil.copytree(exports["monai_bundle"], bundle)
    (bundle / "models" / "model.pt").unlink()
    nnunet = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (nnunet / "fold_0").mkdir(parents=True)
    (nnunet / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    (nnunet / "plans.json").write_text("{}")
    (nnunet / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "heart": 1}}))
    negative = tmp_path / "negative"
    negative.mkdir()
    shutil.copy(exports["torchscript"], negative)
    card = json.loads((exports["torchscript"].parent / "model_card.json").read_text())
    (negative / "model_card.json").write_text(json.dumps({**card, "context_slices": -1}))
    declared = {
        "split": {"onnx": str(split / "model.onnx")},
        "garbled": {"onnx": str(garbled / "model.onnx")},
        "unweighted": {"monai_bundle": str(bundle)},
        "folds": {"nnunet": str(nnunet), "folds": [0, 3]},
        "negative": {"torchscript": str(negative / "model.ts")},
    }
    config = tmp_path / "segnode.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "segmenters": declared}))
    ran = CliRunner().invoke(main, ["--config", str(config), "config", "check"])
    assert ran.exit_code != 0
    assert "segmenter 'split': ONNX model" in ran.output and "model.onnx.data are not beside it" in ran.output
    assert "segmenter 'garbled': ONNX model" in ran.output and "cannot be read (DecodeError)" in ran.output
    assert "segmenter 'unweighted': MONAI bundle" in ran.output and "no models/model.pt" in ran.output
    assert "fold(s) 3 hold no checkpoint_final.pth; trained: 0" in ran.output
    assert '"context_slices" is zero or more; got -1' in ran.output
    config.write_text(yaml.safe_dump({"segmenters": {"g": {"torchscript": "m.ts", "device": "gpu"}}}))
    ran = CliRunner().invoke(main, ["--config", str(config), "config", "check"])
    assert ran.exit_code != 0 and "segmenters.g.device" in ran.output


@pytest.mark.slow
def test_segment_says_in_one_line_why_a_model_failed(exports: dict[str, Path], tmp_path: Path) -> None:
    """A card that does not fit its network fails in torch's own code: one line, not its traceback."""
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    shutil.copy(exports["torchscript"], wrong)
    card = json.loads((exports["torchscript"].parent / "model_card.json").read_text())
    (wrong / "model_card.json").write_text(json.dumps({**card, "context_slices": 2}))
    config = tmp_path / "segnode.yaml"
    config.write_text(yaml.safe_dump({"segmenters": {"wrong": {"torchscript": str(wrong / "model.ts")}}}))
    series = make_ct_series(tmp_path / "ct", n_slices=4, rows=64, cols=64)[0].parent
    args = [
        "--config",
        str(config),
        "segment",
        str(series),
        "--segmenter",
        "wrong",
        "--out",
        str(tmp_path / "o"),
    ]
    ran = CliRunner().invoke(main, args)
    assert ran.exit_code == 1
    (line,) = [line for line in ran.output.splitlines() if line.strip()]
    assert line.startswith("Error: segmenter wrong failed on the series: RuntimeError: ")
    assert "channels" in line and "Traceback" not in ran.output


def test_an_nnunet_model_folder_codes_its_labels_by_name_or_by_its_card(tmp_path: Path) -> None:
    from segmenters.served.nnunet import nnunet_labels

    folder = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir()
    (folder / "plans.json").write_text("{}")
    # A SEG's name for a structure is coded too; nnU-Net's "ignore" is never in a model's output.
    labels = {"background": 0, "Left lung": 1, "heart": 2, "Trachea and bronchi": 3, "ignore": 9}
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    structures, orientation = nnunet_labels(folder)
    assert [(s.label, s.name, s.type.value) for s in structures] == [
        (1, "Left lung", "39607008"),
        (2, "Heart", "80891009"),
        (3, "Trachea and bronchi", "110726009"),
    ]
    assert structures[0].laterality is not None and structures[0].laterality.meaning == "Left"
    assert orientation == "SPL"

    (folder / "dataset.json").write_text(json.dumps({"labels": {**labels, "tumour": 4}}))
    with pytest.raises(ModelCardError, match="label 4 'tumour' has no code in the anatomy table"):
        nnunet_labels(folder)
    tumour = {"label": 4, "name": "Tumour", "type": {"value": "108369006", "meaning": "Neoplasm"}}
    coded = [{"label": 1, "anatomy": "left_lung"}, {"label": 2, "anatomy": "heart"}, tumour]
    _card(folder, labels=coded)
    with pytest.raises(ModelCardError, match=r"codes no label 3 \(Trachea and bronchi\)"):
        nnunet_labels(folder)  # a card that leaves a label of the model out
    _card(folder, labels=[*coded, {"label": 3, "anatomy": "airways"}], orientation="ras")
    structures, orientation = nnunet_labels(folder)
    assert [s.name for s in structures] == ["Left lung", "Heart", "Tumour", "Trachea and bronchi"]
    assert orientation == "RAS"
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lungs": [1, 2]}}))
    with pytest.raises(ModelCardError, match="region-based models are not served"):
        nnunet_labels(folder)


def test_totalsegmentator_tasks_are_coded_by_its_published_mapping() -> None:
    from segmenters.served.totalsegmentator import task_structures

    total = task_structures("total")
    assert len(total) == 117 and [s.label for s in total] == list(range(1, 118))
    assert all(s.type.scheme == "SCT" and s.type.value.isdigit() for s in total)
    by_name = {s.name: s for s in total}
    assert by_name["heart"].type.value == "80891009"
    left_upper = by_name["lung_upper_lobe_left"]
    assert left_upper.type.meaning == "Upper lobe of lung" and left_upper.laterality is not None
    assert left_upper.laterality.meaning == "Left"
    subset = task_structures("total", ["heart", "esophagus"])
    assert [(s.label, s.name) for s in subset] == [(15, "esophagus"), (51, "heart")]
    with pytest.raises(ModelCardError, match="has no class hearts"):
        task_structures("total", ["hearts"])
    with pytest.raises(ModelCardError, match="is for MR images"):
        task_structures("total_mr")
    with pytest.raises(ModelCardError, match="has no task 'totally'"):
        task_structures("totally")


def test_totalsegmentator_without_its_weights_is_refused_with_how_to_get_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "totalseg"))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    config = tmp_path / "segnode.yaml"
    declared = {"organs": {"totalsegmentator": "total", "roi_subset": ["heart", "aorta"], "device": "cpu"}}
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "segmenters": declared,
                "rules": [{"name": "r", "segmenter": "organs"}],
            }
        )
    )
    ran = CliRunner().invoke(main, ["--config", str(config), "config", "check"])
    assert ran.exit_code != 0
    assert "segmenter 'organs': TotalSegmentator's weights for task 'total' are not in" in ran.output
    # With a roi_subset TotalSegmentator first crops with its 6 mm model: a worker without it would
    # try to download it.
    assert "datasets 291, 292, 293, 294, 295, 298 (298: the model that crops" in ran.output
    assert "totalseg_download_weights -t total`" in ran.output
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    results = tmp_path / "totalseg" / "nnunet" / "results"
    for dataset in range(291, 296):  # the folders TotalSegmentator looks for, by their exact names
        (results / TASK_ID_WEIGHTS_CONFIGS[dataset]["foldername"]).mkdir(parents=True)
    (results / "Dataset298_something_else").mkdir()
    ran = CliRunner().invoke(main, ["--config", str(config), "config", "check"])
    assert ran.exit_code != 0 and "(datasets 298 (298: the model that crops" in ran.output
    (results / TASK_ID_WEIGHTS_CONFIGS[298]["foldername"]).mkdir()
    ran = CliRunner().invoke(main, ["--config", str(config), "config", "check"])
    assert ran.exit_code == 0, ran.output
    # Crop models as TotalSegmentator picks them from a task's configuration, and a licensed task.
    from segmenters.served.totalsegmentator import needed_weights

    assert needed_weights("lung_vessels") == [117, 297]  # its config asks for a robust crop
    assert needed_weights("teeth") == [113, 115, 298]  # its crop model is another task
    with pytest.raises(ModelCardError, match="needs a license: set it on the worker"):
        needed_weights("heartchambers_highres")
    # Loaded by a worker, it reports no run to TotalSegmentator's authors (its own default does).
    from segmenters.served.totalsegmentator import TotalSegmentatorSegmenter

    TotalSegmentatorSegmenter("total", roi_subset=["heart"], device=torch.device("cpu"))
    assert json.loads((tmp_path / "totalseg" / "config.json").read_text())["send_usage_stats"] is False
    assert "TotalSegmentator task total (heart, aorta) on cpu" in ran.output
