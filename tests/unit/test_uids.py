import pytest

from node.core.uids import derive_uid, is_valid_uid


@pytest.mark.parametrize(
    "uid",
    ["1.2.840.10008.5.1.4.1.1.2", "2.25.329800735698586629295641978511506172918", "1.0.3", "0.1"],
)
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    [
        "../../etc",
        "1.2.3/../..",
        "1.2.03",
        "1..2",
        ".1.2",
        "1.2.",
        "1",
        "",
        "1.2.3\x00",
        "1." + "2" * 70,
        "1.2.a",
        " 1.2.3",
        None,
        123,
    ],
)
def test_invalid_uids(uid: object) -> None:
    assert not is_valid_uid(uid)


def test_derived_uids_are_valid_stable_and_distinct() -> None:
    first = derive_uid("1.2.3", "classical", "1.0", "seg")
    assert is_valid_uid(first)
    assert first.startswith("2.25.")
    assert derive_uid("1.2.3", "classical", "1.0", "seg") == first
    assert derive_uid("1.2.3", "classical", "1.1", "seg") != first
    # Parts are delimited: moving a boundary changes the UID.
    assert derive_uid("1.2", "3") != derive_uid("1.", "23")
