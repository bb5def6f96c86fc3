"""Ship a (folded) decoder: torch.compile backend, ONNX export with KV cache, ONNX Runtime decoding.

The compile backend is not imported here: torch finds it through the
``torch_dynamo_backends`` entry point, and importing it eagerly would pull in
Inductor for users who only export ONNX.
"""

from taperfx.export.onnx_export import export_onnx, read_metadata, weights_fingerprint
from taperfx.export.ort_decoder import OnnxDecoder, ort_device_available
from taperfx.export.program import decoder_program, deployable_program

__all__ = [
    "decoder_program",
    "deployable_program",
    "export_onnx",
    "read_metadata",
    "weights_fingerprint",
    "OnnxDecoder",
    "ort_device_available",
]
