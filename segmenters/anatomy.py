"""Coded anatomy: the structures segnode's segmenters label, each coded once (SNOMED CT).

Types as DICOM CID 7192 / 7151 list them, laterality from CID 244, all under the category
"Anatomical Structure" (CID 7150). A segmenter picks its structures here and gives each its label
value, so the same organ carries the same codes in every SEG whatever made it.
"""

from __future__ import annotations

from segmenters.base import ANATOMICAL_STRUCTURE, ENTIRE_BODY, Concept, Structure

RIGHT = Concept("24028007", "Right")
LEFT = Concept("7771000", "Left")
_LUNG = Concept("39607008", "Lung")

# key: (name shown in the SEG, type, laterality, display colour). Every structure has a colour of its
# own, far enough from every other (CIE76 distance of at least 15) to be told apart on screen.
_ANATOMY: dict[str, tuple[str, Concept, Concept | None, tuple[int, int, int]]] = {
    # A label map holds the body as what the other structures leave of it; the SEG writes the whole
    # body (every label), which is what "Entire body" names (Structure.covers_all_labels).
    "body": ("Body", ENTIRE_BODY, None, (177, 122, 101)),
    "right_lung": ("Right lung", _LUNG, RIGHT, (72, 160, 220)),
    "left_lung": ("Left lung", _LUNG, LEFT, (110, 190, 110)),
    "heart": ("Heart", Concept("80891009", "Heart"), None, (206, 110, 84)),
    "esophagus": ("Esophagus", Concept("32849002", "Esophagus"), None, (211, 171, 143)),
    "spinal_cord": ("Spinal cord", Concept("2748008", "Spinal cord"), None, (244, 214, 49)),
    "airways": ("Trachea and bronchi", Concept("110726009", "Trachea and bronchus"), None, (182, 228, 255)),
}


def keys() -> tuple[str, ...]:
    """The keys of every structure in the table."""
    return tuple(_ANATOMY)


def key_for(name: str) -> str | None:
    """The key of the structure ``name`` names: a key in any case and spacing (``Left lung``,
    ``left_lung``) or the name a SEG shows (``Trachea and bronchi``); None when none does."""
    wanted = name.strip().lower().replace(" ", "_")
    for key, (shown, *_) in _ANATOMY.items():
        if wanted in (key, shown.lower().replace(" ", "_")):
            return key
    return None


def structure(label: int, key: str) -> Structure:
    """The coded structure ``key`` (a key of the table above) as label value ``label``."""
    name, type_, laterality, rgb = _ANATOMY[key]
    return Structure(label, name, ANATOMICAL_STRUCTURE, type_, laterality, rgb)
