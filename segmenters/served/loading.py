"""Served networks by kind: the card each kind reads and the network it loads, behind one call."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from segmenters.base import Segmenter
from segmenters.served.card import CARD_FILE, ModelCardError, ServedCard, read_card
from segmenters.served.runner import ServedSegmenter, choose_device

KINDS = ("torchscript", "onnx", "monai_bundle", "nnunet")


def served_card(kind: str, path: Path, card: Path | None = None) -> ServedCard:
    """The card of the TorchScript, ONNX or MONAI bundle model at ``path``: ``card``, else the
    ``model_card.json`` beside it (a bundle's own configuration otherwise)."""
    if kind == "monai_bundle":
        from segmenters.served.monai_bundle import read_bundle_card

        return read_card(card) if card is not None else read_bundle_card(path, path.name)
    if kind not in ("torchscript", "onnx"):
        raise ValueError(f"a {kind} model has no served card")
    return read_card(card if card is not None else path.parent / CARD_FILE)


def check_served(
    kind: str,
    path: Path,
    card: Path | None = None,
    folds: Sequence[int | str] | None = None,
    checkpoint_name: str = "checkpoint_final.pth",
) -> None:
    """Raise ModelCardError if the ``kind`` model at ``path`` cannot say what its labels are or
    lacks a file it loads (``segnode config check`` runs this: no weights are loaded)."""
    if kind not in KINDS:
        raise ValueError(f"no served model kind {kind!r}; kinds: {', '.join(KINDS)}")
    if kind == "nnunet":
        from segmenters.served.nnunet import check_folds, nnunet_labels

        nnunet_labels(path, card)
        check_folds(path, folds, checkpoint_name)
        return
    served_card(kind, path, card)
    if kind == "monai_bundle" and not (path / "models" / "model.pt").is_file():
        raise ModelCardError(f"MONAI bundle {path}: no models/model.pt")
    if kind == "onnx":
        from segmenters.served.onnx_model import check_external_data

        check_external_data(path)


def load_served(
    kind: str,
    path: Path,
    *,
    card: Path | None = None,
    device: str = "auto",
    amp: bool = True,
    batch_size: int = 8,
    threads: int = 0,
    folds: Sequence[int | str] | None = None,
    checkpoint_name: str = "checkpoint_final.pth",
) -> Segmenter:
    """The ``kind`` model at ``path`` loaded once, ready to segment series. ``folds`` and
    ``checkpoint_name`` are an nnU-Net model's; nnU-Net runs its own batches and precision."""
    chosen = choose_device(device)
    if kind == "nnunet":
        from segmenters.served.nnunet import NnUNetSegmenter

        return NnUNetSegmenter(path, folds=folds, checkpoint_name=checkpoint_name, card=card, device=chosen)
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
