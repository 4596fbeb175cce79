"""Patient ID and accession number stay out of the database: a series row keeps a keyed hash of
each (HMAC-SHA256 under a key of the node's own, in its data folder), so an admin can find a
patient's jobs by the exact value while the database alone names nobody. The values themselves
are read from the stored files, for logged-in users only."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

KEY_FILE = "search.key"
SHOWN = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyDate", "StudyDescription")


def node_key(data_dir: Path) -> bytes:
    """The node's search key, made (readable by its user alone) the first time it is needed."""
    path = data_dir / KEY_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    # Written whole under another name, then linked into place: a process that finds the key
    # finds all of it, and of two processes making one at once the first link wins.
    temporary = data_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(secrets.token_bytes(32))
        out.flush()
        os.fsync(out.fileno())
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    return path.read_bytes()


def search_key(key: bytes, value: str) -> str:
    """What a series row keeps of a patient ID or accession number ('' for none)."""
    value = value.strip()
    if not value:
        return ""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:32]


def read_identifiers(path: Path) -> dict[str, str]:
    """The patient and study identifiers of a stored instance, as its header gives them ({} when
    the file cannot be read)."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=list(SHOWN))
    except (OSError, InvalidDicomError):
        return {}
    return {name: str(ds.get(name, "") or "") for name in SHOWN}
