"""ONNX models run by onnxruntime (the optional ``onnx`` extra): on the GPU through its CUDA
provider when the worker has one, else on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class OnnxNetwork(nn.Module):
    """An onnxruntime session behind a module's call, so it runs where any network runs: tensors in,
    logits out (through host memory, which onnxruntime's numpy interface needs)."""

    def __init__(self, path: Path, device: torch.device, threads: int = 0) -> None:
        super().__init__()
        ort = _onnxruntime()
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file {path} does not exist")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{path}: a segmentation network takes one input; this one takes {len(inputs)}")
        self.input_name = inputs[0].name
        self.providers = self.session.get_providers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            "serving an ONNX model needs onnxruntime: pip install 'segnode[onnx]' "
            "(onnxruntime-gpu instead on a GPU worker)"
        ) from err
    return onnxruntime
