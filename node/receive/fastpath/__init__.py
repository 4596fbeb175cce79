"""pynetdicom's per-instance path trimmed where it was measured to pay (benchmarks/RESULTS.md).

Everything in this folder leans on pynetdicom internals, and nothing outside it does. It runs only
with ``scp.fast_path: true`` and an installed pynetdicom that tests/contract passed with; otherwise
the listener receives on pynetdicom's public API (node/receive/paths.py).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

# The pynetdicom releases whose internals tests/contract checked; pyproject.toml pins the same.
TESTED_PYNETDICOM = ("3.0.4",)


def unavailable() -> str | None:
    """Why the fast path cannot run with the installed pynetdicom, or None when it can."""
    try:
        installed = version("pynetdicom")
    except PackageNotFoundError:
        return "the installed pynetdicom's version cannot be read"
    if installed not in TESTED_PYNETDICOM:
        return f"pynetdicom {installed} is not a version it was tested with ({', '.join(TESTED_PYNETDICOM)})"
    try:
        importlib.import_module("node.receive.fastpath.path")
    except (ImportError, AttributeError) as err:  # a seam moved although the version matches
        return f"pynetdicom's internals differ from the tested ones ({err})"
    return None
