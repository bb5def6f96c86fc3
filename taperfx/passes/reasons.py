"""Why a norm stays in the graph: one machine-readable code per refusal.

Every "may this norm fold?" answer that is no carries one of these codes (the
report's ``SkippedNorm.code``, ``FoldError.code``); the English detail next to it
is for people and may change, the code may not.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["SkipReason"]


class SkipReason(str, Enum):
    # the norm itself
    REAL_NORM = "real_norm"  # a normalization that computes per-token statistics
    GATE_ABOVE_ZERO = "gate_above_zero"  # a TaperNorm whose gate is not 0 still normalizes
    MAP_CHANGES_DTYPE = "map_changes_dtype"  # the scale promotes the activation to another dtype
    OUTPUT_UNUSED = "output_unused"
    # what reads its output
    NOT_A_LINEAR_CONSUMER = "not_a_linear_consumer"  # some user of the output is not a linear layer
    NORM_OUTPUT_AS_WEIGHT = "norm_output_as_weight"  # a linear takes the output as its weight operand
    KEYWORD_CHANGES_MEANING = "keyword_changes_meaning"  # e.g. addmm beta/alpha, a dtype= on mean
    RESHAPES_FEATURE_AXIS = "reshapes_feature_axis"
    SLICES_FEATURE_AXIS = "slices_feature_axis"
    MOVES_FEATURE_AXIS = "moves_feature_axis"
    DECOMPOSED_BMM = "decomposed_bmm"  # a linear decomposed to expand + bmm
    NARROWING_CAST = "narrowing_cast"  # a cast to a narrower range (float16) before a linear: x may overflow
    WEIGHT_NOT_STORED = "weight_not_stored"  # the weight is computed, not a stored 2-D tensor
    BIAS_NOT_STORED = "bias_not_stored"
    FEATURE_SIZE_MISMATCH = "feature_size_mismatch"
    # the weights it would fold into
    SHARED_WEIGHT = "shared_weight"  # read by something else too (tied embeddings); untie_shared=True copies
    LAYOUT_CONFLICT = "layout_conflict"  # one weight read in two orientations needs two folded values
    SHARED_BIAS_CONFLICT = "shared_bias_conflict"  # one bias read by linears that need different corrections
    # the check of every rewrite
    CHECK_FAILED = "check_failed"  # the rewritten nodes do not compute what the original nodes did
    # fold_module only
    NOT_A_MODULE_NORM = "not_a_module_norm"  # no TaperNorm module owns the map
    CALLED_MORE_THAN_ONCE = "called_more_than_once"
    NOT_A_LINEAR_MODULE = "not_a_linear_module"  # a consumer is not an nn.Linear/Conv1D called once as itself
    READ_OUTSIDE_FORWARD = "read_outside_forward"  # the parent reads the norm's parameters itself (fast paths)
    UNTRACED_CALL_PATH = "untraced_call_path"  # a folded model ran a path its trace did not see
    # whole-program checks
    VERIFY_FAILED = "verify_failed"  # the folded program's outputs drift beyond the reference's own error
    STRICT = "strict"  # strict=True and some norm stays

    def __str__(self) -> str:
        return self.value
