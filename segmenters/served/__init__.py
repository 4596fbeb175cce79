"""Networks the node did not train, served from the formats sites have them in (TorchScript, ONNX,
MONAI bundles, nnU-Net v2 model folders, TotalSegmentator), each with its labels coded."""
