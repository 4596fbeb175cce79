"""Scoring segmenters (installed, configured, or models of any kind) on reference cases, side by side.

Each segmenter labels every case through the :class:`~segmenters.base.Segmenter` interface, as the
node would; its structures are matched to the case's reference labels by name (case-insensitive),
so a model and a data set need not number their labels alike. Structures the reference lacks
(the body in an AAPM structure set) are not scored. Every structure is scored over the whole
volume, so labels far from the reference count against it; only the structures the user names are
scored on the slices where their reference is defined (``Case.z_ranges``), as the AAPM 2017
protocol does for the oesophagus and spinal cord, whose contours stop where the physician stopped.
"""

from __future__ import annotations

import csv
import math
import re
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np

from segmenters import metrics
from segmenters.base import Segmenter, Volume
from segmenters.datasets import Case

CLASSICAL = "classical"


@dataclass(frozen=True)
class EvalRow:
    checkpoint: str
    case: str
    structure: str
    dice: float
    iou: float
    hd95_mm: float
    msd_mm: float


def load_segmenter(spec: Path | str, device: str = "auto") -> Segmenter:
    """An installed segmenter by name (``classical``, ``demo-thorax-unet``, ...) or a model by its
    path: a segnode checkpoint, a TorchScript (``.ts``) or ONNX (``.onnx``) file with its card
    beside it, a MONAI bundle folder or an nnU-Net v2 trained-model folder."""
    from segmenters import registry

    text = str(spec)
    if text in registry.available() and not Path(text).exists():
        return registry.create(text)
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(
            f"{text} is neither an installed segmenter ({', '.join(sorted(registry.available()))}) nor a file"
        )
    from segmenters.served.loading import load_served

    if path.is_dir():
        kind = "monai_bundle" if (path / "configs").is_dir() else "nnunet"
        return load_served(kind, path, device=device, amp=False)
    if path.suffix in (".ts", ".onnx"):
        return load_served("torchscript" if path.suffix == ".ts" else "onnx", path, device=device, amp=False)
    from segmenters.checkpoint import NetworkSegmenter

    return NetworkSegmenter(path, device=device, amp=False)


def score(
    segmenter: Segmenter, case: Case, name: str, reference_slices_only: Collection[str] = ()
) -> list[EvalRow]:
    """One row per structure of ``segmenter`` that the case's reference holds; the structures named
    in ``reference_slices_only`` (any case) are scored on their reference's slices alone."""
    restricted = {n.lower() for n in reference_slices_only}
    pred = segmenter.predict(Volume(case.hu, case.spacing))
    reference = {_key(n): value for value, n in case.label_names.items()}
    pred_map = np.zeros(case.labels.shape, dtype=np.uint8)
    ref_map = np.zeros(case.labels.shape, dtype=np.uint8)
    labels: dict[int, str] = {}
    z_range: dict[str, tuple[int, int]] = {}
    for index, structure in enumerate(segmenter.structures, start=1):
        value = reference.get(_key(structure.name))
        if value is None:
            continue
        scored = ~case.excluded[value] if value in case.excluded else True
        pred_map[(pred == structure.label) & scored] = index
        ref_map[(case.labels == value) & scored] = index
        labels[index] = structure.name
        if value in case.z_ranges and structure.name.lower() in restricted:
            z_range[structure.name] = case.z_ranges[value]
    scores = metrics.score_case(pred_map, ref_map, labels, case.spacing, z_range)
    return [EvalRow(name, case.case_id, s.structure, s.dice, s.iou, s.hd95_mm, s.msd_mm) for s in scores]


