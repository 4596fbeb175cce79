"""A real nnU-Net v2 model, made small: synthetic phantoms written as an nnU-Net raw dataset, planned,
preprocessed and trained by nnU-Net's own commands (one epoch, a narrow 2D network), so the node's
nnunet kind is tested against the folder layout and predictor a site's model has."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from segmenters.synthetic import make_phantom
from segmenters.volume_files import write_nifti

DATASET_ID = 987
DATASET = f"Dataset{DATASET_ID}_SegnodePhantoms"
PLANS = "nnUNetPlans_tiny"
TRAINER = "nnUNetTrainer_1epoch"
# The phantoms' own label names: anatomy-table keys, so the model's labels are coded by name.
LABELS = {"background": 0, "body": 1, "right_lung": 2, "left_lung": 3, "heart": 4}


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


def train_tiny_nnunet(root: Path, cases: int = 6) -> Path:
    """Train the model under ``root``; returns its trained-model folder (fold ``all``)."""
    raw, preprocessed, results = root / "raw", root / "preprocessed", root / "results"
    env = {
        **os.environ,
        "nnUNet_raw": str(raw),
        "nnUNet_preprocessed": str(preprocessed),
        "nnUNet_results": str(results),
        "nnUNet_compile": "false",
    }
    dataset = raw / DATASET
    (dataset / "imagesTr").mkdir(parents=True, exist_ok=True)
    (dataset / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        phantom = make_phantom(shape=(24, 96, 96), spacing=(8.0, 4.0, 4.0), seed=500 + i)
        lut = np.zeros(256, dtype=np.uint8)  # the phantom's labels to the dataset's; others background
        for s in phantom.structures:
            lut[s.label] = LABELS.get(s.name.lower().replace(" ", "_"), 0)
        phantom.labels[:] = lut[phantom.labels]
        write_nifti(
            phantom,
            dataset / "imagesTr" / f"case_{i:03d}_0000.nii.gz",
            dataset / "labelsTr" / f"case_{i:03d}.nii.gz",
        )
    (dataset / "dataset.json").write_text(
        json.dumps(
            {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": cases, "file_ending": ".nii.gz"}
        )
    )
    _run(env, "nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "1", "--no_pp")
    plans_file = preprocessed / DATASET / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["plans_name"] = PLANS
    config = plans["configurations"]["2d"]
    config["batch_size"] = 4
    arch = config["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [min(8 * 2**i, 64) for i in range(arch["n_stages"])]
    (preprocessed / DATASET / f"{PLANS}.json").write_text(json.dumps(plans, indent=2))
    _run(env, "nnUNetv2_preprocess", "-d", str(DATASET_ID), "-plans_name", PLANS, "-c", "2d", "-np", "1")
    # Data augmentation in the training process itself: no worker pool, so the seeds reach it
    # (planning needs the variable unset).
    train = [str(DATASET_ID), "2d", "all", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"]
    _check([sys.executable, "-c", SEEDED_TRAIN, *train], {**env, "nnUNet_n_proc_DA": "0"}, "nnUNetv2_train")
    return results / DATASET / f"{TRAINER}__{PLANS}__2d"
