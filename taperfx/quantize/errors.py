"""Why quantization refused: each failure has a machine-readable ``code`` and a message naming the problem."""

from __future__ import annotations

from taperfx.errors import BadInput

__all__ = ["QuantizeError", "UnknownScheme", "UnsupportedShape", "UnsupportedDevice", "NotQuantized"]


class QuantizeError(BadInput):
    """A quantization request that cannot be carried out as asked (the command line exits 2 with the code)."""

    code = "quantize"


class UnknownScheme(QuantizeError):
    """The scheme or one of its options does not exist (e.g. ``int3``, ``int4:g48``)."""

    code = "quantize-unknown-scheme"


class UnsupportedShape(QuantizeError):
    """A weight the kernel cannot take even after padding (e.g. a 3-D weight, a K the group size cannot cover)."""

    code = "quantize-unsupported-shape"


class UnsupportedDevice(QuantizeError):
    """No kernel for the weights' device (e.g. a CUDA ExportedProgram: CUDA goes through torchao on modules)."""

    code = "quantize-unsupported-device"


class NotQuantized(QuantizeError):
    """Nothing in the model matched: no linear layer with a stored 2-D weight was found."""

    code = "quantize-nothing-matched"
