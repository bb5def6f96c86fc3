"""Check that a folded program computes what the original did, judged against the original's own error.

Folding moves a rounding step (``x ⊙ s`` is no longer rounded before the matmul)
rather than adding one, so a fixed tolerance is wrong both ways: too tight for
fp32 logits of ~7e3 or for bf16, too loose for small outputs. Instead both programs
are compared with a float64 evaluation of the *original* graph (every stored
tensor and input upcast, every floating cast read as float64): the folded program
passes when its error against that reference is within 4x the original's own
error, plus 2 units in the last place at the output's scale. Where no float64
reference can be built (an eager ``nn.Module`` given alone), or in addition to it,
the relative tolerances below apply:

    float32   1e-5      float64   1e-10
    bfloat16  3e-2      float16   5e-3      (about 4 units of the last place)

Outputs must also agree on the top-1 entry of the last axis (the logits' argmax)
wherever the original's two candidates are further apart than the tolerance.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.export import ExportedProgram

from taperfx.passes._compat import ASSERT_TENSOR_METADATA, tree_leaves

__all__ = ["verify", "expected_outputs", "Expected", "Verification", "OutputError", "TOLERANCES", "float64_reference"]

TOLERANCES = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 5e-3}
_REFERENCE_FACTOR = 4.0  # the folded program may be this many times further from float64 than the original
_ULPS = 2.0


@dataclass(frozen=True)
class OutputError:
    index: int  # position among the flattened tensor outputs
    dtype: torch.dtype
    max_abs: float  # folded vs original
    max_rel: float  # max_abs / max |original output|
    top1_disagreements: int  # argmax mismatches over the last axis that are not near-ties
    tolerance: float  # the absolute error the folded output may have against the float64 reference
    folded_error: float | None = None  # max |folded − float64 reference|; None without a reference
    original_error: float | None = None  # max |original − float64 reference|

    @property
    def ok(self) -> bool:
        if self.top1_disagreements:
            return False
        if self.max_rel <= TOLERANCES.get(self.dtype, 1e-5):
            return True
        return self.folded_error is not None and self.folded_error <= self.tolerance


@dataclass(frozen=True)
class Verification:
    outputs: tuple[OutputError, ...]

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.outputs)

    def __str__(self) -> str:
        def against(e: OutputError) -> str:
            if e.folded_error is None:
                return "no float64 reference"
            return f"vs float64: folded {e.folded_error:.3g}, original {e.original_error:.3g}, bound {e.tolerance:.3g}"

        return "\n".join(
            f"output {e.index} ({e.dtype}): max abs {e.max_abs:.3g}, rel {e.max_rel:.3g} "
            f"(tolerance {TOLERANCES.get(e.dtype, 1e-5):g}); {against(e)}; top-1 disagreements {e.top1_disagreements}"
            f"{'' if e.ok else '  <-- FAILS'}"
            for e in self.outputs
        )


def _callable(program):
    return program.module() if isinstance(program, ExportedProgram) else program


def _run(program, args, kwargs: dict):
    """Call ``program`` and put back every buffer it mutates (a step counter, a cache): the check must
    neither change the caller's program, the folded one or the model whose tensors they share, nor
    run one of them on a state another run left behind."""
    module = _callable(program)
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()] if isinstance(module, torch.nn.Module) else []
    try:
        return module(*args, **kwargs)
    finally:
        for buffer, value in saved:
            buffer.copy_(value)


def _compare(index: int, want: torch.Tensor, got: torch.Tensor, reference: torch.Tensor | None) -> OutputError:
    if want.shape != got.shape or want.dtype != got.dtype:
        raise ValueError(
            f"output {index}: folded gives {got.dtype}{tuple(got.shape)}, original {want.dtype}{tuple(want.shape)}"
        )
    if not want.numel():
        return OutputError(index, want.dtype, 0.0, 0.0, 0, 0.0, 0.0 if reference is not None else None, 0.0)
    want64, got64 = want.double(), got.double()
    max_abs = (want64 - got64).abs().max().item()
    scale = want64.abs().max().item()
    rel = max_abs / scale if scale > 0 else max_abs
    folded_error = original_error = None
    tolerance = TOLERANCES.get(want.dtype, 1e-5) * scale
    if reference is not None:
        folded_error = (got64 - reference).abs().max().item()
        original_error = (want64 - reference).abs().max().item()
        ulp = torch.finfo(want.dtype).eps * scale
        tolerance = _REFERENCE_FACTOR * original_error + _ULPS * ulp
    disagreements = 0
    if want.dim() >= 2 and want.shape[-1] > 1:
        top_want, top_got = want64.argmax(-1, keepdim=True), got64.argmax(-1, keepdim=True)
        gap = want64.gather(-1, top_want) - want64.gather(-1, top_got)
        near_tie = max(tolerance, TOLERANCES.get(want.dtype, 1e-5) * scale)
        disagreements = int(((top_want != top_got) & (gap > near_tie)).sum())
    return OutputError(index, want.dtype, max_abs, rel, disagreements, tolerance, folded_error, original_error)


def _to_f64(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(torch.float64)
    return value


def float64_reference(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule | None:
    """A float64 copy of an aten-level ``graph_module`` (stored tensors upcast, floating casts read as
    float64); call it with float64 inputs. None when the graph calls a submodule it cannot upcast."""
    graph = copy.deepcopy(graph_module.graph)
    root = {}
    for node in list(graph.nodes):
        if not node.users and (node.op == "call_module" or node.target is ASSERT_TENSOR_METADATA):
            graph.erase_node(node)  # input guards and dtype asserts: checks of the original's dtypes, not arithmetic
        elif node.op == "call_module":
            return None
        elif node.op == "get_attr":
            owner, _, field = node.target.rpartition(".")
            root[node.target] = _to_f64(getattr(graph_module.get_submodule(owner), field))
        elif node.op == "call_function":
            node.args = torch.fx.node.map_aggregate(node.args, _dtype_to_f64)
            node.kwargs = torch.fx.node.map_aggregate(node.kwargs, _dtype_to_f64)
    return torch.fx.GraphModule(root, graph)


def _dtype_to_f64(arg):
    return torch.float64 if isinstance(arg, torch.dtype) and arg.is_floating_point else arg


def _leaves(outputs) -> list[torch.Tensor]:
    return [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]


@dataclass(frozen=True)
class Expected:
    """The original's outputs on the example inputs, and their float64 reference (None where there is none)."""

    outputs: list
    references: list


