"""Training a segmentation network on CT slices (2D, 2.5D) or patches (the 3D V-Net) by the
protocol of the thoracic organ-at-risk literature, so that its figures compare with the papers'.

Left-right flips are off by default: the thorax is not mirror-symmetric, and a flip without swapping
the left and right labels would teach that they are interchangeable (``flip_lr`` swaps them). Every
case is prepared as the node will serve it (in-plane resampling, windowing); a 2D feed shows each
slice once an epoch, the 3D feed draws patches half centred on a structure, and validation labels
whole cases as ``predict_volume`` does, so early stopping judges what will be served.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import itertools
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from segmenters import evaluation, metrics, patches
from segmenters.base import Structure
from segmenters.checkpoint import ModelCard, load_checkpoint, save_checkpoint
from segmenters.datasets import Case
from segmenters.networks import ARCHITECTURES, TrainsOnInstances, build_network
from segmenters.networks.inference import predict_volume
from segmenters.plots import write_line_plot
from segmenters.served.runner import choose_device

log = logging.getLogger(__name__)

LOSSES = ("ce", "dice", "ce+dice")
IGNORE = 255  # label of voxels the loss skips: slices where a reference is undefined, padding of 3D boxes

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> loss
Scores = tuple[float, dict[str, float], dict[str, float]]  # validation loss, Dice and IoU per structure


@dataclass(frozen=True)
class TrainConfig:
    """How to train; every default is the literature protocol (see the module docstring)."""

    architecture: str = "unet"
    width: int = 32
    dropout: float = 0.1
    context_slices: int = 1  # 2.5D: neighbours on each side as extra channels (0: plain 2D; 3D: always 0)
    patch_size: tuple[int, int, int] = (32, 96, 96)  # 3D: training patch and sliding window (D, H, W)
    max_epochs: int = 100
    batch_size: int = 8  # slices (2D) or patches (3D) per step
    learning_rate: float = 1e-3  # Adam
    lr_decay: float = 0.95  # exponential: the rate is multiplied by this after every epoch
    loss: str = "ce"  # "ce" | "dice" | "ce+dice"
    augment: bool = True
    rotation_deg: float = 10.0
    translation: float = 0.1  # fraction of the image (2D) or patch (3D) size
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
        if self.crop_size < spec.multiple or self.crop_size % spec.multiple:
            raise ValueError(f"crop_size must be a multiple of {spec.multiple} for {self.architecture}")
        if spec.spatial_dims == 3:
            # A 3D network sees the neighbouring slices in its patch: no context channels, whatever was
            # asked (the default 1 is the 2D protocol's).
            object.__setattr__(self, "context_slices", 0)
            patch = tuple(self.patch_size)
            if len(patch) != 3 or any(p < spec.multiple or p % spec.multiple for p in patch):
                raise ValueError(
                    f"patch_size must be three multiples of {spec.multiple} for {self.architecture}; "
                    f"got {self.patch_size}"
                )
            if max(patch[1:]) > self.crop_size:
                raise ValueError(f"a patch's rows and columns must not exceed crop_size; got {patch}")
            object.__setattr__(self, "patch_size", (int(patch[0]), int(patch[1]), int(patch[2])))
        if self.loss not in LOSSES:
            raise ValueError(f"loss is one of {LOSSES}; got {self.loss!r}")
        if self.max_epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("max_epochs, batch_size and patience must be positive")
        if self.learning_rate < 0 or not 0 < self.lr_decay <= 1:
            raise ValueError("learning_rate must not be negative and lr_decay lies in (0, 1]")
        if self.context_slices < 0:
            raise ValueError("context_slices must not be negative")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale is a range of positive factors (low, high); got {self.scale}")


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


class _Feed(Protocol):
    """What the training loop needs from its data, whatever the network's dimensions."""

    steps: int  # batches per epoch

    def epoch(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch's batches: inputs (N, C, ...) on the device, augmented, and their labels."""
        ...

    def validate(self, model: torch.nn.Module, objective: Objective) -> Scores:
        """The validation loss, and Dice and IoU per structure (means over the validation cases)."""
        ...


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
    feed_type = _SliceFeed if ARCHITECTURES[config.architecture].spatial_dims == 2 else _PatchFeed
    feed: _Feed = feed_type(train_set, val_set, structures, config, device)
    model = build_network(
        config.architecture,
        2 * config.context_slices + 1,
        num_classes,
        width=config.width,
        dropout=config.dropout,
    ).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma=config.lr_decay)
    foreground = sorted(s.label for s in structures)

    def objective(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _loss(logits, y, config.loss, foreground)

    history: list[EpochStats] = []
    best_loss, best_epoch, best_state, waited, stopped_early = math.inf, 0, None, 0, False
    for epoch in range(1, config.max_epochs + 1):
        started = time.monotonic()
        lr = optimiser.param_groups[0]["lr"]
        model.train()
        total, seen = 0.0, 0
        for step, (x, y) in enumerate(feed.epoch(rng), start=1):
            loss = (
                model.training_loss(x, y) if isinstance(model, TrainsOnInstances) else objective(model(x), y)
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(x)
            seen += len(x)
            if progress:
                _bar(stream, epoch, config.max_epochs, step, feed.steps, total / seen)
        scheduler.step()
        val_loss, dice, iou = feed.validate(model, objective)
        stats = EpochStats(
            epoch=epoch,
            lr=lr,
            train_loss=total / seen,
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


def score_test(
    checkpoint: Path, cases_test: Sequence[Case], device: str = "auto"
) -> list[evaluation.EvalRow]:
    """Score a trained checkpoint on the held-out test cases and record the result beside it.

    The cases run through :func:`segmenters.evaluation.evaluate`, so the model is judged as the node
    serves it (on each case's own grid, resampled there and back), not on the training grid. Writes
    ``test_metrics.csv`` (one row per case and structure) next to the checkpoint and puts the summary
    (``evaluation.summary``, keys prefixed ``test_``, with ``test_cases``) in the card's
    ``test_metrics``, in ``model.pt`` and ``model_card.json`` alike, so the two never disagree. A
    distance that is infinite (a structure missed or invented in some case) is left out of the card,
    whose JSON would otherwise hold ``Infinity``, which strict JSON readers refuse; the CSV has it.
    """
    if not cases_test:
        raise ValueError("no test cases to score")
    out_dir = checkpoint.parent
    rows = evaluation.evaluate([checkpoint], cases_test, out_dir / "test_metrics.csv", device=device)
    model, card = load_checkpoint(checkpoint)
    summary = {"test_cases": float(len(cases_test))}
    if rows:  # none when the references name none of the model's structures
        summary.update(
            {
                (k if k.startswith("dice_") else f"test_{k}"): v
                for k, v in evaluation.summary(rows).items()
                if math.isfinite(v)
            }
        )
    card = dataclasses.replace(card, test_metrics=summary)
    save_checkpoint(checkpoint, model, card)
    (out_dir / "model_card.json").write_text(card.to_json() + "\n")
    return rows


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


def _mirror_lut(structures: Sequence[Structure]) -> torch.Tensor:
    """Label swap for a left-right flip: each structure to its opposite-laterality twin, every other
    uint8 value (background, unpaired structures, ``IGNORE``) to itself."""
    lut = torch.arange(256)
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
    size: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random rotation, scaling and translation in the axial plane per sample (and a left-right
    flip, when enabled), for slices (N, C, H, W) and patches (N, C, D, H, W) alike: a patch turns as a
    whole about the slice axis, never out of plane (slices are thicker than pixels are wide).

    ``size`` is the output's spatial size when the input is a larger box centred on it: turning and
    shifting then fetch image from the box's margin rather than padding. ``None``: the input's size.
    Translations are fractions of the output's size.
    """
    n, shape = x.shape[0], tuple(x.shape[2:])
    out = tuple(size) if size is not None else shape
    angle = np.deg2rad(rng.uniform(-config.rotation_deg, config.rotation_deg, n))
    scale = rng.uniform(config.scale[0], config.scale[1], n)
    shift = rng.uniform(-config.translation, config.translation, (n, 2)) * 2.0  # grid units span 2
    flip = rng.random(n) < 0.5 if config.flip_lr else np.zeros(n, dtype=bool)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    sign = np.where(flip, -1.0, 1.0)
    # affine_grid's coordinates span -1 to 1 across the output and across the input: the factors
    # (output / input size, 1 when they agree) keep the transform in pixels when the input is larger.
    (ow, oh), (iw, ih) = (out[-1], out[-2]), (shape[-1], shape[-2])
    row_x = [cos * sign * (ow / iw), -sin * (oh / iw), shift[:, 0] * (ow / iw)]
    row_y = [sin * sign * (ow / ih), cos * (oh / ih), shift[:, 1] * (oh / ih)]
    if x.ndim == 4:
        theta = np.stack([np.stack(row_x, axis=1), np.stack(row_y, axis=1)], axis=1)
    else:  # (x, y, z) rows and columns; the slice axis is only cut to size
        zero = np.zeros(n)
        theta = np.stack(
            [
                np.stack([*row_x[:2], zero, row_x[2]], axis=1),
                np.stack([*row_y[:2], zero, row_y[2]], axis=1),
                np.stack([zero, zero, zero + out[0] / shape[0], zero], axis=1),
            ],
            axis=1,
        )
    grid = F.affine_grid(
        torch.as_tensor(theta, dtype=x.dtype, device=x.device), [n, x.shape[1], *out], align_corners=False
    )
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # 0 is air
    y = F.grid_sample(y[:, None].to(x.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    labels = y[:, 0].round().long()
    if swap is not None and flip.any():
        flipped = torch.as_tensor(flip, device=labels.device).view(-1, *([1] * (labels.ndim - 1)))
        labels = torch.where(flipped, swap.to(labels.device)[labels], labels)
    return x, labels


def _augment_margin(config: TrainConfig, patch: Sequence[int]) -> tuple[int, int]:
    """Pixels to add on each side of a patch's rows and columns so that ``_augment`` (rotation up to
    ``rotation_deg``, scaling down to ``scale[0]``, translation) samples only inside the box."""
    sin = math.sin(math.radians(min(abs(config.rotation_deg), 90.0)))
    rows, cols = patch[-2], patch[-1]
    reach_rows = (rows + cols * sin) / config.scale[0] + 2 * config.translation * rows
    reach_cols = (cols + rows * sin) / config.scale[0] + 2 * config.translation * cols
    return max(0, math.ceil((reach_rows - rows) / 2)), max(0, math.ceil((reach_cols - cols) / 2))


def _loss(logits: torch.Tensor, y: torch.Tensor, kind: str, foreground: Sequence[int]) -> torch.Tensor:
    if kind == "ce":
        return F.cross_entropy(logits, y, ignore_index=IGNORE)
    dice = _soft_dice_loss(logits, y, foreground)
    return dice if kind == "dice" else F.cross_entropy(logits, y, ignore_index=IGNORE) + dice


def _soft_dice_loss(logits: torch.Tensor, y: torch.Tensor, foreground: Sequence[int]) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes, over the whole batch (smoothing 1 voxel, so a
    class absent from both prediction and reference scores about 1, not 0/0); ``IGNORE`` voxels count
    in neither. Slices (N, C, H, W) or patches (N, C, D, H, W)."""
    valid = y != IGNORE
    probs = logits.softmax(dim=1)[:, list(foreground)] * valid.unsqueeze(1)
    target = F.one_hot(torch.where(valid, y, 0), logits.shape[1]).movedim(-1, 1)
    target = target[:, list(foreground)].to(probs.dtype)
    dims = (0, *range(2, logits.ndim))
    overlap = (probs * target).sum(dims)
    total = probs.sum(dims) + target.sum(dims)
    return 1.0 - ((2.0 * overlap + 1.0) / (total + 1.0)).mean()


class _Scores:
    """Dice and IoU per structure of predicted label maps, each structure on the slices where its
    reference is defined, averaged over the validation cases."""

    def __init__(self, structures: Sequence[Structure]) -> None:
        self.structures = structures
        self.dice: dict[str, list[float]] = {s.name: [] for s in structures}
        self.iou: dict[str, list[float]] = {s.name: [] for s in structures}

    def add(self, pred: np.ndarray, p: _Prepared) -> None:
        for s in self.structures:
            lo, hi = p.z_ranges.get(s.label, (0, p.y.shape[0]))
            d, u = metrics.dice_iou(pred[lo:hi] == s.label, p.y[lo:hi] == s.label)
            self.dice[s.name].append(d)
            self.iou[s.name].append(u)

    def result(self, loss_sum: float, count: int) -> Scores:
        return (
            loss_sum / count if count else math.nan,
            {k: float(np.mean(v)) for k, v in self.dice.items()},
            {k: float(np.mean(v)) for k, v in self.iou.items()},
        )


# --- 2D: slices -----------------------------------------------------------------------------------


class _SliceFeed:
    """2D and 2.5D: every slice where every reference is defined, once an epoch, in shuffled batches."""

    def __init__(
        self,
        train_set: Sequence[_Prepared],
        val_set: Sequence[_Prepared],
        structures: Sequence[Structure],
        config: TrainConfig,
        device: torch.device,
    ) -> None:
        self.train_set, self.val_set, self.structures = train_set, val_set, structures
        self.config, self.device = config, device
        self.swap = _mirror_lut(structures) if config.flip_lr else None
        self.samples = [(i, k) for i, p in enumerate(train_set) for k in range(*p.slices)]
        if not self.samples:
            raise ValueError("no training slice has every structure's reference defined")
        self.steps = math.ceil(len(self.samples) / config.batch_size)

    def epoch(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size = self.config.batch_size
        order = rng.permutation(len(self.samples))
        for step in range(self.steps):
            batch = [self.samples[j] for j in order[step * size : (step + 1) * size]]
            x, y = _batch(self.train_set, batch, self.config.context_slices, self.device)
            if self.config.augment:
                x, y = _augment(x, y, self.config, rng, self.swap)
            yield x, y

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, objective: Objective) -> Scores:
        """Validation loss over the slices where every reference is defined; Dice and IoU of the
        argmax labels of every slice."""
        model.eval()
        loss_sum, count = 0.0, 0
        scores = _Scores(self.structures)
        size = self.config.batch_size
        for i, p in enumerate(self.val_set):
            n = p.x.shape[0]
            pred = np.zeros(p.y.shape, dtype=np.uint8)
            for start in range(0, n, size):
                batch = [(i, k) for k in range(start, min(start + size, n))]
                x, y = _batch(self.val_set, batch, self.config.context_slices, self.device)
                logits = model(x)
                pred[start : start + len(batch)] = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
                inside = [j for j, (_, k) in enumerate(batch) if p.slices[0] <= k < p.slices[1]]
                if inside:
                    loss = objective(logits[inside], y[inside])
                    loss_sum += float(loss) * len(inside)
                    count += len(inside)
            scores.add(pred, p)
        model.train()
        return scores.result(loss_sum, count)


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


# --- 3D: patches ----------------------------------------------------------------------------------


class _PatchFeed:
    """3D: random patches (:class:`segmenters.patches.PatchSampler`), augmented as whole boxes;
    validation by sliding windows over whole cases (see the module docstring)."""

    def __init__(
        self,
        train_set: Sequence[_Prepared],
        val_set: Sequence[_Prepared],
        structures: Sequence[Structure],
        config: TrainConfig,
        device: torch.device,
    ) -> None:
        self.val_set, self.structures, self.config, self.device = val_set, structures, config, device
        self.patch = config.patch_size
        self.multiple = ARCHITECTURES[config.architecture].multiple
        self.margin = _augment_margin(config, self.patch) if config.augment else (0, 0)
        self.swap = _mirror_lut(structures) if config.flip_lr else None
        self.train_x = [p.x for p in train_set]
        self.train_y = [_defined_only(p) for p in train_set]
        self.val_y = [_defined_only(p) for p in val_set]
        self.sampler = patches.PatchSampler(
            self.train_y,
            [p.slices for p in train_set],
            [s.label for s in structures],
            self.patch,
            np.random.default_rng(config.seed),
        )
        self.per_epoch = self.sampler.patches_per_epoch()
        self.steps = math.ceil(self.per_epoch / config.batch_size)

    def epoch(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        (depth, rows, cols), (m_rows, m_cols) = self.patch, self.margin
        box = (depth, rows + 2 * m_rows, cols + 2 * m_cols)
        for first in range(0, self.per_epoch, self.config.batch_size):
            xs, ys = [], []
            for _ in range(min(self.config.batch_size, self.per_epoch - first)):
                i, (z, r, c) = self.sampler.draw(rng)
                start = (z, r - m_rows, c - m_cols)
                xs.append(patches.crop_box(self.train_x[i], start, box, 0.0))
                ys.append(patches.crop_box(self.train_y[i], start, box, IGNORE))
            x = torch.from_numpy(np.stack(xs)[:, None]).to(self.device)
            y = torch.from_numpy(np.stack(ys).astype(np.int64)).to(self.device)
            if self.config.augment:
                x, y = _augment(x, y, self.config, rng, self.swap, size=self.patch)
            yield x, y

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, objective: Objective) -> Scores:
        """Dice and IoU of each whole case labelled as the node labels it, by sliding windows; the loss
        over a tiling of each case in patches, weighted by the voxels it scores."""
        model.eval()
        scores = _Scores(self.structures)
        loss_sum, count = 0.0, 0
        for p, y_defined in zip(self.val_set, self.val_y, strict=True):
            pred = predict_volume(
                model,
                p.x,
                window=(0.0, 1.0),  # p.x is windowed already
                batch_size=self.config.batch_size,
                device=self.device,
                patch_size=self.patch,
                multiple=self.multiple,
            )
            scores.add(pred, p)
            starts = [patches.tile_starts(n, k) for n, k in zip(p.x.shape, self.patch, strict=True)]
            tiles = list(itertools.product(*starts))
            for first in range(0, len(tiles), self.config.batch_size):
                chunk = tiles[first : first + self.config.batch_size]
                y_np = np.stack([patches.crop_box(y_defined, t, self.patch, IGNORE) for t in chunk])
                scored = int(np.count_nonzero(y_np != IGNORE))
                if not scored:
                    continue
                x = np.stack([patches.crop_box(p.x, t, self.patch, 0.0) for t in chunk])[:, None]
                y = torch.from_numpy(y_np.astype(np.int64)).to(self.device)
                loss = objective(model(torch.from_numpy(x).to(self.device)), y)
                loss_sum += float(loss) * scored
                count += scored
        model.train()
        return scores.result(loss_sum, count)


def _defined_only(p: _Prepared) -> np.ndarray:
    """The labels with ``IGNORE`` on the slices where some structure's reference is not defined."""
    y = p.y.copy()
    y[: p.slices[0]] = IGNORE
    y[p.slices[1] :] = IGNORE
    return y


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
    three_d = ARCHITECTURES[config.architecture].spatial_dims == 3
    if three_d:
        summary += ", patches of {}x{}x{}".format(*config.patch_size)
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
        patch_size=config.patch_size if three_d else None,
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
