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


def check_external_data(path: Path) -> None:
    """Raise ModelCardError when the ONNX file keeps weights in files beside it that are missing
    (``model.onnx.data``: copied without it, the model fails only when a worker loads it)."""
    try:
        import onnx
        from onnx.external_data_helper import uses_external_data
    except ImportError as err:
        raise ImportError(
            "serving an ONNX model needs onnx and onnxruntime: pip install 'segnode[onnx]'"
        ) from err
    from segmenters.served.card import ModelCardError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError, a folder: not a model onnxruntime could load
        raise ModelCardError(f"ONNX model {path} cannot be read ({type(err).__name__})") from err
    wanted = {
        entry.value
        for tensor in model.graph.initializer
        if uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    missing = sorted(name for name in wanted if not (path.parent / name).is_file())
    if missing:
        raise ModelCardError(f"ONNX model {path}: its weights file(s) {', '.join(missing)} are not beside it")
