"""A real nnU-Net v2 model, made small: synthetic phantoms written as an nnU-Net raw dataset, planned,
preprocessed and trained by nnU-Net's own commands (one epoch, a narrow 2D network), so the node's
nnunet and totalsegmentator kinds are tested against the folder layout and predictor a site's model has."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segmenters.synthetic import make_phantom
from segmenters.volume_files import write_nifti

PLANS = "nnUNetPlans_tiny"
TRAINER = "nnUNetTrainer_1epoch"


@dataclass(frozen=True)
class TinyDataset:
    """What the tiny model learns: its dataset's id and name, and its labels with, for each, the
    phantom structures it covers (snake-case names; ``*`` is the whole body)."""

    id: int
    name: str
    labels: dict[str, tuple[str, ...]]

    @property
    def folder(self) -> str:
        return f"Dataset{self.id}_{self.name}"


# The phantoms' own label names: anatomy-table keys, so the model's labels are coded by name.
PHANTOMS = TinyDataset(
    987,
    "SegnodePhantoms",
    {"body": ("body",), "right_lung": ("right_lung",), "left_lung": ("left_lung",), "heart": ("heart",)},
)
# TotalSegmentator's body task labels the trunk and the extremities (the phantoms have no limbs).
TOTALSEGMENTATOR_BODY = TinyDataset(300, "body_6mm_1559subj", {"body_trunc": ("*",), "body_extremities": ()})


def _run(env: dict[str, str], name: str, *args: str) -> None:
    """One of nnU-Net's commands (installed beside this Python), its output shown if it fails."""
    _check([str(Path(sys.executable).with_name(name)), *args], env, name)


def _check(command: list[str], env: dict[str, str], name: str) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{name} {' '.join(command[1:])} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )


# nnUNetv2_train's own entry point, with every random generator it draws from seeded first: nnU-Net
# seeds none, and an unseeded epoch learns the right lung one run and not the next.
SEEDED_TRAIN = (
    "import random, sys, numpy, torch; random.seed(0); numpy.random.seed(0); torch.manual_seed(0); "
    "from nnunetv2.run.run_training import run_training_entry; run_training_entry()"
)


def train_tiny_nnunet(root: Path, cases: int = 6, dataset: TinyDataset = PHANTOMS) -> Path:
    """Train the model under ``root``; returns its trained-model folder (fold ``all``)."""
    raw, preprocessed, results = root / "raw", root / "preprocessed", root / "results"
    env = {
        **os.environ,
        "nnUNet_raw": str(raw),
        "nnUNet_preprocessed": str(preprocessed),
        "nnUNet_results": str(results),
        "nnUNet_compile": "false",
    }
    folder = raw / dataset.folder
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    labels = {"background": 0} | {name: value for value, name in enumerate(dataset.labels, start=1)}
    for i in range(cases):
        phantom = make_phantom(shape=(24, 96, 96), spacing=(8.0, 4.0, 4.0), seed=500 + i)
        lut = np.zeros(256, dtype=np.uint8)  # the phantom's labels to the dataset's; others background
        for s in phantom.structures:
            for name, covers in dataset.labels.items():
                if "*" in covers or s.name.lower().replace(" ", "_") in covers:
                    lut[s.label] = labels[name]
        phantom.labels[:] = lut[phantom.labels]
        write_nifti(
            phantom,
            folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz",
            folder / "labelsTr" / f"case_{i:03d}.nii.gz",
        )
    (folder / "dataset.json").write_text(
        json.dumps(
            {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": cases, "file_ending": ".nii.gz"}
        )
    )
    _run(env, "nnUNetv2_plan_and_preprocess", "-d", str(dataset.id), "-c", "2d", "-np", "1", "--no_pp")
    plans_file = preprocessed / dataset.folder / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["plans_name"] = PLANS
    config = plans["configurations"]["2d"]
    config["batch_size"] = 4
    arch = config["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [min(8 * 2**i, 64) for i in range(arch["n_stages"])]
    (preprocessed / dataset.folder / f"{PLANS}.json").write_text(json.dumps(plans, indent=2))
    _run(env, "nnUNetv2_preprocess", "-d", str(dataset.id), "-plans_name", PLANS, "-c", "2d", "-np", "1")
    # Data augmentation in the training process itself: no worker pool, so the seeds reach it
    # (planning needs the variable unset).
    train = [str(dataset.id), "2d", "all", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"]
    _check([sys.executable, "-c", SEEDED_TRAIN, *train], {**env, "nnUNet_n_proc_DA": "0"}, "nnUNetv2_train")
    return results / dataset.folder / f"{TRAINER}__{PLANS}__2d"


def install_as_totalsegmentator_weights(model: Path, home: Path) -> None:
    """Place a tiny body model where TotalSegmentator looks for its ``body`` task's fast weights under
    TOTALSEG_HOME_DIR; nnU-Net's predictor takes the trainer and configuration from the checkpoint,
    so the folder's name is TotalSegmentator's and the network the tiny one."""
    target = (
        home / "nnunet" / "results" / TOTALSEGMENTATOR_BODY.folder / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    )
    target.mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy(model / name, target / name)
    (target / "fold_0").mkdir()
    shutil.copy(model / "fold_all" / "checkpoint_final.pth", target / "fold_0" / "checkpoint_final.pth")
