"""Completion: what makes a series' images one whole regular volume, and which timing judges it."""

from __future__ import annotations

import pytest

from node.core.config import Rule, Settings
from node.jobs.completion import ImageGeometry, Timing, whole_volume

AXIAL = "1.0000\\0.0000\\0.0000\\0.0000\\1.0000\\0.0000"
TILTED = "1.0000\\0.0000\\0.0000\\0.0000\\0.9659\\-0.2588"


def images(positions: list[float], orientation: str = AXIAL, said: int | None = None) -> list[ImageGeometry]:
    return [ImageGeometry(orientation, p, said) for p in positions]


def test_evenly_spaced_images_in_any_order_are_a_whole_volume() -> None:
    assert whole_volume(images([5.0, 0.0, 2.5, 7.5, 10.0])) == ""
    assert whole_volume(images([0.0, 1.25, 2.5], said=3)) == ""
    assert whole_volume(images([3.0])) == ""


@pytest.mark.parametrize(
    ("volume", "why"),
    [
        (images([0.0, 2.5, 7.5, 10.0]), "a step of 5.00 mm where 2.50 mm is usual"),
        (images([0.0, 2.5, 2.5, 5.0]), "two images lie at one position"),
        (images([0.0, 2.5]) + images([5.0], TILTED), "more than one orientation"),
        (images([0.0, 2.5, 5.0], said=300), "the sender said 300 images, 3 arrived"),
        (images([0.0, 2.5], said=2) + images([5.0], said=3), "disagree on how many"),
        ([ImageGeometry("", None, None)], "not every image has a position"),
        ([], "no images"),
    ],
    ids=[
        "gap",
        "duplicate position",
        "two orientations",
        "fewer than said",
        "said differs",
        "no geometry",
        "empty",
    ],
)
def test_what_is_not_a_whole_volume_says_why(volume: list[ImageGeometry], why: str) -> None:
    assert why in whole_volume(volume)


def test_a_rule_overrides_the_node_wide_timing_where_it_says_so() -> None:
    settings = Settings(quiet_period_s=30, release_grace_s=2, force_complete_s=600)
    plain = Timing.of(Rule(name="plain"), settings)
    assert (plain.quiet_s, plain.release_grace_s, plain.fast, plain.force_s, plain.by_study) == (
        30,
        2,
        True,
        600,
        False,
    )
    study = Timing.of(
        Rule(
            name="study", complete_by="study", quiet_period_s=90, fast_completion=False, force_complete_s=60
        ),
        settings,
    )
    assert (study.quiet_s, study.fast, study.force_s, study.by_study) == (90, False, 60, True)
    assert study.earliest() == 90 and plain.earliest() == 2
