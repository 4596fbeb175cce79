"""Waiting in tests for a state to be reached, never for a number of seconds to pass."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether ``check()`` became true within ``timeout`` seconds (the bound only ends a wait
    that would otherwise be endless)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()
