"""segnode evaluate's scoring: every structure over the whole volume, so labels far from the
reference count; a slice-range restriction only for the structures the user names."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml

from segmenters import anatomy
from segmenters.base import AlgorithmInfo, Structure, Volume
from segmenters.datasets import Case
from segmenters.evaluation import score
from segmenters.served.runner import ARTIFICIAL_INTELLIGENCE

LUNG = anatomy.structure(1, "right_lung")


class FixedSegmenter:
    """A segmenter whose answer is given: the reference plus labels on slices it does not cover."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    @property
    def algorithm(self) -> AlgorithmInfo:
        return AlgorithmInfo("fixed", "1", ARTIFICIAL_INTELLIGENCE)

    @property
    def structures(self) -> Sequence[Structure]:
        return [LUNG]

    def predict(self, volume: Volume) -> np.ndarray:
        assert volume.hu.shape == self.labels.shape
        return self.labels


def _case() -> Case:
    labels = np.zeros((30, 32, 32), dtype=np.uint8)
    labels[10:20, 8:24, 8:24] = 1  # the reference covers slices 10..19
    hu = np.where(labels > 0, -800, 40).astype(np.int16)
    return Case("c", hu, labels, (2.0, 1.0, 1.0), {1: "Right lung"}, {1: (10, 20)})


def test_false_positives_far_outside_the_references_slices_are_penalised() -> None:
    case = _case()
    predicted = case.labels.copy()
    predicted[0:10, 8:24, 8:24] = 1  # as much again, on slices the reference never reaches
    segmenter = FixedSegmenter(predicted)

    (whole,) = score(segmenter, case, "fixed")
    assert whole.structure == "Right lung"
    assert abs(whole.dice - 2 / 3) < 1e-6  # 2 x 2,560 / (5,120 + 2,560)
    assert whole.hd95_mm > 10.0  # the extra block lies up to 20 mm from the reference

    (restricted,) = score(segmenter, case, "fixed", reference_slices_only=["RIGHT LUNG"])
    assert restricted.dice == 1.0 and restricted.hd95_mm == 0.0


def test_a_perfect_prediction_scores_one_either_way() -> None:
    case = _case()
    segmenter = FixedSegmenter(case.labels.copy())
    for restrict in ([], ["Right lung"]):
        (row,) = score(segmenter, case, "fixed", reference_slices_only=restrict)
        assert (row.dice, row.iou, row.hd95_mm) == (1.0, 1.0, 0.0)


@pytest.mark.slow  # three segmenters on the real thorax
def test_evaluate_scores_installed_configured_and_served_segmenters_in_one_table(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from node.cli import main
    from segmenters.registry import DEMO_CHECKPOINT
    from tests.shared_data import THORAX

    runner = CliRunner()
    exported = runner.invoke(
        main, ["export", str(DEMO_CHECKPOINT), "--format", "torchscript", "--out", str(tmp_path / "ts")]
    )
    assert exported.exit_code == 0, exported.output
    config = tmp_path / "segnode.yaml"
    declared = {
        "demo-ts": {"torchscript": str(tmp_path / "ts" / "model.ts"), "device": "cpu", "crop_to_body": True}
    }
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "segmenters": declared}))
    out = tmp_path / "scores.csv"
    # The shared thorax folder as the archive exported it: CT, RTSTRUCT and a SEG of the tumour.
    args = [
        "classical",
        "demo-ts",
        str(DEMO_CHECKPOINT),
        "--data",
        f"dicom-rtstruct:{THORAX}",
        "--out",
        str(out),
    ]
    ran = runner.invoke(
        main, ["--config", str(config), "evaluate", *args, "--exclude", "GTV-1:Lung_R,Lung_L"]
    )
    assert ran.exit_code == 0, ran.output
    header = ran.stdout.splitlines()[0]
    assert "classical" in header and "demo-ts" in header and "demo-thorax-unet.pt" in header
    assert "classical: case 1/1 (ct-thorax-lung1-002) scored in" in ran.stderr  # progress, apart
    rows = list(csv.DictReader(out.open()))
    scored = {(r["checkpoint"], r["structure"]) for r in rows}
    assert {("classical", "Right lung"), ("demo-ts", "Heart"), (str(DEMO_CHECKPOINT), "Heart")} <= scored
    assert all(r["case"] == "ct-thorax-lung1-002" for r in rows)
    refused = runner.invoke(
        main, ["--config", str(config), "evaluate", "no-such", "--data", "synthetic:1", "--out", str(out)]
    )
    assert refused.exit_code != 0 and "no-such is neither a segmenter a worker knows (" in refused.output
    assert "demo-ts" in refused.output  # the configured names too, not only the installed ones
