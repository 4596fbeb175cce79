"""Served networks by kind: the card each kind reads and the network it loads, behind one call."""

from __future__ import annotations

from pathlib import Path

from segmenters.served.card import CARD_FILE, ServedCard, read_card
from segmenters.served.runner import ServedSegmenter, choose_device

KINDS = ("torchscript", "onnx", "monai_bundle")


def served_card(kind: str, path: Path, card: Path | None = None) -> ServedCard:
    """The card of the ``kind`` model at ``path``: ``card``, else the ``model_card.json`` beside it
    (a MONAI bundle's own configuration otherwise). Raises ModelCardError for anything it lacks."""
    if kind == "monai_bundle":
        from segmenters.served.monai_bundle import read_bundle_card

        return read_card(card) if card is not None else read_bundle_card(path, path.name)
    if kind not in KINDS:
        raise ValueError(f"no served model kind {kind!r}; kinds: {', '.join(KINDS)}")
    return read_card(card if card is not None else path.parent / CARD_FILE)


def load_served(
    kind: str,
    path: Path,
    *,
    card: Path | None = None,
    device: str = "auto",
    amp: bool = True,
    batch_size: int = 8,
    threads: int = 0,
) -> ServedSegmenter:
    """The ``kind`` model at ``path`` loaded once, ready to segment series."""
    chosen = choose_device(device)
    info = served_card(kind, path, card)
    if kind == "torchscript":
        from segmenters.served.torchscript import load_torchscript

        model = load_torchscript(path, chosen)
    elif kind == "onnx":
        from segmenters.served.onnx_model import OnnxNetwork

        model = OnnxNetwork(path, chosen, threads)
    else:
        from segmenters.served.monai_bundle import load_bundle_network

        model = load_bundle_network(path, chosen)
    return ServedSegmenter(model, info, device=chosen, amp=amp, batch_size=batch_size)
