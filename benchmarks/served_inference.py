"""Slices per second of each kind of served model, side by side, through the worker's own loaders.

    .venv/bin/python -m benchmarks.served_inference [--device cpu|cuda] [--slices N] [--width W]
                                                    [--nnunet MODEL_FOLDER] [--repeats R]
                                                    [--totalsegmentator TOTALSEG_HOME_DIR]

One U-Net (random weights: speed does not depend on them) saved as a segnode checkpoint and exported
by ``segnode export`` to TorchScript, ONNX and a MONAI bundle; each is loaded the way a worker loads
it and segments the same ``--slices`` x 512 x 512 volume of CT numbers at the network's own pixel
spacing (no resampling), after one warm-up call. ``--nnunet`` adds a trained nnU-Net v2 folder
(nnU-Net's predictor, its own plans: resampling, mirroring and sliding window included), which is a
different network, so its row says what nnU-Net's pipeline costs, not what the format costs.
``--totalsegmentator`` adds TotalSegmentator's fast body task from that weights folder (its own
resampling to 6 mm, worker processes and post-processing around nnU-Net). Best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from segmenters import anatomy
from segmenters.base import Segmenter, Volume
from segmenters.checkpoint import ModelCard, NetworkSegmenter, save_checkpoint
from segmenters.networks import build_network
from segmenters.served.export import export
from segmenters.served.loading import load_served

STRUCTURES = tuple(
    anatomy.structure(i + 1, k) for i, k in enumerate(("body", "right_lung", "left_lung", "heart"))
)


def _checkpoint(folder: Path, width: int) -> Path:
    card = ModelCard(
        name="benchmark-unet",
        version="1",
        architecture="unet",
        width=width,
        context_slices=0,
        structures=STRUCTURES,
        pixel_spacing_mm=None,
        window=(-1000.0, 1000.0),
    )
    path = folder / "model.pt"
    save_checkpoint(path, build_network("unet", 1, len(STRUCTURES) + 1, width=width), card)
    return path


def _time(segmenter: Segmenter, volume: Volume, repeats: int) -> float:
    segmenter.predict(Volume(volume.hu[:8], volume.spacing))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        segmenter.predict(volume)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nnunet", type=Path, help="a trained nnU-Net v2 model folder to time beside them")
    parser.add_argument(
        "--totalsegmentator", type=Path, help="a TOTALSEG_HOME_DIR with the weights of its fast body task"
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    volume = Volume(rng.integers(-1000, 1000, (args.slices, 512, 512)).astype(np.int16), (2.0, 0.8, 0.8))
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = _checkpoint(folder, args.width)
        served: dict[str, Segmenter] = {
            "checkpoint (torch)": NetworkSegmenter(checkpoint, device=args.device, amp=False)
        }
        for kind in ("torchscript", "onnx", "monai_bundle"):
            path = export(checkpoint, kind, folder / kind)
            served[kind] = load_served(kind, path, device=args.device, amp=False)
        if args.nnunet:
            served["nnunet (its own network)"] = load_served("nnunet", args.nnunet, device=args.device)
        if args.totalsegmentator:
            from segmenters.served.totalsegmentator import TotalSegmentatorSegmenter

            os.environ["TOTALSEG_HOME_DIR"] = str(args.totalsegmentator.resolve())
            served["totalsegmentator body fast"] = TotalSegmentatorSegmenter(
                "body", fast=True, device=torch.device(args.device)
            )
        for name, segmenter in served.items():
            seconds = _time(segmenter, volume, args.repeats)
            rows.append((name, seconds))
            print(f"{name:<28} {seconds:7.2f} s  {args.slices / seconds:7.1f} slices/s", flush=True)
    base = rows[0][1]
    print(
        f"\n{args.slices} x 512 x 512 on {args.device}, U-Net width {args.width}; "
        "ratio = checkpoint time / kind time"
    )
    for name, seconds in rows:
        print(f"{name:<28} ratio {base / seconds:5.2f}")


if __name__ == "__main__":
    main()
