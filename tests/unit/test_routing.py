import pytest

from node.core.config import Rule
from node.jobs.routing import SeriesFacts, route

CT = "1.2.840.10008.5.1.4.1.1.2"


def facts(**overrides: object) -> SeriesFacts:
    values: dict[str, object] = {
        "modality": "CT",
        "sop_class_uids": frozenset({CT}),
        "image_types": frozenset({"ORIGINAL\\PRIMARY\\AXIAL"}),
        "instance_count": 120,
        "slice_thicknesses": (3.0,) * 120,
        "body_part": "CHEST",
        "series_description": "Thorax 3.0 B31f",
        "calling_ae": "CT01",
    }
    values.update(overrides)
    return SeriesFacts(**values)  # type: ignore[arg-type]


def test_default_rule_takes_an_axial_ct_series() -> None:
    decision = route(facts(), [Rule(name="ct")])
    assert decision.rule is not None and decision.rule.name == "ct"
    assert decision.reason == "taken by rule 'ct'"


def test_first_matching_rule_wins_and_declines_are_explained() -> None:
    rules = [Rule(name="abdomen", body_parts=["ABDOMEN"]), Rule(name="chest", body_parts=["CHEST"])]
    decision = route(facts(), rules)
    assert decision.rule is not None and decision.rule.name == "chest"
    assert decision.declined == ["rule 'abdomen': body part CHEST is not ABDOMEN"]


@pytest.mark.parametrize(
    ("rule", "series", "phrase"),
    [
        (Rule(name="r"), facts(modality="SR"), "modality SR is not CT"),
        (Rule(name="r"), facts(image_types=frozenset({"ORIGINAL\\PRIMARY\\LOCALIZER"})), "excluded type"),
        (Rule(name="r", min_slices=50), facts(instance_count=2), "2 slices, fewer than the 50 required"),
        (Rule(name="r", slice_thickness_max_mm=2.0), facts(), "slice thickness 3 mm outside 0-2 mm"),
        (Rule(name="r", slice_thickness_min_mm=5.0), facts(), "slice thickness 3 mm outside 5-inf mm"),
        (Rule(name="r", body_parts=["HEAD"]), facts(), "body part CHEST is not HEAD"),
        (Rule(name="r", series_description_pattern="lung"), facts(), "description does not match"),
        (Rule(name="r", calling_aes=["PACS"]), facts(), "sent by CT01, not by PACS"),
        (Rule(name="r", sop_class_uids=["1.2.3"]), facts(), "SOP class is not one"),
    ],
)
def test_each_condition_declines_with_its_reason(rule: Rule, series: SeriesFacts, phrase: str) -> None:
    decision = route(series, [rule])
    assert decision.rule is None
    assert phrase in decision.reason
    assert decision.reason.startswith("no routing rule takes this series: rule 'r': ")


def test_description_pattern_is_a_case_insensitive_search() -> None:
    assert route(facts(), [Rule(name="r", series_description_pattern="thorax|chest")]).rule is not None


def test_a_mixed_series_is_not_excluded_for_its_scout() -> None:
    types = frozenset({"ORIGINAL\\PRIMARY\\LOCALIZER", "ORIGINAL\\PRIMARY\\AXIAL"})
    assert route(facts(image_types=types), [Rule(name="r")]).rule is not None


def test_no_rules_is_reported() -> None:
    assert route(facts(), []).reason == "no routing rule is configured"
