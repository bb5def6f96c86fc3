"""Direct unit tests of the matcher, the weight stores and the in-place compile pass, on hand-built graphs."""

import pytest
import torch
from torch.fx import Graph

import taperfx
from taperfx.export.compile_backend import FoldNormsPass
from taperfx.passes import check, pipeline
from taperfx.passes.match import Matcher
from taperfx.passes.reasons import SkipReason
from taperfx.passes.stores import AttributeStore, GraphStore, ProgramStore

aten = torch.ops.aten
D, OUT = 4, 3


class Built:
    """A graph built node by node, with ``meta["val"]`` on every tensor node and a table of stored tensors."""

    def __init__(self) -> None:
        self.graph = Graph()
        self.stored: dict = {}

    def input(self, name: str, *shape: int):
        node = self.graph.placeholder(name)
        node.meta["val"] = torch.randn(shape)
        return node

    def state(self, name: str, value: torch.Tensor):
        node = self.input(name, *value.shape)
        self.stored[node] = value
        return node

    def call(self, target, *args, **kwargs):
        node = self.graph.call_function(target, args, kwargs)
        values = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
        node.meta["val"] = target(*values[0], **values[1])
        return node

    def matcher(self) -> Matcher:
        return Matcher(self.stored.get)


def _ln_map(b: Built, x, *, alpha=None, mean_kwargs=None):
    mean = b.call(aten.mean.dim, x, [-1], True, **(mean_kwargs or {}))
    centered = b.call(aten.sub.Tensor, x, mean, **({} if alpha is None else {"alpha": alpha}))
    scaled = b.call(aten.mul.Tensor, centered, b.state("s", torch.rand(D) + 0.5))
    return b.call(aten.add.Tensor, scaled, b.state("beta", torch.randn(D)))


def test_the_matcher_reads_an_ln_map_and_an_rms_map():
    b = Built()
    x = b.input("x", 2, 5, D)
    y = _ln_map(b, x)
    norm = b.matcher().match(y)
    assert norm.source is x and norm.centered and norm.kind == "ln" and norm.shift is not None
    torch.testing.assert_close(norm.scale, b.stored[next(n for n in b.stored if n.name == "s")].double())
    r = Built()
    x = r.input("x", 2, D)
    c = r.state("c", torch.tensor(0.7))
    w = r.state("w", torch.rand(D))
    y = r.call(aten.mul.Tensor, x, r.call(aten.mul.Tensor, c, w))
    norm = r.matcher().match(y)
    assert norm.source is x and not norm.centered and norm.shift is None
    torch.testing.assert_close(norm.scale, 0.7 * r.stored[w].double())


@pytest.mark.parametrize("keywords", [{"alpha": 0.5}, {"mean_kwargs": {"dtype": torch.float64}}])
def test_a_keyword_that_changes_the_centering_leaves_only_the_scale(keywords):
    b = Built()
    x = b.input("x", 2, D)
    norm = b.matcher().match(_ln_map(b, x, **keywords))
    assert not norm.centered and norm.source.target is aten.sub.Tensor


def _uses(build_consumer):
    b = Built()
    x = b.input("x", 6, D)
    y = _ln_map(b, x)
    consumer = build_consumer(b, y)
    b.graph.output(consumer)
    matcher = b.matcher()
    norm = matcher.match(y)
    return b, matcher.linear_uses(norm)


