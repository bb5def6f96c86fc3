"""Find gate-zero norm maps in an aten graph, and the linear layers each one feeds.

Written by hand over the graph rather than with ``torch.fx``'s SubgraphMatcher: that
matcher rejects a match whose inner node has users outside the pattern, and the
output of a norm normally feeds q, k and v (or gate and up) at once.

A *map* is ``y = x ⊙ s`` (RMS at g = 0) or ``y = (x − mean(x)) ⊙ s`` (LN at g = 0),
optionally ``+ β``, where ``s`` is a per-feature vector and ``s``, ``β`` are stored
tensors (parameters, buffers, lifted constants, ``get_attr`` attributes) or
products of them, in either operand order, possibly as a chain of multiplies.
A *linear use* is ``aten.linear`` (the default export IR) or ``mm``/``addmm``
behind a ``view`` (after ``run_decompositions()``), with the weight stored as
(out, in) behind ``t``/``permute``, or as (in, out) used directly (``x @ W``).
Between the map and the linear there may be ops that keep every feature in place
(``_keeps_features``: GPT-2's ``view`` after ``ln_f``, Llama's full slice before
``lm_head``). Not matched, and reported: the ``expand`` + ``bmm`` form that
``run_decompositions()`` gives a linear on a non-contiguous input.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import Node

from taperfx.kinds import NormKind
from taperfx.passes._compat import ASSERT_TENSOR_METADATA
from taperfx.passes.reasons import SkipReason

__all__ = ["NormMap", "LinearUse", "Matcher", "Refusal", "STRIDE_BOUND_VIEWS", "normalizing_layers", "layer_name"]

aten = torch.ops.aten

Lookup = Callable[[Node], "torch.Tensor | None"]
Refusal = tuple[SkipReason, str]  # (code, detail)

# What a real RMSNorm / LayerNorm (or a TaperNorm at g > 0) leaves in the graph,
# before and after run_decompositions(); rsqrt marks the per-token statistics.
_NORMALIZING_OPS = (aten.rms_norm.default, aten.layer_norm.default, aten.native_layer_norm.default, aten.rsqrt.default)
_VIEW_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
# The views among them that raise on strides they cannot reinterpret (reshape copies instead).
STRIDE_BOUND_VIEWS = (aten.view.default, aten._unsafe_view.default)
_TRANSPOSE_OPS = (aten.t.default, aten.permute.default, aten.transpose.int, aten.numpy_T.default)
# Ops that may pass the map's output on to a linear without mixing features (see _keeps_features).
_PASS_THROUGH_OPS = (
    *_VIEW_OPS,
    aten.alias.default,
    aten.detach.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.expand.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.slice.Tensor,
    aten.select.int,
    aten.narrow.default,
    aten.transpose.int,
    aten.permute.default,
    aten.dropout.default,  # only in eval mode (train=False), see _keeps_features
    aten._to_copy.default,  # a cast: the map is per feature, so it commutes up to rounding
    aten.to.dtype,
    torch.ops.prims.convert_element_type.default,  # the cast after run_decompositions()
)
# Keyword arguments of pass-through ops that leave every value as it is (a cast only rounds).
_VALUE_KEEPING_KWARGS = {
    aten.clone.default: {"memory_format"},
    aten.contiguous.default: {"memory_format"},
    aten._to_copy.default: {"dtype", "memory_format"},
}
# Ops that split a tensor into pieces read through getitem; they keep features when they split another axis.
# The casts among them: each must hold every value of the map's dtype (see _range_covers).
_CASTS = (aten._to_copy.default, aten.to.dtype, torch.ops.prims.convert_element_type.default)
_SPLIT_OPS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)
_SLICE_OPS = (
    aten.slice.Tensor,
    aten.narrow.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.chunk.default,
    aten.select.int,
)


@dataclass
class NormMap:
    """``output = (source − [mean source]) ⊙ scale [+ shift]``; ``nodes`` are the map's own nodes, in graph order."""

    source: Node
    output: Node
    nodes: list[Node]
    scale: torch.Tensor  # float64, (d,)
    shift: torch.Tensor | None  # float64, (d,)
    centered: bool
    name: str

    @property
    def kind(self) -> NormKind:
        return NormKind.LN if self.centered else NormKind.RMS


