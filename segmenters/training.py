"""Training a 2D (or 2.5D) segmentation network on CT slices, with the usual literature protocol.

The defaults are those the thoracic organ-at-risk papers (AAPM 2017 challenge entries and the
U-Net family after them) report: Adam at 1e-3 with exponential decay, batches of 8 slices,
cross-entropy, light geometric augmentation (rotation +-10 degrees, translation +-10 %, scaling
0.9-1.1), early stopping on the validation loss and a fixed seed.

Left-right flipping is off by default: the thorax is not mirror-symmetric (heart to the left,
left and right lungs are different labels), so a flipped slice is an anatomy the network never
meets (situs inversus aside), and a flip without swapping the labels would teach it that left
and right are interchangeable. With ``flip_lr`` on, a flipped slice has its left/right labels
swapped (structures of the same type and opposite laterality).

Only the 2D architectures are trained here: each slice (with ``context_slices`` neighbours on each
side as extra channels) is a sample. The 3D V-Net needs patch sampling and is not supported by
``segnode train`` in this version.

Outputs in ``out_dir``: ``model.pt`` (``checkpoint.save_checkpoint``: the best epoch's weights and
the model card), ``model_card.json``, ``history.csv`` (one row per epoch) and two plots:
``loss.png`` (blue: training loss, orange: validation loss) and ``dice_miou.png`` (blue:
validation Dice, orange: validation mIoU; y axis 0 to 1).
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from segmenters import metrics
from segmenters.base import Structure
from segmenters.checkpoint import ModelCard, choose_device, save_checkpoint
from segmenters.datasets import Case
from segmenters.networks import ARCHITECTURES, build_network
from segmenters.plots import write_line_plot

log = logging.getLogger(__name__)

LOSSES = ("ce", "dice", "ce+dice")


@dataclass(frozen=True)
class TrainConfig:
    """How to train; every default is the literature protocol (see the module docstring)."""

    architecture: str = "unet"
    width: int = 32
    dropout: float = 0.1
    context_slices: int = 1  # 2.5D: neighbours on each side as extra channels (0: plain 2D)
    max_epochs: int = 100
    batch_size: int = 8
    learning_rate: float = 1e-3  # Adam
    lr_decay: float = 0.95  # exponential: the rate is multiplied by this after every epoch
    loss: str = "ce"  # "ce" | "dice" | "ce+dice"
    augment: bool = True
    rotation_deg: float = 10.0
    translation: float = 0.1  # fraction of the image size
    scale: tuple[float, float] = (0.9, 1.1)
    flip_lr: bool = False  # off: the thorax has laterality (see the module docstring)
    patience: int = 10  # epochs without a better validation loss before stopping
    min_delta: float = 1e-4  # a validation loss must fall by more than this to count as better
    seed: int = 0
    pixel_spacing_mm: float | None = 1.0  # in-plane spacing cases are resampled to; None: as given
    crop_size: int = 384  # slices are centre-cropped or padded (with air) to this square
    window: tuple[float, float] = (-1000.0, 1000.0)  # HU mapped to [0, 1], as at inference
    device: str = "auto"
    name: str = ""  # model name; default "segnode-<architecture>"
    version: str = "0.1"
    demo: bool = False  # trained on phantoms or for show: the card and every SEG say so
    data_description: str = ""  # where the cases came from, for the model card

    def __post_init__(self) -> None:
        spec = ARCHITECTURES.get(self.architecture)
        if spec is None:
            raise ValueError(
                f"no architecture {self.architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}"
            )
        if spec.spatial_dims != 2:
            raise ValueError(
                f"{self.architecture} is 3D; training supports the 2D architectures in this version"
            )
        if self.crop_size < spec.multiple or self.crop_size % spec.multiple:
            raise ValueError(f"crop_size must be a multiple of {spec.multiple} for {self.architecture}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss is one of {LOSSES}; got {self.loss!r}")
        if self.max_epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("max_epochs, batch_size and patience must be positive")
        if self.learning_rate < 0 or not 0 < self.lr_decay <= 1:
            raise ValueError("learning_rate must not be negative and lr_decay lies in (0, 1]")
        if self.context_slices < 0:
            raise ValueError("context_slices must not be negative")


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    lr: float
    train_loss: float
    val_loss: float
    val_dice: float  # mean over structures of the mean over validation cases
    val_miou: float
    dice: dict[str, float]  # per structure
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    card: ModelCard
    history: list[EpochStats]
    best_epoch: int
    stopped_early: bool
    files: list[Path] = field(default_factory=list)


@dataclass
class _Prepared:
    """A case on the training grid: windowed CT in [0, 1] and labels renumbered to the model's."""

    case_id: str
    x: np.ndarray  # float32 (slices, crop, crop)
    y: np.ndarray  # uint8, same shape
    slices: tuple[int, int]  # where every reference of the model's structures is defined
    z_ranges: dict[int, tuple[int, int]]  # model label -> slices it is scored on


