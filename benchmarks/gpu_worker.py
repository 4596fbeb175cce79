"""The worker's GPU path: a checkpoint served by NetworkSegmenter on CUDA, with and without AMP.

    python -m benchmarks.gpu_worker [--arch unet] [--slices 300] [--long 1000]

Builds an untrained network of the given architecture (speed does not depend on the weights), saves
it as a segnode checkpoint, loads it the way a worker does (NetworkSegmenter: once per process,
device "cuda", mixed precision on or off) and times predict() on a 512x512 volume after a warm-up.
Then a --long-slice volume shows that GPU memory stays bounded (slices go through in batches).
Prints slices/s, seconds, peak GPU memory, and the agreement of AMP and FP32 label maps.

Then two more ways a rule can serve a network, both with AMP:
  - cropped to the body (``crop_to_body: true``): the same network alone and behind
    BodyCroppedSegmenter, on a synthetic thorax of --crop-slices slices in a 600 mm field of view
    (the patient fills about a quarter of it), the classical body outline's time included;
  - the 3D V-Net (--vnet-width) through MONAI's sliding window, its patch read from the model card,
    on --vnet-slices slices.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from segmenters.base import ANATOMICAL_STRUCTURE, Concept, Segmenter, Structure, Volume
from segmenters.checkpoint import ModelCard, NetworkSegmenter, save_checkpoint
from segmenters.classical import body_mask
from segmenters.cropping import DEFAULT_MARGIN_MM, BodyCroppedSegmenter, crop_box
from segmenters.networks import build_network
from segmenters.synthetic import make_phantom

STRUCTURES = tuple(
    Structure(i, f"Structure {i}", ANATOMICAL_STRUCTURE, Concept("91723000", "Anatomical Structure"))
    for i in range(1, 7)
)


def timed_predict(segmenter: Segmenter, volume: Volume, device: torch.device) -> tuple[np.ndarray, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    labels = segmenter.predict(volume)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return labels, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--long", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop-slices", type=int, default=150)
    parser.add_argument("--vnet-width", type=int, default=16)
    parser.add_argument("--vnet-slices", type=int, default=96)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {name}")
    card = ModelCard(
        name=f"bench-{args.arch}",
        version="0",
        architecture=args.arch,
        width=args.width,
        context_slices=1,
        structures=STRUCTURES,
        pixel_spacing_mm=None,
        window=(-1000.0, 1000.0),
    )
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 400, (args.slices, 512, 512)).astype(np.int16)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.manual_seed(0)
        save_checkpoint(
            path, build_network(args.arch, card.in_channels, card.num_classes, width=args.width), card
        )
        results = {}
        for amp in (False, True):
            segmenter = NetworkSegmenter(path, device=device.type, amp=amp, batch_size=args.batch)
            timed_predict(segmenter, Volume(hu[:24], (1.0, 0.8, 0.8)), device)  # warm-up: kernels, cudnn
            labels, seconds = timed_predict(segmenter, Volume(hu, (1.0, 0.8, 0.8)), device)
            peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
            results[amp] = labels
            print(
                f"{args.arch} width {args.width}, AMP {'on (bf16)' if amp else 'off (fp32)'}: "
                f"{args.slices} slices in {seconds:.2f} s = {args.slices / seconds:.0f} slices/s, "
                f"peak GPU memory {peak:.0f} MiB"
            )
        agree = float(np.mean(results[True] == results[False]))
        print(f"AMP and FP32 label maps agree on {100 * agree:.2f}% of voxels")
        long_hu = rng.normal(0, 400, (args.long, 512, 512)).astype(np.int16)
        segmenter = NetworkSegmenter(path, device=device.type, amp=True, batch_size=args.batch)
        _, seconds = timed_predict(segmenter, Volume(long_hu, (1.0, 0.8, 0.8)), device)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        print(
            f"{args.long} slices with AMP: {seconds:.2f} s, peak GPU memory {peak:.0f} MiB (batches bound it)"
        )
        body_cropped(path, device, args)
        vnet(Path(tmp) / "vnet.pt", device, args)


def body_cropped(path: Path, device: torch.device, args: argparse.Namespace) -> None:
    """The network alone and cropped to the body, on a patient in a wide field of view."""
    field_mm = 600.0
    phantom = make_phantom(shape=(args.crop_slices, 512, 512), spacing=(2.0, field_mm / 512, field_mm / 512))
    volume = phantom.volume()
    network = NetworkSegmenter(path, device=device.type, amp=True, batch_size=args.batch)
    for name, segmenter in (("alone", network), ("cropped to the body", BodyCroppedSegmenter(network))):
        timed_predict(segmenter, Volume(volume.hu[:24], volume.spacing), device)  # warm-up
        labels, seconds = timed_predict(segmenter, volume, device)
        print(
            f"{args.arch} {name}, {args.crop_slices} slices in a {field_mm:.0f} mm field: {seconds:.2f} s "
            f"= {args.crop_slices / seconds:.0f} slices/s; {int(np.count_nonzero(labels))} voxels labelled"
        )
    box = crop_box(body_mask(volume), volume.spacing, DEFAULT_MARGIN_MM)
    assert box is not None, "the phantom has a body"
    shape = [s.stop - s.start for s in box]
    share = float(np.prod(shape)) / volume.hu.size
    print(f"cropped, the network saw {'x'.join(map(str, shape))} voxels: {100 * share:.0f}% of the series")


def vnet(path: Path, device: torch.device, args: argparse.Namespace) -> None:
    """The 3D V-Net served as a worker serves it: sliding windows of the card's patch size."""
    patch = (32, 96, 96)
    card = ModelCard(
        name="bench-vnet",
        version="0",
        architecture="vnet",
        width=args.vnet_width,
        context_slices=0,
        structures=STRUCTURES,
        pixel_spacing_mm=None,
        window=(-1000.0, 1000.0),
        patch_size=patch,
    )
    torch.manual_seed(0)
    save_checkpoint(path, build_network("vnet", 1, card.num_classes, width=args.vnet_width), card)
    segmenter = NetworkSegmenter(path, device=device.type, amp=True, batch_size=args.batch)
    rng = np.random.default_rng(1)
    hu = rng.normal(0, 400, (args.vnet_slices, 512, 512)).astype(np.int16)
    timed_predict(segmenter, Volume(hu[: patch[0]], (1.0, 0.8, 0.8)), device)  # warm-up
    _, seconds = timed_predict(segmenter, Volume(hu, (1.0, 0.8, 0.8)), device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    print(
        f"vnet width {args.vnet_width}, windows of {'x'.join(map(str, patch))} (from the model card), AMP: "
        f"{args.vnet_slices} slices in {seconds:.2f} s = {args.vnet_slices / seconds:.1f} slices/s, "
        f"peak GPU memory {peak:.0f} MiB"
    )


if __name__ == "__main__":
    main()
