"""One linear layer read by two norms (``lin(n1(x)) + lin(n2(y))``), untied by copy: each norm folds into its
own copy of the weight and bias.

Before, the folded values were keyed by (weight, layout, bias) alone, so the second norm was handed the
first one's copy: its check failed (``check_failed``), and an in-place fold raised with its originals gone.
"""

import copy

import pytest
import torch
from torch import nn

import taperfx
from taperfx.passes.meta_plan import plan_from_program

from helpers.tapering import taper_to

D = 16


class OneLinearTwoNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.n1 = taperfx.TaperLayerNorm(D)
        self.n2 = taperfx.TaperLayerNorm(D)
        self.linear = nn.Linear(D, 8)

    def forward(self, x):
        return self.linear(self.n1(x)) + self.linear(self.n2(2 * x + 1))


@pytest.mark.parametrize("decompose", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_two_norms_reading_one_linear_fold_into_two_copies(decompose, inplace):
    torch.manual_seed(0)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    model = taper_to(OneLinearTwoNorms().double(), x)
    with torch.no_grad():
        for norm in (model.n1, model.n2):
            norm.weight_tilde.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
        program = torch.export.export(model, (x,))
        program = copy.deepcopy(program.run_decompositions() if decompose else program)
        folded, report = taperfx.fold_program(program, strict=True, untie_shared=True, inplace=inplace)
        other = torch.randn(2, 5, D, dtype=torch.float64)
        torch.testing.assert_close(folded.module()(other), model(other), rtol=1e-12, atol=1e-12)
    assert sorted(f.name for f in report.folded) == ["n1", "n2"] and report.verified


def test_a_checkpoint_plan_refuses_two_norms_folding_into_one_layer():
    """On disk a layer has one weight key: each norm's folded copy would be stored as ``linear.weight``, which the
    other norm's path still reads. Both norms stay (``called_more_than_once``), nothing of them is written."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, D)
    model = taper_to(OneLinearTwoNorms(), x)
    with torch.no_grad():
        program = torch.export.export(model, (x,))

    plan, report = plan_from_program(
        program, lambda name: program.state_dict[name], source=str, target=str, untie_shared=True
    )

    assert report.codes == {"n1": "called_more_than_once", "n2": "called_more_than_once"}
    assert plan.maps == [] and plan.weights == [] and plan.biases == []
    assert set(plan.keys) == set(program.state_dict)  # everything kept as it is