def test_linear_uses_record_the_layout_and_the_transposes():
    b, (uses, reasons) = _uses(lambda b, y: b.call(aten.linear.default, y, b.state("W", torch.randn(OUT, D))))
    assert reasons == [] and [(u.in_out, u.chain) for u in uses] == [(False, ())]

    def mm_of_t(b, y):
        w = b.state("W", torch.randn(OUT, D))
        return b.call(aten.mm.default, y, b.call(aten.t.default, w))

    b, (uses, reasons) = _uses(mm_of_t)
    assert reasons == [] and uses[0].in_out is False and [n.target for n in uses[0].chain] == [aten.t.default]

    def double_permute(b, y):
        w = b.state("W", torch.randn(D, OUT))
        inner = b.call(aten.permute.default, w, [1, 0])
        return b.call(aten.mm.default, y, b.call(aten.permute.default, inner, [1, 0]))

    b, (uses, reasons) = _uses(double_permute)
    assert reasons == [] and uses[0].in_out is True and len(uses[0].chain) == 2

    def linear_of_t(b, y):
        return b.call(aten.linear.default, y, b.call(aten.t.default, b.state("W", torch.randn(D, OUT))))

    b, (uses, reasons) = _uses(linear_of_t)
    assert reasons == [] and uses[0].in_out is True

    b, (uses, reasons) = _uses(lambda b, y: b.call(aten.matmul.default, y, b.state("W", torch.randn(D, OUT))))
    assert reasons == [] and uses[0].in_out is True and uses[0].matmul.target is aten.matmul.default


@pytest.mark.parametrize(
    "build, code",
    [
        (
            lambda b, y: b.call(
                aten.addmm.default, b.state("b", torch.randn(OUT)), y, b.state("W", torch.randn(D, OUT)), beta=2
            ),
            SkipReason.KEYWORD_CHANGES_MEANING,
        ),
        (
            lambda b, y: b.call(aten.linear.default, b.state("W", torch.randn(OUT, D)), y),
            SkipReason.NORM_OUTPUT_AS_WEIGHT,
        ),
        (lambda b, y: b.call(aten.linear.default, y, b.input("W", OUT, D)), SkipReason.WEIGHT_NOT_STORED),
        (
            lambda b, y: b.call(aten.linear.default, y, b.state("W", torch.randn(OUT, D)), b.input("bias", OUT)),
            SkipReason.BIAS_NOT_STORED,
        ),
        (lambda b, y: b.call(aten.relu.default, y), SkipReason.NOT_A_LINEAR_CONSUMER),
        (lambda b, y: b.call(aten.slice.Tensor, y, 1, 0, 2), SkipReason.SLICES_FEATURE_AXIS),
        (lambda b, y: b.call(aten.split.Tensor, y, 2, 0), SkipReason.NOT_A_LINEAR_CONSUMER),
    ],
    ids=["addmm-beta", "as-weight", "computed-weight", "computed-bias", "relu", "feature-slice", "token-split-unread"],
)
def test_each_refusal_has_its_code(build, code):
    b, (uses, reasons) = _uses(build)
    assert uses == [] and [c for c, _ in reasons] == [code]


def _program_with_input_named_input():
    model = torch.nn.Sequential(torch.nn.Linear(D, OUT), torch.nn.ReLU())
    with torch.no_grad():
        return torch.export.export(model, (torch.randn(2, D),))


def test_program_store_maps_placeholders_by_position_and_never_touches_the_input():
    program = _program_with_input_named_input()
    before = {k: v.clone() for k, v in program.state_dict.items()}
    store = ProgramStore(program)
    weight = next(n for n in store.graph.nodes if n.op == "placeholder" and store.tensor(n) is not None)
    assert store.target(weight) == "0.weight"
    assert [n.name for n in store.graph.nodes if n.op == "placeholder"][-1] != "input"  # the copy renamed it
    store.replace(weight, torch.zeros(OUT, D))
    added = store.add("0.extra", torch.ones(OUT), weight)
    assert store.target(added) == "0.extra" and added.meta["val"].shape == (OUT,)
    assert store.prune() == ["0.extra"]
    result = store.result()
    assert torch.equal(result.state_dict["0.weight"], torch.zeros(OUT, D))
    assert all(torch.equal(program.state_dict[k], v) for k, v in before.items())
    x = torch.randn(2, D)
    torch.testing.assert_close(result.module()(x), torch.relu(program.state_dict["0.bias"]).expand(2, OUT))