def _key(name: str) -> str:
    """Structure names compared without case, spaces or punctuation: "Spinal cord" is spinal_cord."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def evaluate(
    specs: Sequence[Path | str],
    cases: Sequence[Case],
    out_csv: Path | None = None,
    device: str = "auto",
    reference_slices_only: Collection[str] = (),
    load: Callable[[str], Segmenter] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[EvalRow]:
    """Score every segmenter (names or paths, built by ``load``: :func:`load_segmenter` unless the
    caller knows more names) on every case; write the rows to ``out_csv``. ``progress`` hears a
    line per case scored (a large volume takes a minute)."""
    rows: list[EvalRow] = []
    for spec in specs:
        segmenter = load(str(spec)) if load is not None else load_segmenter(spec, device)
        for number, case in enumerate(cases, start=1):
            started = time.perf_counter()
            rows.extend(score(segmenter, case, str(spec), reference_slices_only))
            if progress is not None:
                took = time.perf_counter() - started
                progress(f"{spec}: case {number}/{len(cases)} ({case.case_id}) scored in {took:.1f} s")
    if out_csv is not None:
        write_csv(out_csv, rows)
    return rows


def write_csv(path: Path, rows: Sequence[EvalRow]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f.name for f in fields(EvalRow)])
        for row in rows:
            writer.writerow(astuple(row))


def comparison_table(rows: Sequence[EvalRow]) -> str:
    """Mean Dice / IoU / HD95 / MSD per structure (rows) and checkpoint (column groups), with the
    mIoU (mean over structures of the mean IoU) last. Infinite distances (a structure missed or
    found where there is none) show as inf, on purpose."""
    checkpoints = list(dict.fromkeys(r.checkpoint for r in rows))
    structures = list(dict.fromkeys(r.structure for r in rows))
    means = _means(rows)
    name_width = max([len("structure"), len("mIoU"), *(len(s) for s in structures)])
    group = 30
    header = "structure".ljust(name_width) + "".join(f" | {_short(c, group)}" for c in checkpoints)
    sub = " " * name_width + "".join(
        " | " + f"{'Dice':>6} {'IoU':>6} {'HD95':>7} {'MSD':>7}" for _ in checkpoints
    )
    lines = [header, sub, "-" * len(sub)]
    for s in structures:
        cells = []
        for c in checkpoints:
            m = means.get((c, s))
            cells.append(
                " | "
                + (
                    f"{m[0]:6.3f} {m[1]:6.3f} {_mm(m[2])} {_mm(m[3])}"
                    if m
                    else f"{'-':>6} {'-':>6} {'-':>7} {'-':>7}"
                )
            )
        lines.append(s.ljust(name_width) + "".join(cells))
    miou = []
    for c in checkpoints:
        ious = [means[c, s][1] for s in structures if (c, s) in means]
        miou.append(" | " + f"{'':6} {float(np.mean(ious)) if ious else math.nan:6.3f} {'':7} {'':7}")
    lines.append("mIoU".ljust(name_width) + "".join(miou))
    return "\n".join(lines)


def summary(rows: Sequence[EvalRow]) -> dict[str, float]:
    """One checkpoint's scores in a few numbers, the averages of ``comparison_table``'s columns: the
    mean over structures of each structure's mean over cases, as ``dice``, ``miou``, ``hd95_mm`` and
    ``msd_mm``, and ``dice_<structure>`` for each structure. A distance stays inf when a structure was
    missed or hallucinated in any case (see ``segmenters.metrics``)."""
    if not rows:
        raise ValueError("no rows to summarise")
    if len({r.checkpoint for r in rows}) > 1:
        raise ValueError("summary takes the rows of one checkpoint")
    means = _means(rows)
    result = {
        key: float(np.mean([m[k] for m in means.values()]))
        for k, key in enumerate(("dice", "miou", "hd95_mm", "msd_mm"))
    }
    result.update({f"dice_{structure}": m[0] for (_, structure), m in means.items()})
    return result


def _means(rows: Sequence[EvalRow]) -> dict[tuple[str, str], tuple[float, float, float, float]]:
    """(checkpoint, structure) -> mean Dice, IoU, HD95 and MSD over its cases."""
    groups: dict[tuple[str, str], list[EvalRow]] = {}
    for r in rows:
        groups.setdefault((r.checkpoint, r.structure), []).append(r)
    return {
        key: (
            float(np.mean([r.dice for r in chosen])),
            float(np.mean([r.iou for r in chosen])),
            float(np.mean([r.hd95_mm for r in chosen])),
            float(np.mean([r.msd_mm for r in chosen])),
        )
        for key, chosen in groups.items()
    }


def _mm(value: float) -> str:
    return f"{'inf':>7}" if math.isinf(value) else f"{value:7.2f}"


def _short(name: str, width: int) -> str:
    name = Path(name).parent.name + "/" + Path(name).name if "/" in name else name
    return (name if len(name) <= width else "..." + name[-(width - 3) :]).ljust(29)[:29]
