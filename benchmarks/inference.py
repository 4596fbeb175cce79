"""Inference speed and memory of every network at its default width, on 512 x 512 CT.

    .venv/bin/python -m benchmarks.inference [--device cpu|cuda] [--amp] [--networks fcn,unet,...]
                                             [--batches N] [--volume-3d D H W] [--patch D H W]

Each network runs in a fresh subprocess, through ``predict_volume`` as the worker calls it (windowing,
padding, argmax and the copy back included), on random CT numbers:
  - 2D networks: batches of ``--batch-size`` (8) slices of 512 x 512; one batch to warm up, then
    ``--batches`` timed batches (1 on the CPU, 10 on a GPU, by default);
  - the 3D V-Net: MONAI's sliding window (``--patch``, 96^3, overlap 0.25, Gaussian blending) over a
    ``--volume-3d`` volume, warmed up on one patch; voxels/s, and the 512 x 512 slices/s they equal.

Memory: on the CPU, the subprocess's peak resident set (``ru_maxrss``) and how much the inference added
to it after the model was built; on a GPU, ``torch.cuda.max_memory_allocated`` over the timed run.
With ``--device cuda``, timing starts after warm-up and ``torch.cuda.synchronize``; ``--amp`` runs
under bfloat16 autocast. The CPU run uses every core (``torch.set_num_threads(os.cpu_count())``) and
takes roughly four minutes on two cores with the defaults (six with ``--batches 2``); UNet++ is most
of it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

from segmenters.networks import ARCHITECTURES, build_network, count_parameters
from segmenters.networks.inference import predict_volume

NUM_CLASSES = 5  # background and four structures, as the classical segmenter labels


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time one network in this process; returns the row of the table."""
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build_network(name, 1, NUM_CLASSES, width=args.width).to(device).eval()
    rng = np.random.default_rng(0)
    three_d = ARCHITECTURES[name].spatial_dims == 3
    if three_d:
        shape = tuple(args.volume_3d or (args.patch if device.type == "cpu" else (192, 512, 512)))
        warm_up = tuple(args.patch)
    else:
        batches = args.batches or (1 if device.type == "cpu" else 10)
        shape = (batches * args.batch_size, args.size, args.size)
        warm_up = (args.batch_size, args.size, args.size)
    hu = rng.integers(-1024, 1500, shape).astype(np.int16)
    options: dict[str, Any] = {"batch_size": args.batch_size, "device": device, "amp": args.amp}
    if three_d:
        options.update(patch_size=tuple(args.patch), overlap=args.overlap, batch_size=args.sw_batch_size)

    rss_model = _rss_mib()
    predict_volume(model, rng.integers(-1024, 1500, warm_up).astype(np.int16), **options)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    predict_volume(model, hu, **options)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    voxels_per_s = hu.size / seconds
    row: dict[str, Any] = {
        "name": name,
        "dims": f"{ARCHITECTURES[name].spatial_dims}D",
        "params_m": count_parameters(model) / 1e6,
        "input": "x".join(map(str, shape)),
        "seconds": seconds,
        "voxels_per_s": voxels_per_s,
        "slices_per_s": voxels_per_s / (args.size * args.size),
    }
    if device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        row["peak_mib"] = _rss_mib()
        row["added_mib"] = row["peak_mib"] - rss_model
    return row


def _child_args(args: argparse.Namespace, name: str) -> list[str]:
    argv = [sys.executable, "-m", "benchmarks.inference", "--child", name, "--device", args.device]
    argv += ["--width", str(args.width), "--batch-size", str(args.batch_size), "--size", str(args.size)]
    argv += ["--sw-batch-size", str(args.sw_batch_size), "--overlap", str(args.overlap)]
    argv += ["--patch", *map(str, args.patch)]
    if args.batches:
        argv += ["--batches", str(args.batches)]
    if args.volume_3d:
        argv += ["--volume-3d", *map(str, args.volume_3d)]
    if args.amp:
        argv.append("--amp")
    return argv


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    where = args.device + (" bf16 autocast" if args.amp else " fp32")
    memory = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB (+inference)"
    print(f"\n{where}, {os.cpu_count()} CPU threads, width {args.width}, {NUM_CLASSES} classes")
    print(
        f"{'network':15} {'dims':4} {'params':>8} {'input':>13} {'slices/s':>9} {'Mvoxels/s':>10}  {memory}"
    )
    for r in rows:
        mem = f"{r['peak_mib']:.0f}" + (f" (+{r['added_mib']:.0f})" if "added_mib" in r else "")
        print(
            f"{r['name']:15} {r['dims']:4} {r['params_m']:7.2f}M {r['input']:>13} {r['slices_per_s']:9.2f} "
            f"{r['voxels_per_s'] / 1e6:10.2f}  {mem}"
        )
    side = f"{args.size} x {args.size}"
    print(f"slices/s: {side} slices labelled per second (for V-Net: its voxels/s over {side})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--networks", default=",".join(ARCHITECTURES), help="comma-separated names")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="2D slices per forward pass")
    parser.add_argument(
        "--batches", type=int, default=0, help="timed 2D batches (default 1 on cpu, 10 on cuda)"
    )
    parser.add_argument("--size", type=int, default=512, help="slice side")
    parser.add_argument("--patch", type=int, nargs=3, default=(96, 96, 96), help="V-Net window")
    parser.add_argument(
        "--volume-3d", type=int, nargs=3, help="V-Net volume (default: one patch on cpu, 192 512 512 on cuda)"
    )
    parser.add_argument("--sw-batch-size", type=int, default=2, help="V-Net windows per forward pass")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    rows = []
    for name in args.networks.split(","):
        if name not in ARCHITECTURES:
            parser.error(f"unknown network {name!r}; known: {', '.join(ARCHITECTURES)}")
        done = subprocess.run(_child_args(args, name), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr}", file=sys.stderr)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {row['seconds']:.1f} s for {row['input']}", flush=True)
        rows.append(row)
    print_table(rows, args)


if __name__ == "__main__":
    main()
