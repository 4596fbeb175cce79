"""DICOM facts the receiving side and the workers share: which SOP classes are CT images, and
which images a rule's image-type filter leaves out."""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)

VERIFICATION = "1.2.840.10008.1.1"
# One slice an instance: what the workers segment.
CT_IMAGE = str(CTImageStorage)
# Every CT image class: each must carry Pixel Data to be what it claims.
CT_IMAGE_CLASSES = frozenset(
    {CT_IMAGE, str(EnhancedCTImageStorage), str(LegacyConvertedEnhancedCTImageStorage)}
)


def excluded_image_type(image_type: str, excluded: Iterable[str]) -> bool:
    """Whether an ImageType value (values joined by ``\\``) holds one of the ``excluded`` values,
    such as LOCALIZER for a scout; case does not matter."""
    return bool({value.upper() for value in excluded} & set(image_type.upper().split("\\")))


# A-ASSOCIATE-RJ (source, reason/diagnostic) in words, PS3.8 9.3.4.
REJECTION_REASONS = {
    (0x01, 0x01): "no reason given",
    (0x01, 0x02): "application context name not supported",
    (0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x07): "called AE title not recognised",
    (0x02, 0x01): "no reason given",
    (0x02, 0x02): "protocol version not supported",
    (0x03, 0x01): "temporary congestion",
    (0x03, 0x02): "local limit exceeded",
}


def rejection_reason(source: int | None, diagnostic: int | None) -> str:
    return REJECTION_REASONS.get((int(source or 0), int(diagnostic or 0)), "no reason given")