def train(
    cases_train: Sequence[Case],
    cases_val: Sequence[Case],
    structures: Sequence[Structure],
    config: TrainConfig,
    out_dir: Path,
    progress: bool = True,
    stream: TextIO | None = None,
) -> TrainResult:
    """Train ``config.architecture`` to label ``structures`` (matched to each case's label names,
    case-insensitively; other labels become background) and write the outputs to ``out_dir``.

    Returns the best epoch's model card and the history. Early stopping needs validation cases.
    """
    if not cases_train or not cases_val:
        raise ValueError("training needs at least one training and one validation case")
    if not structures:
        raise ValueError("train at least one structure")
    stream = stream if stream is not None else sys.stderr
    _seed_everything(config.seed)
    rng = np.random.default_rng(config.seed)
    device = choose_device(config.device)
    num_classes = max(s.label for s in structures) + 1
    train_set = [_prepare(c, structures, config) for c in cases_train]
    val_set = [_prepare(c, structures, config) for c in cases_val]
    samples = [(i, k) for i, p in enumerate(train_set) for k in range(*p.slices)]
    if not samples:
        raise ValueError("no training slice has every structure's reference defined")
    model = build_network(
        config.architecture,
        2 * config.context_slices + 1,
        num_classes,
        width=config.width,
        dropout=config.dropout,
    ).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma=config.lr_decay)
    swap = _mirror_lut(structures, num_classes) if config.flip_lr else None
    foreground = sorted(s.label for s in structures)

    history: list[EpochStats] = []
    best_loss, best_epoch, best_state, waited, stopped_early = math.inf, 0, None, 0, False
    for epoch in range(1, config.max_epochs + 1):
        started = time.monotonic()
        lr = optimiser.param_groups[0]["lr"]
        model.train()
        order = rng.permutation(len(samples))
        steps = math.ceil(len(order) / config.batch_size)
        total, seen = 0.0, 0
        for step in range(steps):
            batch = [samples[j] for j in order[step * config.batch_size : (step + 1) * config.batch_size]]
            x, y = _batch(train_set, batch, config.context_slices, device)
            if config.augment:
                x, y = _augment(x, y, config, rng, swap)
            loss = _loss(model(x), y, config.loss, foreground)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
            if progress:
                _bar(stream, epoch, config.max_epochs, step + 1, steps, total / seen)
        scheduler.step()
        val_loss, dice, iou = _validate(model, val_set, structures, config, device, foreground)
        stats = EpochStats(
            epoch=epoch,
            lr=lr,
            train_loss=total / len(samples),
            val_loss=val_loss,
            val_dice=float(np.mean(list(dice.values()))),
            val_miou=float(np.mean(list(iou.values()))),
            dice=dice,
            seconds=time.monotonic() - started,
        )
        history.append(stats)
        if progress:
            stream.write(
                f"  train loss {stats.train_loss:.4f}  val loss {val_loss:.4f}  "
                f"val Dice {stats.val_dice:.3f}  val mIoU {stats.val_miou:.3f}  ({stats.seconds:.1f} s)\n"
            )
            stream.flush()
        if val_loss < best_loss - config.min_delta:
            best_loss, best_epoch, waited = val_loss, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            waited += 1
            if waited >= config.patience:
                stopped_early = True
                log.info("early stop after epoch %d: no better validation loss for %d epochs", epoch, waited)
                break
    if best_state is not None:  # None only when the loss was never finite
        model.load_state_dict(best_state)
    best = history[best_epoch - 1] if best_epoch else history[-1]
    card = _card(config, structures, cases_train, cases_val, best)
    return _write_outputs(out_dir, model, card, history, best_epoch or best.epoch, stopped_early, structures)


# --- preparation ----------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # for any library that still draws from numpy's global generator
    torch.manual_seed(seed)


def _prepare(case: Case, structures: Sequence[Structure], config: TrainConfig) -> _Prepared:
    names = {s.name.lower(): s.label for s in structures}
    lut = np.zeros(256, dtype=np.uint8)
    z_ranges: dict[int, tuple[int, int]] = {}
    for value, name in case.label_names.items():
        label = names.get(name.lower())
        if label is not None:
            lut[value] = label
            if value in case.z_ranges:
                z_ranges[label] = case.z_ranges[value]
    labels = lut[case.labels]
    hu = case.hu.astype(np.float32)
    if config.pixel_spacing_mm is not None:
        zoom = (1.0, case.spacing[1] / config.pixel_spacing_mm, case.spacing[2] / config.pixel_spacing_mm)
        if abs(zoom[1] - 1) > 0.02 or abs(zoom[2] - 1) > 0.02:
            hu = ndimage.zoom(hu, zoom, order=1)
            labels = ndimage.zoom(labels, zoom, order=0)
    low, high = config.window
    x = np.clip((hu - low) / (high - low), 0.0, 1.0).astype(np.float32)
    x = _crop_or_pad(x, config.crop_size, 0.0)
    y = _crop_or_pad(labels, config.crop_size, 0)
    start = max([0, *(r[0] for r in z_ranges.values())])
    stop = min([x.shape[0], *(r[1] for r in z_ranges.values())])
    return _Prepared(case.case_id, x, y, (start, max(start, stop)), z_ranges)


