"""When a series is complete, decided from what the database knows about it.

Whichever comes first: its quiet period passed with no new instance; the sender released the
association that brought it and its images form one whole regular volume (fast completion: at
once, but unless they are as many as the sender announced, its results are held for
``release_grace_s``, in which a sender sending in batches opens its next association); someone
asked; or it has been receiving for ``force_complete_s``. A study-level rule waits until every
series of the study is complete by these tests, so that the study's jobs are made together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise
from statistics import median

from node.core.config import Rule, Settings
from node.db.models import Series

# Slices farther from the series' usual spacing than this fraction of it (or 0.01 mm) are a gap.
SPACING_TOLERANCE = 0.01


@dataclass(frozen=True)
class Timing:
    """How one series is judged complete: its rule's values, else the node's."""

    quiet_s: float
    release_grace_s: float
    fast: bool
    force_s: float  # 0: never forced
    by_study: bool

    @classmethod
    def of(cls, rule: Rule | None, settings: Settings) -> Timing:
        if rule is None:  # a series no rule takes is decided as quickly as any
            return cls(
                settings.quiet_period_s, settings.release_grace_s, True, settings.force_complete_s, False
            )
        return cls(
            quiet_s=rule.quiet_period_s or settings.quiet_period_s,
            release_grace_s=settings.release_grace_s,
            fast=rule.fast_completion,
            force_s=rule.force_complete_s or settings.force_complete_s,
            by_study=rule.complete_by == "study",
        )

    def earliest(self) -> float:
        """The shortest time after its last instance at which a series may be complete."""
        return min(self.quiet_s, self.release_grace_s if self.fast else self.quiet_s)


@dataclass(frozen=True)
class ImageGeometry:
    orientation: str
    slice_position: float | None
    images_in_acquisition: int | None


def whole_volume(images: Sequence[ImageGeometry]) -> str:
    """'' when the images form one regular volume: one orientation, distinct positions evenly
    spaced with no gap, and as many as the sender said the acquisition has; else why not."""
    if not images:
        return "no images"
    if any(i.slice_position is None or not i.orientation for i in images):
        return "not every image has a position and an orientation"
    if len({i.orientation for i in images}) > 1:
        return "its images lie in more than one orientation"
    said = {i.images_in_acquisition for i in images if i.images_in_acquisition is not None}
    if len(said) > 1:
        return "its images disagree on how many the acquisition has"
    if said and (expected := said.pop()) != len(images):
        return f"the sender said {expected} images, {len(images)} arrived"
    positions = sorted(i.slice_position for i in images if i.slice_position is not None)
    steps = [b - a for a, b in pairwise(positions)]
    if not steps:
        return ""
    if min(steps) < 1e-3:
        return "two images lie at one position"
    usual = median(steps)
    worst = max(steps, key=lambda step: abs(step - usual))
    if abs(worst - usual) > max(SPACING_TOLERANCE * usual, 0.01):
        return f"a step of {worst:.2f} mm where {usual:.2f} mm is usual (a missing slice, or uneven spacing)"
    return ""


def sender_released(series: Series, timing: Timing) -> bool:
    """The sender released the association after the series' last instance (fast completion)."""
    released = series.released_at
    return timing.fast and released is not None and released >= series.last_received_at


def announced(images: Sequence[ImageGeometry]) -> bool:
    """The sender said how many images the acquisition has (with a whole volume: all arrived)."""
    return any(i.images_in_acquisition is not None for i in images)


def complete_without_images(series: Series, timing: Timing, now: datetime) -> str:
    """Why the series is complete by its times alone (quiet, asked for, forced); '' if not."""
    if series.last_received_at <= now - timedelta(seconds=timing.quiet_s):
        return f"no new instance for {timing.quiet_s:g} s"
    if series.complete_requested_at is not None:
        return "completed on request"
    if timing.force_s and series.first_received_at <= now - timedelta(seconds=timing.force_s):
        return f"forced complete: still receiving {timing.force_s:g} s after its first instance"
    return ""
