"""Check that a folded program computes what the original did.

The tolerance is relative to each output's scale (its largest magnitude), because
folding moves a rounding step (``x ⊙ s`` is no longer rounded before the matmul)
rather than adding one, and absolute errors grow with the activations:

    float32   1e-5      float64   1e-10
    bfloat16  3e-2      float16   5e-3      (about 4 units of the last place)

Low-precision outputs also have to agree on the top-1 entry of the last axis (the
logits' argmax): a disagreement counts only where the original's two candidates
are further apart than the tolerance, so exact near-ties do not fail a fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export import ExportedProgram

from taperfx.passes._compat import tree_leaves

__all__ = ["verify", "Verification", "OutputError", "TOLERANCES"]

TOLERANCES = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@dataclass(frozen=True)
class OutputError:
    index: int  # position among the flattened tensor outputs
    dtype: torch.dtype
    max_abs: float
    max_rel: float  # max_abs / max |original output|
    top1_disagreements: int  # argmax mismatches over the last axis that are not near-ties

    @property
    def ok(self) -> bool:
        return self.max_rel <= TOLERANCES.get(self.dtype, 1e-5) and self.top1_disagreements == 0


@dataclass(frozen=True)
class Verification:
    outputs: tuple[OutputError, ...]

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.outputs)

    def __str__(self) -> str:
        return "\n".join(
            f"output {e.index} ({e.dtype}): max abs {e.max_abs:.3g}, rel {e.max_rel:.3g} "
            f"(tolerance {TOLERANCES.get(e.dtype, 1e-5):g}), top-1 disagreements {e.top1_disagreements}"
            f"{'' if e.ok else '  <-- FAILS'}"
            for e in self.outputs
        )


def _callable(program):
    return program.module() if isinstance(program, ExportedProgram) else program


def _compare(index: int, want: torch.Tensor, got: torch.Tensor) -> OutputError:
    if want.shape != got.shape or want.dtype != got.dtype:
        raise ValueError(
            f"output {index}: folded gives {got.dtype}{tuple(got.shape)}, original {want.dtype}{tuple(want.shape)}"
        )
    want64, got64 = want.double(), got.double()
    max_abs = (want64 - got64).abs().max().item() if want.numel() else 0.0
    scale = want64.abs().max().item() if want.numel() else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    disagreements = 0
    if want.dim() >= 2 and want.shape[-1] > 1:
        top_want, top_got = want64.argmax(-1, keepdim=True), got64.argmax(-1, keepdim=True)
        gap = want64.gather(-1, top_want) - want64.gather(-1, top_got)
        disagreements = int(((top_want != top_got) & (gap > TOLERANCES.get(want.dtype, 1e-5) * scale)).sum())
    return OutputError(index, want.dtype, max_abs, rel, disagreements)


@torch.no_grad()
def verify(original, folded, example_inputs: tuple, example_kwargs: dict | None = None) -> Verification:
    """Run both (ExportedProgram, GraphModule or nn.Module) on the inputs and compare every float output."""
    kwargs = example_kwargs or {}
    want = [t for t in tree_leaves(_callable(original)(*example_inputs, **kwargs)) if isinstance(t, torch.Tensor)]
    got = [t for t in tree_leaves(_callable(folded)(*example_inputs, **kwargs)) if isinstance(t, torch.Tensor)]
    if len(want) != len(got):
        raise ValueError(f"the folded program returns {len(got)} tensors, the original {len(want)}")
    return Verification(tuple(_compare(i, w, g) for i, (w, g) in enumerate(zip(want, got)) if w.is_floating_point()))
