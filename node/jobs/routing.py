"""Routing: which rule takes a series, or why none does.

Pure logic over plain facts, so every rule is unit-tested without DICOM or a database.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from node.core.config import Rule
from node.core.dicom import excluded_image_type


@dataclass(frozen=True)
class SeriesFacts:
    """What routing may look at, gathered from the stored series and its instances."""

    modality: str
    sop_class_uids: frozenset[str]
    image_types: frozenset[str]
    instance_count: int
    slice_thicknesses: tuple[float, ...] = ()
    body_part: str = ""
    series_description: str = ""
    calling_ae: str = ""


@dataclass(frozen=True)
class RouteDecision:
    rule: Rule | None
    # Why each rule declined, in rule order; empty when the first rule took the series.
    declined: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        if self.rule is not None:
            return f"taken by rule {self.rule.name!r}"
        if not self.declined:
            return "no routing rule is configured"
        return "no routing rule takes this series: " + "; ".join(self.declined)


def why_not(rule: Rule, facts: SeriesFacts) -> str | None:
    """The first condition of ``rule`` that ``facts`` break, in words; None if the rule matches."""
    if rule.modality and facts.modality.upper() not in {m.upper() for m in rule.modality}:
        return f"modality {facts.modality or '(none)'} is not {'/'.join(rule.modality)}"
    if rule.sop_class_uids and not facts.sop_class_uids & set(rule.sop_class_uids):
        return "SOP class is not one the rule accepts"
    excluded = rule.exclude_image_types
    if excluded and facts.image_types and all(excluded_image_type(t, excluded) for t in facts.image_types):
        return f"every image is of an excluded type ({'/'.join(sorted(t.upper() for t in excluded))})"
    if facts.instance_count < rule.min_slices:
        return f"{facts.instance_count} slices, fewer than the {rule.min_slices} required"
    if facts.slice_thicknesses and (
        rule.slice_thickness_min_mm is not None or rule.slice_thickness_max_mm is not None
    ):
        thickness = statistics.median(facts.slice_thicknesses)
        low = rule.slice_thickness_min_mm if rule.slice_thickness_min_mm is not None else 0.0
        high = rule.slice_thickness_max_mm if rule.slice_thickness_max_mm is not None else float("inf")
        if not low <= thickness <= high:
            return f"slice thickness {thickness:g} mm outside {low:g}-{high:g} mm"
    if rule.body_parts and facts.body_part.upper() not in {b.upper() for b in rule.body_parts}:
        return f"body part {facts.body_part or '(none)'} is not {'/'.join(rule.body_parts)}"
    if rule.series_description_pattern and not re.search(
        rule.series_description_pattern, facts.series_description, re.IGNORECASE
    ):
        return "series description does not match the rule's pattern"
    if rule.calling_aes and facts.calling_ae not in rule.calling_aes:
        return f"sent by {facts.calling_ae}, not by {'/'.join(rule.calling_aes)}"
    return None


def route(facts: SeriesFacts, rules: Sequence[Rule]) -> RouteDecision:
    """The first rule that takes the series, with the reasons the others declined."""
    declined: list[str] = []
    for rule in rules:
        problem = why_not(rule, facts)
        if problem is None:
            return RouteDecision(rule, declined)
        declined.append(f"rule {rule.name!r}: {problem}")
    return RouteDecision(None, declined)
