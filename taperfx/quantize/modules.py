"""Drop-in replacements for ``nn.Linear`` and ``nn.Embedding`` that hold a quantized weight (CPU kernels).

Each keeps its quantized tensors as buffers, so ``state_dict``, ``.to(device)`` and
``torch.save`` see them, and calls its ``Kernel``'s plain function (not the registered
operator: see ``taperfx.quantize.ops`` on dispatch cost).
"""

from __future__ import annotations

import torch
from torch import nn

from taperfx.quantize.handlers import Kernel

__all__ = ["QuantizedLinear", "QuantizedEmbedding"]


class _Quantized(nn.Module):
    def __init__(self, kernel: Kernel) -> None:
        super().__init__()
        self.fn, self.scalars = kernel.fn, kernel.scalars
        self.names = tuple(name for name, _ in kernel.tensors)
        for name, tensor in kernel.tensors:
            self.register_buffer(name, tensor)

    def quantized_tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.names]

    def extra_repr(self) -> str:
        return f"fn={self.fn.__name__}, scalars={self.scalars}"


class QuantizedLinear(_Quantized):
    """``y = x Wᵀ + b`` with W quantized (``out_features`` kept for code that asks a linear for its width)."""

    def __init__(self, kernel: Kernel, bias: torch.Tensor | None, in_features: int, out_features: int) -> None:
        super().__init__(kernel)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.quantized_tensors(), self.bias, *self.scalars)

    @property
    def weight(self) -> torch.Tensor:
        """The weight the kernel multiplies by, dequantized (the kernel applied to the identity), for code that
        reads a linear's weight instead of calling it, such as ``nn.TransformerEncoderLayer``'s fused fast path."""
        eye = torch.eye(self.in_features, device=self.quantized_tensors()[0].device)
        return self.fn(eye, *self.quantized_tensors(), None, *self.scalars).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {super().extra_repr()}"


class QuantizedEmbedding(_Quantized):
    """A token table stored quantized; only the gathered rows are dequantized."""

    def __init__(self, kernel: Kernel, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(kernel)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fn(*self.quantized_tensors(), ids, *self.scalars)