class _RmsLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = torch.nn.Parameter(torch.rand(D) + 0.5)
        self.linear = torch.nn.Linear(D, OUT)

    def forward(self, x):
        return self.linear(x * self.s)


def _frozen_graph_module():
    """An aten-level GraphModule with ``get_attr`` weights: an RMS map at g = 0 feeding a linear."""
    model = _RmsLinear().eval()
    with torch.no_grad():
        gm = torch.export.export(model, (torch.randn(2, D),)).module()
    return gm, (model.s, model.linear.weight, model.linear.bias)


def test_attribute_store_writes_new_attributes_and_leaves_the_module():
    gm, (_, w, _) = _frozen_graph_module()
    store = AttributeStore(gm)
    weight = next(n for n in store.graph.nodes if store.tensor(n) is not None and store.tensor(n).shape == (OUT, D))
    original_target = weight.target
    store.replace(weight, torch.zeros(OUT, D))
    assert weight.target != original_target and torch.equal(gm.get_parameter(original_target), w)
    assert store.module is not gm and store.graph is not gm.graph


def test_graph_store_edits_in_place_and_restores():
    gm, _ = _frozen_graph_module()
    store = GraphStore(gm)
    assert store.graph is gm.graph
    saved = store.restore_point()
    nodes = [(n.op, str(n.target)) for n in gm.graph.nodes]
    linear = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    with gm.graph.inserting_after(linear):
        extra = gm.graph.call_function(aten.neg.default, (linear,))
    linear.replace_all_uses_with(extra, delete_user_cb=lambda user: user is not extra)
    store.restore(saved)
    assert [(n.op, str(n.target)) for n in gm.graph.nodes] == nodes


def test_the_compile_pass_folds_inductors_graph_in_place():
    gm, _ = _frozen_graph_module()
    graph, output = gm.graph, gm.graph.output_node()
    x = torch.randn(2, D)
    want = gm(x)
    FoldNormsPass()(gm.graph)
    gm.recompile()
    assert gm.graph is graph and gm.graph.output_node() is output  # edited where it is, not re-spliced
    assert not any(n.target is aten.mul.Tensor for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), want, rtol=1e-6, atol=1e-6)


def test_the_compile_pass_leaves_a_norm_whose_check_fails(monkeypatch):
    gm, _ = _frozen_graph_module()
    targets = [str(n.target) for n in gm.graph.nodes]
    monkeypatch.setattr(check, "confirm", lambda store, probe, edited: "forced mismatch")
    FoldNormsPass()(gm.graph)
    gm.recompile()
    assert [str(n.target) for n in gm.graph.nodes] == targets


@pytest.mark.parametrize("out", [OUT, 200])  # 200 outputs: the check samples 64 of them
def test_the_local_check_refuses_a_wrong_folded_value(monkeypatch, out):
    real = pipeline.folded_values

    def corrupted(store, plans):
        values = real(store, plans)
        return {key: (weight * 1.01, bias, old) for key, (weight, bias, old) in values.items()}

    model = torch.nn.Sequential(torch.nn.LayerNorm(D), torch.nn.Linear(D, out)).eval()
    with torch.no_grad():
        model[0].weight.normal_(1.0, 0.3)
    x = torch.randn(2, 3, D)
    taperfx.convert(model, "all")
    taperfx.calibrate(model, [x])
    taperfx.set_gate(model, 0.0)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
    monkeypatch.setattr(pipeline, "folded_values", corrupted)
    folded, report = taperfx.fold_program(program)
    assert report.codes == {"0": "check_failed"} and report.folded == []
    torch.testing.assert_close(folded.module()(x), program.module()(x), rtol=0, atol=0)
    with pytest.raises(taperfx.FoldError) as refused:
        taperfx.fold_program(program, strict=True)
    assert refused.value.code == "check_failed"