def _crop_or_pad(a: np.ndarray, size: int, fill: float) -> np.ndarray:
    """Centre-crop or pad the last two axes to ``size`` x ``size``."""
    out = np.full((a.shape[0], size, size), fill, dtype=a.dtype)
    src, dst = [], []
    for n in a.shape[1:]:
        if n >= size:
            first = (n - size) // 2
            src.append(slice(first, first + size))
            dst.append(slice(0, size))
        else:
            first = (size - n) // 2
            src.append(slice(0, n))
            dst.append(slice(first, first + n))
    out[:, dst[0], dst[1]] = a[:, src[0], src[1]]
    return out


def _batch(
    data: Sequence[_Prepared], batch: Sequence[tuple[int, int]], context: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slices with their neighbours as channels (edge slices repeat, as ``predict_volume`` does)."""
    offsets = np.arange(-context, context + 1)
    xs, ys = [], []
    for i, k in batch:
        n = data[i].x.shape[0]
        xs.append(data[i].x[np.clip(k + offsets, 0, n - 1)])
        ys.append(data[i].y[k])
    x = torch.from_numpy(np.stack(xs)).to(device)
    y = torch.from_numpy(np.stack(ys).astype(np.int64)).to(device)
    return x, y


def _mirror_lut(structures: Sequence[Structure], num_classes: int) -> torch.Tensor:
    """Label swap for a left-right flip: each structure to its opposite-laterality twin."""
    lut = torch.arange(num_classes)
    for s in structures:
        if s.laterality is None:
            continue
        for t in structures:
            if t.type == s.type and t.laterality is not None and t.laterality != s.laterality:
                lut[s.label] = t.label
    return lut


def _augment(
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    rng: np.random.Generator,
    swap: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random rotation, scaling and translation per slice (and a flip, when enabled)."""
    n = x.shape[0]
    angle = np.deg2rad(rng.uniform(-config.rotation_deg, config.rotation_deg, n))
    scale = rng.uniform(config.scale[0], config.scale[1], n)
    shift = rng.uniform(-config.translation, config.translation, (n, 2)) * 2.0  # grid units span 2
    flip = rng.random(n) < 0.5 if config.flip_lr else np.zeros(n, dtype=bool)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    sign = np.where(flip, -1.0, 1.0)
    theta = np.stack(
        [np.stack([cos * sign, -sin, shift[:, 0]], axis=1), np.stack([sin * sign, cos, shift[:, 1]], axis=1)],
        axis=1,
    )
    grid = F.affine_grid(
        torch.as_tensor(theta, dtype=x.dtype, device=x.device), list(x.shape), align_corners=False
    )
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # 0 is air
    y = F.grid_sample(y[:, None].to(x.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    labels = y[:, 0].round().long()
    if swap is not None and flip.any():
        flipped = torch.as_tensor(flip, device=labels.device)
        labels = torch.where(flipped[:, None, None], swap.to(labels.device)[labels], labels)
    return x, labels


def _loss(logits: torch.Tensor, y: torch.Tensor, kind: str, foreground: Sequence[int]) -> torch.Tensor:
    if kind == "ce":
        return F.cross_entropy(logits, y)
    dice = _soft_dice_loss(logits, y, foreground)
    return dice if kind == "dice" else F.cross_entropy(logits, y) + dice


def _soft_dice_loss(logits: torch.Tensor, y: torch.Tensor, foreground: Sequence[int]) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes, over the whole batch (smoothing 1 voxel, so a
    class absent from both prediction and reference scores about 1, not 0/0)."""
    probs = logits.softmax(dim=1)[:, list(foreground)]
    target = F.one_hot(y, logits.shape[1]).permute(0, 3, 1, 2)[:, list(foreground)].to(probs.dtype)
    dims = (0, 2, 3)
    overlap = (probs * target).sum(dims)
    total = probs.sum(dims) + target.sum(dims)
    return 1.0 - ((2.0 * overlap + 1.0) / (total + 1.0)).mean()


@torch.no_grad()
def _validate(
    model: torch.nn.Module,
    data: Sequence[_Prepared],
    structures: Sequence[Structure],
    config: TrainConfig,
    device: torch.device,
    foreground: Sequence[int],
) -> tuple[float, dict[str, float], dict[str, float]]:
    """Validation loss (over the slices where every reference is defined), and per-structure
    Dice and IoU (means over cases, each structure on its own z range) of the argmax labels."""
    model.eval()
    loss_sum, count = 0.0, 0
    dice: dict[str, list[float]] = {s.name: [] for s in structures}
    iou: dict[str, list[float]] = {s.name: [] for s in structures}
    for i, p in enumerate(data):
        n = p.x.shape[0]
        pred = np.zeros(p.y.shape, dtype=np.uint8)
        for start in range(0, n, config.batch_size):
            batch = [(i, k) for k in range(start, min(start + config.batch_size, n))]
            x, y = _batch(data, batch, config.context_slices, device)
            logits = model(x)
            pred[start : start + len(batch)] = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
            inside = [j for j, (_, k) in enumerate(batch) if p.slices[0] <= k < p.slices[1]]
            if inside:
                loss = _loss(logits[inside], y[inside], config.loss, foreground)
                loss_sum += float(loss) * len(inside)
                count += len(inside)
        for s in structures:
            lo, hi = p.z_ranges.get(s.label, (0, n))
            d, u = metrics.dice_iou(pred[lo:hi] == s.label, p.y[lo:hi] == s.label)
            dice[s.name].append(d)
            iou[s.name].append(u)
    model.train()
    val_loss = loss_sum / count if count else math.nan
    return (
        val_loss,
        {k: float(np.mean(v)) for k, v in dice.items()},
        {k: float(np.mean(v)) for k, v in iou.items()},
    )


# --- outputs --------------------------------------------------------------------------------------


def _card(
    config: TrainConfig,
    structures: Sequence[Structure],
    cases_train: Sequence[Case],
    cases_val: Sequence[Case],
    best: EpochStats,
) -> ModelCard:
    source = f" from {config.data_description}" if config.data_description else ""
    summary = (
        f"{len(cases_train)} training and {len(cases_val)} validation cases{source}; "
        f"{config.loss} loss, best epoch {best.epoch}, seed {config.seed}"
    )
    validation = {"val_loss": best.val_loss, "val_dice": best.val_dice, "val_miou": best.val_miou}
    validation.update({f"dice_{name}": value for name, value in best.dice.items()})
    return ModelCard(
        name=config.name or f"segnode-{config.architecture}",
        version=config.version,
        architecture=config.architecture,
        width=config.width,
        context_slices=config.context_slices,
        structures=tuple(structures),
        pixel_spacing_mm=config.pixel_spacing_mm,
        window=config.window,
        demo=config.demo,
        training_data=summary,
        validation_metrics=validation,
    )


def _write_outputs(
    out_dir: Path,
    model: torch.nn.Module,
    card: ModelCard,
    history: list[EpochStats],
    best_epoch: int,
    stopped_early: bool,
    structures: Sequence[Structure],
) -> TrainResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / "model.pt"
    save_checkpoint(checkpoint, model, card)
    (out_dir / "model_card.json").write_text(card.to_json() + "\n")
    with open(out_dir / "history.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["epoch", "lr", "train_loss", "val_loss", "val_dice", "val_miou"]
            + [f"dice_{s.name}" for s in structures]
            + ["seconds"]
        )
        for h in history:
            writer.writerow(
                [h.epoch, f"{h.lr:.6g}", f"{h.train_loss:.6f}", f"{h.val_loss:.6f}", f"{h.val_dice:.4f}"]
                + [f"{h.val_miou:.4f}"]
                + [f"{h.dice[s.name]:.4f}" for s in structures]
                + [f"{h.seconds:.2f}"]
            )
    write_line_plot(out_dir / "loss.png", [[h.train_loss for h in history], [h.val_loss for h in history]])
    write_line_plot(
        out_dir / "dice_miou.png",
        [[h.val_dice for h in history], [h.val_miou for h in history]],
        y_range=(0.0, 1.0),
    )
    files = [checkpoint] + [
        out_dir / n for n in ("model_card.json", "history.csv", "loss.png", "dice_miou.png")
    ]
    return TrainResult(checkpoint, card, history, best_epoch, stopped_early, files)


def _bar(stream: TextIO, epoch: int, epochs: int, step: int, steps: int, loss: float) -> None:
    """A one-line text progress bar, redrawn in place."""
    done = round(24 * step / steps)
    stream.write(f"\repoch {epoch}/{epochs} [{'#' * done}{'.' * (24 - done)}] {step}/{steps} loss {loss:.4f}")
    if step == steps:
        stream.write("\n")
    stream.flush()
