"""Named segmenters a routing rule can choose.

A routing rule names a segmenter; the worker builds it once per process through this registry.
Built-in segmenters register here; third-party ones are found through the ``segnode.segmenters``
entry-point group, so an ML engineer ships a network as a package without touching this code.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from segmenters.base import Segmenter

Factory = Callable[[], Segmenter]


def _classical() -> Segmenter:
    from segmenters.classical import ClassicalSegmenter

    return ClassicalSegmenter()


def _demo_thorax_unet() -> Segmenter:
    from segmenters.checkpoint import NetworkSegmenter

    return NetworkSegmenter(DEMO_CHECKPOINT)


# A small U-Net trained on synthetic phantoms only (segmenters/demo/README.md): a demo model, named
# so in every SEG it writes; not for clinical images.
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "demo" / "demo-thorax-unet.pt"

_BUILTIN: dict[str, Factory] = {"classical": _classical, "demo-thorax-unet": _demo_thorax_unet}


class UnknownSegmenterError(LookupError):
    """A routing rule names a segmenter that is not installed."""


def available() -> dict[str, Factory]:
    """Every installed segmenter by name: the built-in ones and those of entry points."""
    found = dict(_BUILTIN)
    for ep in entry_points(group="segnode.segmenters"):
        found.setdefault(ep.name, ep.load())
    return found


def create(name: str) -> Segmenter:
    """Build the segmenter called ``name`` (loading its weights, if any)."""
    factories = available()
    if name not in factories:
        raise UnknownSegmenterError(
            f"segmenter {name!r} is not installed; installed: {', '.join(sorted(factories))}"
        )
    return factories[name]()
