"""Supported presentation contexts that are cheap to copy for each association.

pynetdicom deep-copies the listener's supported contexts for every association it accepts, and
pydicom validates every copied UID again: a dozen milliseconds of CPU under the GIL per association
(figures in benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

from pynetdicom import AE
from pynetdicom.presentation import PresentationContext


class _SharedUIDContext(PresentationContext):
    """A supported presentation context whose copy shares its (immutable) UIDs; what negotiation
    changes, its list of transfer syntaxes, is still the copy's own."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedUIDContext:
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy._transfer_syntax = list(self._transfer_syntax)
        return copy


def supported_contexts(ae: AE) -> list[PresentationContext]:
    """``ae``'s supported presentation contexts, cheap to copy for each association."""
    contexts: list[PresentationContext] = []
    for context in ae.supported_contexts:
        shared = _SharedUIDContext()
        shared.__dict__.update(context.__dict__)
        contexts.append(shared)
    return contexts
