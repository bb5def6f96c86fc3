"""Run an exported decoder with ONNX Runtime, keeping the KV cache on the device between steps.

``OnnxDecoder`` has the reference models' calling convention
``step(input_ids, positions, past_key_values) -> (logits, present)``, so
``taperfx.models.generate``/``stream`` drive it unchanged (and sample with the same
``sample_next``). The cache it returns is a list of ``OrtValue``: the ``present``
outputs of one step are bound as the ``past_key_values`` inputs of the next
through IO binding, so the cache never travels through numpy. Only the small
token/position inputs and the logits (needed on the host to pick the next token)
cross the host boundary.

Prefill uses the same graph with a zero-length past, which the exported graph
accepts because the past length is a symbolic dimension.

Agreement with eager PyTorch (float32, tested): greedy tokens are identical and
logits agree to 1e-4 absolute; the remaining difference is operation order
(ONNX Runtime's fused kernels, weights folded in float64 then rounded once).
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import torch

from taperfx.errors import BadInput, DataError

__all__ = ["OnnxDecoder", "ort_device_available"]

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def ort_device_available(device: str) -> bool:
    """Whether this onnxruntime build can run on ``device`` ("cpu" or "cuda")."""
    return _PROVIDERS.get(device) in ort.get_available_providers()


class OnnxDecoder:
    """A decode step over ``model.onnx`` on ``device`` ("cpu" or "cuda", the latter needs onnxruntime-gpu)."""

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu", options: ort.SessionOptions | None = None):
        if device not in _PROVIDERS:
            raise BadInput(f"device must be one of {sorted(_PROVIDERS)}, got {device!r}")
        if not ort_device_available(device):
            raise BadInput(
                f"onnxruntime has no {_PROVIDERS[device]} (available: {ort.get_available_providers()}); "
                "install onnxruntime-gpu for CUDA"
            )
        self.device = device
        self.session = ort.InferenceSession(str(path), options, providers=[_PROVIDERS[device]])
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = {"input_ids", "position_ids"} - set(inputs)
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        if missing or not self.past_names or len(self.past_names) != len(self.present_names):
            raise DataError(f"{path} is not a taperfx decoder: inputs {sorted(inputs)}")
        past = inputs[self.past_names[0]]
        self._kv_heads, self._kv_head_dim = past.shape[1], past.shape[3]
        self._kv_dtype = _NUMPY_DTYPES.get(past.type)
        if self._kv_dtype is None:
            raise DataError(f"unsupported KV cache element type {past.type} in {path}")

    def empty_cache(self, batch: int) -> list[ort.OrtValue]:
        """Zero-length past for prefill, allocated on the decoding device."""
        shape = (batch, self._kv_heads, 0, self._kv_head_dim)
        return [
            ort.OrtValue.ortvalue_from_shape_and_type(shape, self._kv_dtype, self.device, 0) for _ in self.past_names
        ]

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, past_key_values: list[ort.OrtValue] | None = None
    ) -> tuple[torch.Tensor, list[ort.OrtValue]]:
        if input_ids.dim() != 2 or positions.shape != input_ids.shape:
            raise BadInput(
                "input_ids and positions must both be (batch, seq); "
                f"got {tuple(input_ids.shape)} and {tuple(positions.shape)}"
            )
        cache = self.empty_cache(input_ids.shape[0]) if past_key_values is None else past_key_values
        if len(cache) != len(self.past_names):
            raise BadInput(f"past_key_values has {len(cache)} tensors, the model takes {len(self.past_names)}")
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids.cpu().numpy(), dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions.cpu().numpy(), dtype=np.int64))
        for name, value in zip(self.past_names, cache):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device, 0)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return torch.from_numpy(logits.numpy()), present
