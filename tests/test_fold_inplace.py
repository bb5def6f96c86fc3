"""``fold(program, inplace=True)``: the same fold as the default, written into the program's own weights."""

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import taperfx
from taperfx.models import ModelConfig, build_model
from taperfx.passes.decide import plan_folds
from taperfx.passes.inplace import folded_values_in_place
from taperfx.passes.report import FoldReport
from taperfx.passes.stores import ProgramStore
from taperfx.passes.values import folded_values

from helpers.fold_grammar import build, cases
from helpers.tapering import taper_to


def _program(arch: str, protocol: str, dim: int = 64, layers: int = 2):
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, vocab_size=50, dim=dim, n_layers=layers, n_heads=4, max_seq_len=16)
    model = taperfx.convert(build_model(config), protocol)
    ids = torch.randint(0, 50, (2, 6))
    taper_to(model, ids)
    with torch.no_grad():
        return model, ids, torch.export.export(model, (ids,), strict=False)


def _run(program, ids):
    with torch.no_grad():
        return program.module()(ids)[0]


@pytest.mark.parametrize("arch, protocol", [("gpt2", "internal"), ("llama", "all")])
def test_in_place_fold_rewrites_the_weights_where_they_lie_and_equals_the_default(arch, protocol):
    model, ids, program = _program(arch, protocol)
    default, report = taperfx.fold_program(program)
    want = _run(default, ids)
    rewritten = [w for f in report.folded for w in f.weights]
    storage = {name: program.state_dict[name].data_ptr() for name in rewritten}
    params = dict(model.named_parameters())

    folded, in_place = taperfx.fold_program(program, inplace=True)

    assert [f.name for f in in_place.folded] == [f.name for f in report.folded] and in_place.verified
    assert in_place.codes == report.codes
    for name in rewritten:  # the result holds the very same storage, now folded; so does the model
        assert folded.state_dict[name].data_ptr() == storage[name] == params[name].data_ptr()
        assert torch.equal(folded.state_dict[name], default.state_dict[name]), name
    torch.testing.assert_close(_run(folded, ids), want, rtol=0, atol=0)


def _peak_rss_growth(fn) -> int:
    """How far the process's resident memory peaked above where it stood, while ``fn`` ran (Linux:
    ``clear_refs`` resets the peak). The fold runs on a thread pool, which torch.profiler does not see."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def _status(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read peak memory")
def test_in_place_values_allocate_nothing_of_the_weights_size():
    model, ids, program = _program("gpt2", "internal", dim=1024, layers=4)
    store = ProgramStore(program)
    plans = plan_folds(store, FoldReport(), untie_shared=False, excluded={})
    weights = {id(store.tensor(u.weight)): store.tensor(u.weight) for _, uses in plans for u in uses}
    rewritten = sum(w.nbytes for w in weights.values())
    largest = max(w.nbytes for w in weights.values())

    fresh = _peak_rss_growth(lambda: folded_values(store, plans))
    values = {}
    in_place = _peak_rss_growth(lambda: values.update(folded_values_in_place(store, plans)))

    assert fresh >= rewritten * 0.9, (fresh, rewritten)  # the default holds every rewritten weight anew
    assert in_place < largest, (in_place, largest)  # in place: float64 blocks and the new biases
    assert all(any(value[0] is w for w in weights.values()) for value in values.values())


def test_in_place_fold_leaves_a_shared_weight_alone_and_folds_a_copy():
    model, ids, program = _program("gpt2", "all")
    embedding = program.state_dict["wte.weight"].clone()
    want = _run(taperfx.fold(program, untie_shared=True), ids)

    folded, report = taperfx.fold_program(program, untie_shared=True, inplace=True)

    assert "norm" in {f.name for f in report.folded} and report.params_added
    assert torch.equal(program.state_dict["wte.weight"], embedding)  # read by the embedding: never rewritten
    torch.testing.assert_close(_run(folded, ids), want, rtol=0, atol=0)


class _AliasedWeight(torch.nn.Module):
    """A linear after a gate-zero norm, whose weight's storage a buffer shares (``register_buffer`` of
    ``weight.detach()``) and a second layer reads on the raw input."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm = taperfx.TaperLayerNorm(dim)
        self.linear = torch.nn.Linear(dim, 8)
        self.register_buffer("same_storage", self.linear.weight.detach())

    def forward(self, x):
        return self.linear(self.norm(x)) + torch.nn.functional.linear(x, self.same_storage)


@pytest.mark.parametrize("verify", [True, False])
def test_in_place_fold_leaves_a_weight_whose_storage_another_tensor_shares(verify):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    model = taper_to(_AliasedWeight(), x)
    with torch.no_grad():
        want = model(x)
        program = torch.export.export(model, (x,))
    stored = program.state_dict["same_storage"].clone()

    folded, report = taperfx.fold_program(program, inplace=True, verify=verify)

    assert [f.name for f in report.folded] == ["norm"]
    assert torch.equal(program.state_dict["same_storage"], stored)  # the write went to a copy
    with torch.no_grad():
        torch.testing.assert_close(folded.module()(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_generated_programs_fold_in_place_as_they_fold_by_default(case):
    if case.entry != "program":
        return
    model, x = build(case)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
    if case.decompose:
        program = program.run_decompositions()
    default, report = taperfx.fold_program(program, verify=False)
    want = default.module()(x)

    folded, in_place = taperfx.fold_program(program, inplace=True, verify=False)

    assert in_place.codes == report.codes and [f.name for f in in_place.folded] == [f.name for f in report.folded]
    got = folded.module()(x)
    for w, g in zip(*(o if isinstance(o, tuple) else (o,) for o in (want, got))):
        eps = torch.finfo(w.dtype).eps
        torch.testing.assert_close(g, w, rtol=0, atol=4 * eps * (w.abs().max().item() + 1e-30))


@pytest.mark.cuda
@pytest.mark.parametrize("inplace", [False, True])
def test_a_program_on_cuda_folds_every_norm_and_keeps_its_outputs(inplace):
    """The block arithmetic runs on the weights' device and the local checks on the host: nothing is refused
    for living on an accelerator."""
    model, ids, _ = _program("gpt2", "internal")
    model, ids = model.cuda(), ids.cuda()
    want = model(ids)[0]
    with torch.no_grad():
        program = torch.export.export(model, (ids,), strict=False)

    folded, report = taperfx.fold_program(program, inplace=inplace)

    assert report.verified and report.codes == {"norm": "real_norm"} and len(report.folded) == 4
    assert all(t.device.type == "cuda" for t in folded.state_dict.values())
    torch.testing.assert_close(_run(folded, ids), want, rtol=1e-5, atol=1e-5)
