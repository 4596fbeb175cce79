"""A job's preview: three slices of its CT across the segmented range, each segment drawn in the
colour its SEG recommends, as one PNG; people would rather look than read. Rendered once, then
kept beside the job's results."""

from __future__ import annotations

import io
import os
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw
from pydicom import Dataset, dcmread
from pydicom.multival import MultiValue
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.core.config import Settings
from node.core.outputs import result_files
from node.db.models import Instance, Job

TILE = 320  # pixels per slice shown
QUANTILES = (0.3, 0.5, 0.7)
FILL_ALPHA = 0.4
# A segment covering more of the slice than this (the body) is outlined only, so it hides nothing.
OUTLINE_ONLY_ABOVE = 0.2
DEFAULT_WINDOW = (40.0, 400.0)  # soft tissue, where the CT names none


def preview_png(session: Session, settings: Settings, job: Job) -> bytes | None:
    """The preview of ``job``'s SEG, or None when it has none (not segmented, or no SEG output)."""
    if not job.output_path or not job.output_sop_instance_uid or "seg" not in job.outputs:
        return None
    folder = Path(job.output_path)
    # Named for the SEG it shows: a job run again writes a new SEG into the same folder.
    cached = folder / f"preview-{job.output_sop_instance_uid}.png"
    if cached.is_file():
        return cached.read_bytes()
    (seg_path,) = result_files(folder, "seg")
    if not seg_path.is_file():
        return None
    seg = hd.seg.segread(seg_path)
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.path, Instance.slice_position)
        .where(Instance.series_id == job.series_id)
        .order_by(Instance.id)
        .limit(job.instance_count)
    ).all()
    paths = {r.sop_instance_uid: settings.storage_dir / r.path for r in rows}
    position = {r.sop_instance_uid: r.slice_position or 0.0 for r in rows}
    drawn = sorted({uid for uid in _frame_sources(seg) if uid in paths}, key=lambda uid: position[uid])
    if not drawn:
        return None
    chosen = list(dict.fromkeys(drawn[round(q * (len(drawn) - 1))] for q in QUANTILES))
    segments = [seg.get_segment_description(n) for n in seg.get_segment_numbers()]
    colours = [_rgb(s) for s in segments]
    tiles = [_tile(paths[uid], seg, uid, colours) for uid in chosen]
    image = _compose(tiles, [s.SegmentLabel for s in segments], colours)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    png = buffer.getvalue()
    partial = cached.with_name(f".{cached.name}.{os.getpid()}.part")
    partial.write_bytes(png)
    partial.replace(cached)  # whole or not there: a crash leaves no half picture behind
    for older in folder.glob("preview-*.png"):
        if older != cached:
            older.unlink(missing_ok=True)
    return png


def _frame_sources(seg: hd.seg.Segmentation) -> list[str]:
    """The source instance of each frame (frames exist only where a segment is present)."""
    found = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        for derivation in item.get("DerivationImageSequence", []):
            found += [s.ReferencedSOPInstanceUID for s in derivation.get("SourceImageSequence", [])]
    return found


def _tile(path: Path, seg: hd.seg.Segmentation, uid: str, colours: list[np.ndarray]) -> Image.Image:
    ct = dcmread(path)
    hu = ct.pixel_array.astype(np.float32) * float(ct.get("RescaleSlope", 1)) + float(
        ct.get("RescaleIntercept", 0)
    )
    center, width = _window(ct)
    grey = np.clip((hu - (center - width / 2)) / width, 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    masks = seg.get_pixels_by_source_instance([uid], combine_segments=False)[0]
    for index, colour in enumerate(colours):
        mask = masks[..., index].astype(bool)
        if mask.any():
            if mask.mean() < OUTLINE_ONLY_ABOVE:
                rgb[mask] = (1 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * colour
            edge = mask & ~_eroded(mask)
            rgb[edge] = colour
    image = Image.fromarray((rgb * 255).astype(np.uint8))
    return image.resize((TILE, round(TILE * image.height / image.width)), Image.Resampling.LANCZOS)


def _eroded(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def _window(ct: Dataset) -> tuple[float, float]:
    """The CT's own first window (its sender's choice), else soft tissue."""
    center, width = ct.get("WindowCenter"), ct.get("WindowWidth")
    if center is None or width is None:
        return DEFAULT_WINDOW
    center = center[0] if isinstance(center, MultiValue) else center
    width = width[0] if isinstance(width, MultiValue) else width
    return float(center), max(float(width), 1.0)


def _rgb(segment: object) -> np.ndarray:
    """The segment's recommended CIELab colour (PS3.3 C.10.7.1.1) in sRGB, 0..1."""
    lab = getattr(segment, "RecommendedDisplayCIELabValue", None)
    if lab is None:
        return np.array([1.0, 0.6, 0.0])
    lightness, a, b = lab[0] * 100 / 65535, lab[1] * 255 / 65535 - 128, lab[2] * 255 / 65535 - 128
    fy = (lightness + 16) / 116
    fx, fz = fy + a / 500, fy - b / 200
    xyz = np.array([fx, fy, fz])
    xyz = np.where(xyz > 6 / 29, xyz**3, 3 * (6 / 29) ** 2 * (xyz - 4 / 29)) * np.array(
        [0.95047, 1.0, 1.08883]
    )
    linear = (
        np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]]) @ xyz
    )
    srgb = np.where(
        linear <= 0.0031308, 12.92 * linear, 1.055 * np.clip(linear, 0, None) ** (1 / 2.4) - 0.055
    )
    return np.clip(srgb, 0, 1)


def _compose(tiles: list[Image.Image], labels: list[str], colours: list[np.ndarray]) -> Image.Image:
    """The slices side by side over a legend of the segments."""
    height = max(t.height for t in tiles)
    line = 18
    legend_rows = (len(labels) + 2) // 3
    canvas = Image.new("RGB", (TILE * len(tiles), height + 8 + legend_rows * line), (20, 20, 20))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (i * TILE, 0))
    draw = ImageDraw.Draw(canvas)
    column = canvas.width // 3
    for i, (label, colour) in enumerate(zip(labels, colours, strict=True)):
        x, y = (i % 3) * column + 8, height + 4 + (i // 3) * line
        fill = tuple(int(c * 255) for c in colour)
        draw.rectangle((x, y + 3, x + 10, y + 13), fill=fill)
        draw.text((x + 16, y + 2), label, fill=(230, 230, 230))
    return canvas