@dataclass
class LinearUse:
    """One linear layer reading a norm's output, directly or through the ops of ``path``.

    ``chain`` are the transposes between the stored weight and the consumer (outermost last);
    ``in_out`` says how the consumer reads the stored tensor: True for (in, out) (``x @ W``),
    False for (out, in) (``nn.Linear``). The layout is part of the folded value's identity.
    """

    path: tuple[Node, ...]  # the feature-keeping ops from the norm output to the consumer, in order
    matmul: Node  # linear, mm, addmm or matmul
    weight: Node  # the stored weight
    chain: tuple[Node, ...]  # t/permute/transpose nodes from the stored weight to the consumer
    bias: Node | None
    in_out: bool
    # The ``view`` s on the path (as matched; a fold turns them into ``reshape``): they need strides they can
    # reinterpret, and the norm's input, which a fold hands them instead of the map's fresh output, may be a slice.
    views: tuple[Node, ...] = ()

    @property
    def reader(self) -> Node:
        """The first node on the path from the norm output to the consumer (the one a fold rewires)."""
        return self.path[0] if self.path else self.matmul


def layer_name(node: Node) -> str:
    """Module path of the innermost module that produced ``node``; the node name when unknown."""
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else node.name


def _layer_type(node: Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    kind = list(stack.values())[-1][1]
    return (kind if isinstance(kind, str) else kind.__qualname__).rsplit(".", 1)[-1]


def normalizing_layers(graph: torch.fx.Graph) -> dict[str, tuple[SkipReason, str]]:
    """``{layer name: (code, detail)}`` for every layer that still computes per-token statistics."""
    found = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _NORMALIZING_OPS:
            kind = _layer_type(node)
            if kind is None:
                reason = (SkipReason.REAL_NORM, f"{node.target} computes per-token statistics: a real normalization")
            elif kind.startswith("Taper"):
                reason = (SkipReason.GATE_ABOVE_ZERO, f"{kind} with a gate above 0 still normalizes; only g = 0 folds")
            else:
                reason = (SkipReason.REAL_NORM, f"{kind} is a real normalization layer, never folded")
            found.setdefault(layer_name(node), reason)
    return found


def _shape(node: Node) -> torch.Size | None:
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    return getattr(val, "shape", None)


def _dtype(node: Node) -> torch.dtype | None:
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    return getattr(val, "dtype", None)


def _is_call(node, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _swaps_last_two(node: Node) -> bool | None:
    """Whether a 2-D transpose-like node swaps its operand's axes (None: not a 2-D transpose-like node)."""
    shape = _shape(node)
    if not _is_call(node, *_TRANSPOSE_OPS) or node.kwargs or shape is None or len(shape) != 2:
        return None
    if node.target in (aten.t.default, aten.numpy_T.default):
        return True
    if node.target is aten.permute.default:
        return [d % 2 for d in node.args[1]] == [1, 0]
    return sorted(d % 2 for d in node.args[1:3]) == [0, 1]


def _plain(node: Node, **defaults) -> bool:
    """True when every keyword argument of ``node`` is one of ``defaults`` at its default value.

    A keyword such as ``alpha`` of ``sub`` or ``beta`` of ``addmm`` changes what the op
    computes; the matcher models only the default meaning, so anything else is refused.
    """
    return all(k in defaults and v == defaults[k] for k, v in node.kwargs.items())


class Matcher:
    """Matches maps and uses over one graph; ``stored`` gives a node's tensor if it is stored state."""

    def __init__(self, stored: Lookup) -> None:
        self.stored = stored
        self._constants: dict[Node, torch.Tensor | None] = {}

    # -- constants ----------------------------------------------------------------------
    def constant(self, arg) -> torch.Tensor | None:
        """float64 value of a stored tensor, a Python number, or a product of those (evaluated once)."""
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return torch.tensor(float(arg), dtype=torch.float64)
        if not isinstance(arg, Node):
            return None
        if arg not in self._constants:
            value = self.stored(arg)
            if value is not None:
                value = value.detach().to(torch.float64)
            elif _is_call(arg, aten.mul.Tensor, aten.mul.Scalar):
                a, b = (self.constant(x) for x in arg.args[:2])
                value = None if a is None or b is None else a * b
            self._constants[arg] = value
        return self._constants[arg]

    def _split(self, node, target) -> tuple[Node, torch.Tensor] | None:
        """``(x, k)`` when ``node = target(x, k)`` or ``target(k, x)`` with k constant and x not."""
        if not _is_call(node, target) or node.kwargs:
            return None
        a, b = node.args[:2]
        ka, kb = self.constant(a), self.constant(b)
        if ka is None and kb is not None and isinstance(a, Node):
            return a, kb
        if kb is None and ka is not None and isinstance(b, Node):
            return b, ka
        return None

    # -- maps ---------------------------------------------------------------------------
    def match(self, output: Node) -> NormMap | None:
        """The map that ends at ``output``, or None."""
        nodes, shift, top = [], None, output
        added = self._split(output, aten.add.Tensor)
        if added is not None:
            top, shift = added
            if len(top.users) != 1:
                return None
            nodes.append(output)
        scaled = self._split(top, aten.mul.Tensor)
        if scaled is None:
            return None
        source, scale = scaled
        nodes.insert(0, top)
        while len(source.users) == 1 and (inner := self._split(source, aten.mul.Tensor)) is not None:
            nodes.insert(0, source)
            source, factor = inner
            scale = scale * factor
        shape = _shape(source)
        if (
            shape is None
            or not _per_feature(scale, shape)
            or (shift is not None and not _broadcasts_last(shift, shape))
        ):
            return None
        d = shape[-1]
        mean = self._centering_mean(source)
        centered = mean is not None
        if centered:
            nodes[:0] = [mean, source]
            source = source.args[0]
        elif self._normalized(source):
            return None  # the gain of a real norm: x / r(x) ⊙ γ is not a fixed map
        return NormMap(
            source=source,
            output=output,
            nodes=nodes,
            scale=scale.reshape(-1).expand(d).clone(),
            shift=None if shift is None else shift.reshape(-1).expand(d).clone(),
            centered=centered,
            name=layer_name(output),
        )

    @staticmethod
    def _centering_mean(node: Node) -> Node | None:
        """The ``mean`` node when ``node = x − mean(x, -1, keepdim=True)`` and both are used only there."""
        if not _is_call(node, aten.sub.Tensor) or len(node.users) != 1 or not _plain(node, alpha=1):
            return None
        x, mean = node.args[:2]
        if not _is_call(mean, aten.mean.dim) or mean.args[0] is not x or len(mean.users) != 1:
            return None
        if not _plain(mean, keepdim=True):
            return None
        shape = _shape(x)
        dims = list(mean.args[1]) if len(mean.args) > 1 else []
        keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
        if shape is None or not keepdim or len(dims) != 1 or dims[0] % len(shape) != len(shape) - 1:
            return None
        return mean

    @staticmethod
    def _normalized(node: Node) -> bool:
        if _is_call(node, *_NORMALIZING_OPS):
            return True
        if _is_call(node, operator.getitem):
            return _is_call(node.args[0], aten.native_layer_norm.default)
        return _is_call(node, aten.mul.Tensor, aten.div.Tensor) and any(
            _is_call(a, aten.rsqrt.default, aten.sqrt.default) for a in node.args
        )

    # -- uses ---------------------------------------------------------------------------
    def linear_uses(self, norm: NormMap) -> tuple[list[LinearUse], list[Refusal]]:
        """Every linear layer the map feeds, and why the rest of its users cannot be folded.

        The map's output may reach a linear through ops that keep every feature in
        its place (see ``_keeps_features``): the map is per feature, so it commutes
        with them, and folding only rewires the first of them to read the map's input.
        """
        uses, reasons = [], []
        y = norm.output
        if _dtype(y) != _dtype(norm.source):
            reasons.append(
                (SkipReason.MAP_CHANGES_DTYPE, f"the map changes the dtype ({_dtype(norm.source)} -> {_dtype(y)})")
            )
        for user in y.users:
            self._collect(user, (), y, norm, uses, reasons)
        return uses, reasons

    def _collect(self, node: Node, path: tuple, operand: Node, norm: NormMap, uses: list, reasons: list) -> None:
        """Classify ``node``, a user of ``operand`` (the map output, or the last of the feature-keeping ops
        of ``path`` that lead from it to ``node``)."""
        d = norm.scale.numel()
        if _is_call(node, aten.linear.default):
            self._add_linear_use(path, node, operand, d, uses, reasons)
        elif _is_call(node, aten.mm.default, aten.addmm.default, aten.matmul.default):
            self._add_mm_use(path, node, operand, d, uses, reasons)
        elif _is_call(node, ASSERT_TENSOR_METADATA):
            pass  # export's check of a cast's input: the map keeps shape and dtype, so it holds for its input too
        elif _is_call(node, *_CASTS) and not _range_covers(_dtype(node), _dtype(norm.source)):
            reasons.append(
                (
                    SkipReason.NARROWING_CAST,
                    f"{node.name} casts to {_dtype(node)}, whose range does not hold every {_dtype(norm.source)}: "
                    "the norm's input may overflow there where its output did not",
                )
            )
        elif _keeps_features(node, operand, d):
            for user in node.users:
                self._collect(user, (*path, node), node, norm, uses, reasons)
        elif _splits_other_axis(node, operand, d):
            for piece in node.users:
                if not _is_call(piece, operator.getitem):
                    reasons.append((SkipReason.NOT_A_LINEAR_CONSUMER, f"{piece.name} reads a split as a whole"))
                    continue
                for user in piece.users:
                    self._collect(user, (*path, node, piece), piece, norm, uses, reasons)
        else:
            reasons.append(_why_not(node, operand))

    def _add_linear_use(self, path: tuple, node: Node, operand: Node, d: int, uses: list, reasons: list) -> None:
        """``aten.linear(x, W[, b])``: W read as (out, in) through its transposes."""
        if node.args[0] is not operand or operand in node.args[1:] or node.kwargs.get("bias") is operand:
            reasons.append((SkipReason.NORM_OUTPUT_AS_WEIGHT, f"{node.name} reads the norm output as weight or bias"))
            return
        if node.kwargs.keys() - {"bias"}:
            reasons.append((SkipReason.KEYWORD_CHANGES_MEANING, f"{node.name} has keyword arguments"))
            return
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        self._add_use(path, node, node.args[1], bias, False, d, uses, reasons)

    def _add_mm_use(self, path: tuple, mm: Node, operand: Node, d: int, uses: list, reasons: list) -> None:
        """``mm``/``addmm``/``matmul`` whose input is ``operand`` and whose weight is read as (in, out)."""
        if _is_call(mm, aten.addmm.default):
            if not _plain(mm, beta=1, alpha=1):
                reasons.append((SkipReason.KEYWORD_CHANGES_MEANING, f"{mm.name} scales its terms (beta/alpha)"))
                return
            bias, x, w = mm.args[:3]
        else:
            bias, (x, w) = None, mm.args[:2]
        if x is not operand or w is operand or bias is operand:
            reasons.append((SkipReason.NORM_OUTPUT_AS_WEIGHT, f"{mm.name} uses the norm output as its weight operand"))
            return
        if mm.target is aten.mm.default or mm.target is aten.matmul.default:
            if mm.kwargs:
                reasons.append((SkipReason.KEYWORD_CHANGES_MEANING, f"{mm.name} has keyword arguments"))
                return
        self._add_use(path, mm, w, bias, True, d, uses, reasons)

    def _weight_source(self, weight: Node) -> tuple[Node, tuple[Node, ...], bool] | None:
        """``(stored node, transposes, swapped)`` behind a weight operand, or None when it is not stored."""
        chain, swapped = [], False
        while self.stored(weight) is None:
            swaps = _swaps_last_two(weight) if isinstance(weight, Node) else None
            if swaps is None:
                return None
            chain.insert(0, weight)
            swapped ^= swaps
            weight = weight.args[0]
        return weight, tuple(chain), swapped

    def _add_use(self, path, matmul, weight_arg, bias_node, reads_in_out, d, uses, reasons) -> None:
        source = self._weight_source(weight_arg) if isinstance(weight_arg, Node) else None
        weight = None if source is None else self.stored(source[0])
        if weight is None or weight.dim() != 2:
            reasons.append((SkipReason.WEIGHT_NOT_STORED, f"the weight of {matmul.name} is not a stored 2-D tensor"))
            return
        stored, chain, swapped = source
        in_out = reads_in_out != swapped
        out_features, in_features = weight.shape[::-1] if in_out else weight.shape
        bias = None if bias_node is None else self.stored(bias_node)
        if in_features != d:
            reasons.append(
                (
                    SkipReason.FEATURE_SIZE_MISMATCH,
                    f"the weight of {matmul.name} takes {in_features} features, the norm gives {d}",
                )
            )
        elif bias_node is not None and (bias is None or tuple(bias.shape) != (out_features,)):
            reasons.append(
                (SkipReason.BIAS_NOT_STORED, f"the bias of {matmul.name} is not a stored ({out_features},) tensor")
            )
        else:
            views = tuple(n for n in path if n.target in STRIDE_BOUND_VIEWS)
            uses.append(LinearUse(path, matmul, stored, chain, bias_node, in_out, views))


def _why_not(node: Node, operand: Node) -> Refusal:
    """The refusal for a user of the norm output that neither is a linear nor keeps features."""
    if node.op == "output":
        return SkipReason.NOT_A_LINEAR_CONSUMER, "the norm output is returned by the program"
    feature_dim = len(_shape(operand) or ()) - 1
    if _is_call(node, *_VIEW_OPS):
        return SkipReason.RESHAPES_FEATURE_AXIS, f"{node.name} reshapes the feature axis"
    if _is_call(node, *_SLICE_OPS) and _names_axis(node, feature_dim):
        return SkipReason.SLICES_FEATURE_AXIS, f"{node.name} slices the feature axis before any linear layer"
    if _is_call(node, aten.transpose.int, aten.permute.default):
        return SkipReason.MOVES_FEATURE_AXIS, f"{node.name} moves the feature axis before any linear layer"
    if _is_call(node, aten.bmm.default):
        return (
            SkipReason.DECOMPOSED_BMM,
            f"feeds {node.name}: a linear decomposed to expand + bmm (as for a non-contiguous input) is not matched",
        )
    if _is_call(node, *_PASS_THROUGH_OPS, *_SPLIT_OPS) and any(a is operand for a in node.args[1:]):
        return SkipReason.NOT_A_LINEAR_CONSUMER, f"{node.name} reads the norm output twice"
    if _is_call(node, aten._to_copy.default):
        return SkipReason.KEYWORD_CHANGES_MEANING, f"{node.name} casts with layout, device or format options"
    return SkipReason.NOT_A_LINEAR_CONSUMER, f"feeds {node.name} ({node.target}), which is not a linear layer"


def _names_axis(node: Node, feature_dim: int) -> bool:
    """Whether a slicing op works on ``feature_dim`` (its ``dim`` argument, positional or keyword)."""
    position = 2 if node.target in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default) else 1
    dim = node.args[position] if len(node.args) > position else node.kwargs.get("dim", 0)
    return feature_dim >= 0 and dim % (feature_dim + 1) == feature_dim


def _splits_other_axis(node: Node, operand: Node, d: int) -> bool:
    """True for split/chunk/unbind of ``operand`` along an axis other than the feature axis."""
    if not _is_call(node, *_SPLIT_OPS) or not node.args or node.args[0] is not operand:
        return False
    shape = _shape(operand)
    return bool(shape) and shape[-1] == d and not _names_axis(node, len(shape) - 1) and not node.kwargs.keys() - {"dim"}


def _keeps_features(node: Node, operand: Node, d: int) -> bool:
    """True when ``node`` moves whole feature vectors of ``operand`` (size ``d`` on the last axis) intact.

    Reshapes that keep the last axis at ``d`` (row-major order keeps every run of
    ``d`` features together), aliases and copies, slices, selects, transposes and
    broadcasts of the other axes. A slice of the last axis that still yields ``d``
    features is its full range; ops that name axes must not name the last one.
    """
    if not _is_call(node, *_PASS_THROUGH_OPS) or not node.args or node.args[0] is not operand:
        return False
    if node.target is aten.dropout.default and not (len(node.args) > 2 and node.args[2] is False):
        return False  # training-mode dropout draws a random mask: not a fixed per-feature map
    if node.kwargs.keys() - _VALUE_KEEPING_KWARGS.get(node.target, set()):
        return False  # e.g. a cast to another device or layout: not modelled
    if any(a is operand for a in node.args[1:]):
        return False
    before, after = _shape(operand), _shape(node)
    if not before or not after or before[-1] != d or after[-1] != d:
        return False

    def last(dim: int) -> bool:
        return dim % len(before) == len(before) - 1

    if node.target is aten.select.int:
        return not last(node.args[1])
    if node.target is aten.transpose.int:
        return not (last(node.args[1]) or last(node.args[2]))
    if node.target is aten.permute.default:
        return last(node.args[1][-1])
    return True


def _range_covers(to: torch.dtype | None, dtype: torch.dtype | None) -> bool:
    """Whether the floating dtype ``to`` holds every finite value of ``dtype`` up to rounding (bf16 holds
    float32's exponents, float16 does not).

    A fold casts the map's input ``x`` where the original cast ``x ⊙ s``: through a narrower range, ``x``
    overflows to inf (or flushes to 0) where ``x ⊙ s`` did not, an error no rounding bound covers.
    """
    if to is None or dtype is None or not (to.is_floating_point and dtype.is_floating_point):
        return to == dtype
    wide, narrow = torch.finfo(to), torch.finfo(dtype)
    return (
        math.frexp(wide.max)[1] >= math.frexp(narrow.max)[1] and math.frexp(wide.tiny)[1] <= math.frexp(narrow.tiny)[1]
    )


def _per_feature(scale: torch.Tensor, shape) -> bool:
    """A scale that varies along the feature axis only (a bare scalar multiply is no norm)."""
    return _broadcasts_last(scale, shape) and scale.dim() > 0 and scale.shape[-1] == shape[-1] and shape[-1] > 1


def _broadcasts_last(value: torch.Tensor, shape) -> bool:
    return (
        value.dim() <= len(shape)
        and all(n == 1 for n in value.shape[:-1])
        and (value.dim() == 0 or value.shape[-1] in (1, shape[-1]))
    )
