"""Destinations by kind: a new kind of destination is one new module and one registry entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from node.core.config import DicomDestination, DicomWebDestination
from workers.destinations.dicom import send_by_c_store
from workers.destinations.dicomweb import send_by_stow


class Sender(Protocol):
    def __call__(self, destination: Any, paths: list[Path], calling_ae: str, timeout_s: float) -> str:
        """Send ``paths``, no wait longer than ``timeout_s``; return the peer's answer in words, or
        raise DestinationUnavailableError (try again later) or DeliveryRefusedError (it never will)."""
        ...


SENDERS: dict[str, Sender] = {"dicom": send_by_c_store, "dicomweb": send_by_stow}


def send(
    destination: DicomDestination | DicomWebDestination, paths: list[Path], calling_ae: str, timeout_s: float
) -> str:
    return SENDERS[destination.kind](destination, paths, calling_ae, timeout_s)
