"""A hypothesis grammar of small graphs around norms at g = 0, for the generative fold tests.

A drawn ``Case`` is a program of independent ``Block`` s on one input. Each block
is a norm (a TaperNorm, or a hand-written map in one of several centering forms)
whose output feeds a set of consumers: linears written as ``nn.Linear``,
``F.linear``, ``@`` and ``matmul``, with weights and biases that may be shared or
read in both orientations, behind ops that keep features (eval-mode dropout,
token reshapes and slices, casts, token splits), plus an optional side use that
no fold may absorb. ``Block.hazards`` are the reason codes the block's norm could
rightly be refused with; a block without hazards must fold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

import taperfx

NORMS = ("taper_ln", "taper_rms", "hand_ln", "hand_ln_alpha", "hand_rms")
CONSUMERS = ("module", "functional", "matmul_t", "matmul_in_out", "linear_of_t")
BETWEEN = ("none", "dropout", "flatten_tokens", "slice_tokens", "cast", "split_tokens")
SIDE_USES = {"none": None, "relu": "not_a_linear_consumer", "returned": "not_a_linear_consumer"}
SIDE_USES["feature_slice"] = "slices_feature_axis"
DTYPES = (torch.float32, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Consumer:
    kind: str  # one of CONSUMERS
    weight: int  # index into the case's weights (equal indices share one Parameter)
    bias: int | None  # index into the case's biases, or no bias
    between: str  # one of BETWEEN


@dataclass(frozen=True)
class Block:
    """One norm and what reads its output."""

    norm: str  # one of NORMS
    out: int  # output features of every weight (== the width makes weights square)
    consumers: tuple[Consumer, ...]
    side_use: str  # a key of SIDE_USES
    hazards: frozenset = field(default_factory=frozenset)


@dataclass(frozen=True)
class Case:
    """A program of independent blocks on one input (several norm cases per export keeps CI fast)."""

    width: int
    blocks: tuple[Block, ...]
    input_name: str
    decompose: bool
    dynamic: bool
    dtype: torch.dtype
    entry: str  # "program" or "module"
    seed: int


def _hazards(block: Block, width: int, entry: str, decompose: bool) -> frozenset:
    """The codes this block may be refused with (a block with none must fold completely)."""
    codes = set()
    if SIDE_USES[block.side_use]:
        codes.add(SIDE_USES[block.side_use])
    layouts: dict[int, set[bool]] = {}
    for c in block.consumers:
        layouts.setdefault(c.weight, set()).add(c.kind in ("matmul_in_out", "linear_of_t"))
    if block.out == width and any(len(v) > 1 for v in layouts.values()):  # one square Parameter, two layouts
        codes.add("layout_conflict")
    biases: dict[int, set[int]] = {}
    for c in block.consumers:
        if c.bias is not None:
            biases.setdefault(c.bias, set()).add(c.weight)
    if any(len(w) > 1 for w in biases.values()) and block.norm in ("taper_ln", "hand_ln"):
        codes.add("shared_bias_conflict")
    if decompose and any(c.between in ("slice_tokens", "split_tokens") for c in block.consumers):
        codes.add("decomposed_bmm")  # a linear on a non-contiguous view decomposes to expand + bmm
    if entry == "module":
        if not block.norm.startswith("taper"):
            codes.add("not_a_module_norm")
        modules = [c.weight for c in block.consumers if c.kind == "module"]
        if (
            any(c.kind != "module" for c in block.consumers)
            or any(c.between == "split_tokens" for c in block.consumers)  # one module called once per piece
            or len(modules) != len(set(modules))
        ):
            codes.add("not_a_linear_module")
    return frozenset(codes)


@st.composite
def blocks(draw, width: int, entry: str, decompose: bool) -> Block:
    n = draw(st.integers(1, 3))
    n_weights = draw(st.integers(1, n))
    consumers = tuple(
        Consumer(
            kind=draw(st.sampled_from(CONSUMERS)),
            weight=draw(st.integers(0, n_weights - 1)),
            bias=draw(st.one_of(st.none(), st.integers(0, 1))),
            between=draw(st.sampled_from(BETWEEN)),
        )
        for _ in range(n)
    )
    block = Block(
        norm=draw(st.sampled_from(NORMS)),
        out=width if draw(st.booleans()) else width + 3,
        consumers=consumers,
        side_use=draw(st.sampled_from(list(SIDE_USES))),
    )
    return Block(**{**block.__dict__, "hazards": _hazards(block, width, entry, decompose)})


@st.composite
def cases(draw, max_blocks: int = 4) -> Case:
    width = draw(st.sampled_from([4, 6, 8]))
    entry = draw(st.sampled_from(["program", "program", "module"]))
    decompose = entry == "program" and draw(st.booleans())
    return Case(
        width=width,
        blocks=tuple(draw(st.lists(blocks(width, entry, decompose), min_size=1, max_size=max_blocks))),
        input_name=draw(st.sampled_from(["x", "input"])),
        decompose=decompose,
        dynamic=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)),
        entry=entry,
        seed=draw(st.integers(0, 2**16)),
    )


class HandNorm(nn.Module):
    """A gate-zero map written by hand: ``(x − mean x) ⊙ w + b``, the same with ``sub(alpha=…)``, or ``x ⊙ (c·w)``."""

    def __init__(self, form: str, width: int) -> None:
        super().__init__()
        self.form = form
        self.weight = nn.Parameter(torch.randn(width) * 0.5 + 1)
        self.bias = nn.Parameter(torch.randn(width) * 0.5)
        self.register_buffer("c", torch.tensor(0.7))

    def forward(self, x):
        if self.form == "hand_rms":
            return x * (self.c * self.weight)
        alpha = 0.5 if self.form == "hand_ln_alpha" else 1
        return torch.sub(x, x.mean(-1, keepdim=True), alpha=alpha) * self.weight + self.bias


class BlockModule(nn.Module):
    """The module a ``Block`` describes: returns its consumers' outputs, flattened and concatenated."""

    def __init__(self, block: Block, width: int) -> None:
        super().__init__()
        self.block = block
        d, out = width, block.out
        if block.norm == "taper_ln":
            self.norm = taperfx.TaperLayerNorm(d)
        elif block.norm == "taper_rms":
            self.norm = taperfx.TaperRMSNorm(d)
        else:
            self.norm = HandNorm(block.norm, d)
        n_weights = 1 + max(c.weight for c in block.consumers)
        self.linears = nn.ModuleList(nn.Linear(d, out, bias=False) for _ in range(n_weights))
        self.biases = nn.ParameterList(nn.Parameter(torch.randn(out)) for _ in range(2))
        if out != d:  # (in, out) readers need their own (d, out) tensors when W is not square
            self.in_out = nn.ParameterList(nn.Parameter(torch.randn(d, out) / d**0.5) for _ in range(n_weights))

    def _weight(self, c: Consumer) -> torch.Tensor:
        """The (out, in) weight, or for (in, out) readers the same Parameter when square (both orientations)."""
        if c.kind in ("matmul_in_out", "linear_of_t") and self.block.out != self.norm.weight.shape[-1]:
            return self.in_out[c.weight]
        return self.linears[c.weight].weight

    def _consume(self, c: Consumer, h: torch.Tensor) -> torch.Tensor:
        w = self._weight(c)
        if c.kind == "module":
            y = self.linears[c.weight](h)
        elif c.kind == "functional":
            y = F.linear(h, w)
        elif c.kind == "matmul_t":
            y = h @ w.T
        elif c.kind == "matmul_in_out":
            y = torch.matmul(h, w)
        else:
            y = F.linear(h, w.t())
        return y if c.bias is None else y + self.biases[c.bias]

    @staticmethod
    def _between(kind: str, h: torch.Tensor) -> list[torch.Tensor]:
        if kind == "dropout":
            return [F.dropout(h, 0.2, training=False)]
        if kind == "flatten_tokens":
            return [h.reshape(-1, h.shape[-1])]
        if kind == "slice_tokens":
            return [h[:, :1]]
        if kind == "cast":
            return [h.to(torch.float64).to(h.dtype)]
        if kind == "split_tokens":
            return list(h.split(1, dim=1))
        return [h]

    def forward(self, x) -> list[torch.Tensor]:
        h = self.norm(x)
        outs = [self._consume(c, p).flatten() for c in self.block.consumers for p in self._between(c.between, h)]
        total = torch.cat(outs)
        if self.block.side_use == "relu":
            return [total + h.relu().sum()]
        if self.block.side_use == "feature_slice":
            return [total + h[..., :1].sum()]
        return [total, h] if self.block.side_use == "returned" else [total]


class Generated(nn.Module):
    """The blocks of a ``Case``, each on the same input; returns every block's outputs as one tuple."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(BlockModule(block, case.width) for block in case.blocks)

    def forward(self, x):
        return tuple(out for block in self.blocks for out in block(x))


class NamedInput(Generated):
    """The same module with ``forward(input)``, as every ``nn.Sequential`` has."""

    def forward(self, input):  # noqa: A002 - the name is the point
        return super().forward(input)


def build(case: Case) -> tuple[nn.Module, torch.Tensor]:
    """The model at g = 0 (calibrated, random γ̃ and β) in the case's dtype, and an example input."""
    torch.manual_seed(case.seed)
    model = (NamedInput if case.input_name == "input" else Generated)(case)
    x = torch.randn(2, 3, case.width)
    if any(block.norm.startswith("taper") for block in case.blocks):
        taperfx.calibrate(model, [x])
        taperfx.set_gate(model, 0.0)
        with torch.no_grad():
            for norm in taperfx.tapernorms(model):
                norm.weight_tilde.normal_(1.0, 0.3)
                if getattr(norm, "bias", None) is not None:
                    norm.bias.normal_(0.0, 0.5)
    return model.eval().to(case.dtype), x.to(case.dtype)
