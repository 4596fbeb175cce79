"""DICOM UIDs: checking received ones and deriving our own.

A received UID becomes part of a file path, so it is checked against the UID grammar of PS3.5 §9.1
(digits and dots, no leading zeros in a component, at most 64 characters) before it is used: a UID
such as ``../../etc`` can never name a folder.

Output UIDs are derived, not random: the same input and the same segmenter version always give the
same SEG UIDs, so a retry or a resend never puts a second copy into the PACS.
"""

from __future__ import annotations

import hashlib
import re

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a syntactically valid DICOM UID (PS3.5 §9.1)."""
    return isinstance(value, str) and len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def derive_uid(*parts: str) -> str:
    """A UID under the ``2.25`` root (PS3.5 §B.2) derived from ``parts`` by SHA-256.

    128 bits of the digest become the decimal integer after ``2.25.``, as for a UUID-derived UID.
    """
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"
