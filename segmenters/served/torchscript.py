"""TorchScript exports (``torch.jit.save``): a network with its code, loaded without its source."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def load_torchscript(path: Path, device: torch.device) -> nn.Module:
    """The scripted or traced network at ``path`` on ``device``, in eval mode."""
    if not path.is_file():
        raise FileNotFoundError(f"TorchScript file {path} does not exist")
    model: nn.Module = torch.jit.load(str(path), map_location=device)
    return model.eval()
