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