@torch.no_grad()
def expected_outputs(
    original, example_inputs: tuple, example_kwargs: dict | None = None, *, reference=None
) -> Expected:
    """Run the original (and its float64 reference) once; for a fold that will overwrite the original's
    weights (``inplace=True``), call this before folding and hand the result to ``verify``."""
    kwargs = example_kwargs or {}
    want = _leaves(_run(original, example_inputs, kwargs))
    if reference is None and isinstance(original, (ExportedProgram, torch.fx.GraphModule)):
        reference = _callable(original)
    shadow = float64_reference(reference) if reference is not None else None
    refs: list = [None] * len(want)
    if shadow is not None:
        args64 = [_to_f64(a) for a in example_inputs]
        try:
            refs = _leaves(_run(shadow, args64, {k: _to_f64(v) for k, v in kwargs.items()}))
        except RuntimeError:  # an op without a float64 kernel: judge by the fixed tolerances alone
            refs = [None] * len(want)
    return Expected(want, refs)


@torch.no_grad()
def verify(
    original,
    folded,
    example_inputs: tuple,
    example_kwargs: dict | None = None,
    *,
    reference=None,
    expected: Expected | None = None,
) -> Verification:
    """Run both (ExportedProgram, GraphModule or nn.Module) on the inputs and compare every float output.

    ``reference``: an aten-level GraphModule computing the original (default: the original's own graph
    when it is an ExportedProgram or GraphModule) to evaluate in float64; see the module docstring.
    ``expected``: the original's outputs captured earlier (``expected_outputs``); the original is not run.
    """
    kwargs = example_kwargs or {}
    if expected is None:
        expected = expected_outputs(original, example_inputs, kwargs, reference=reference)
    want, refs = expected.outputs, expected.references
    got = _leaves(_run(folded, example_inputs, kwargs))
    if len(want) != len(got):
        raise ValueError(f"the folded program returns {len(got)} tensors, the original {len(want)}")
    return Verification(
        tuple(
            _compare(i, w, g, r if r is not None and r.shape == w.shape else None)
            for i, (w, g, r) in enumerate(zip(want, got, refs))
            if w.is_floating_point()
        )
    )
