"""The calibrate-then-taper step most tests need, written once."""

import torch

import taperfx


def taper_to(model: torch.nn.Module, *inputs, gate: float = 0.0) -> torch.nn.Module:
    """Calibrate ``model``'s TaperNorms on one training-mode forward of ``inputs``, start the taper,
    set the gate, and return the model in eval mode."""
    taperfx.calibrate(model, [inputs])
    taperfx.set_gate(model, gate)
    return model.eval()
