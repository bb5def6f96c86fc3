"""``torch.compile(backend="taperfx")``: folds gate-zero norms, matches eager, falls back to plain Inductor.

Inductor compiles take seconds on CPU, so each model is compiled once per test
and graph-shape checks ride along with the numeric ones through
``post_grad_custom_post_pass``, which sees the graph after the fold.
"""

from __future__ import annotations

import collections
import subprocess
import sys

import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from taperfx.export import compile_backend

pytestmark = pytest.mark.slow  # every test runs Inductor (3-20 s each, more on a worker's first compile)

# After decomposition every RMSNorm and LayerNorm computes exactly one reciprocal square root.
NORMALIZATION_MARKER = "aten.rsqrt.default"


class GraphSpy(CustomGraphPass):
    """Records the call_function targets of the graph Inductor lowers (after the taperfx fold)."""

    def __init__(self):
        self.graphs: list[collections.Counter] = []

    def __call__(self, graph):
        self.graphs.append(collections.Counter(str(n.target) for n in graph.nodes if n.op == "call_function"))

    def uuid(self):
        return None  # never served from the FX graph cache: the spy must run

    def norms(self) -> int:
        (graph,) = self.graphs
        return graph[NORMALIZATION_MARKER]


def compile_and_compare(model) -> GraphSpy:
    """Compile one prefill with the taperfx backend, check it against eager, return what Inductor lowered."""
    torch._dynamo.reset()
    spy = GraphSpy()
    compiled = torch.compile(model, backend="taperfx", dynamic=False, options={"post_grad_custom_post_pass": spy})
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, want_cache = model(ids)
        got, got_cache = compiled(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_cache, want_cache, atol=1e-5, rtol=1e-5)
    return spy


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gate_zero_model_matches_eager_and_loses_its_tapered_norms(make_decoder, arch):
    model = make_decoder(arch, "internal", gate=0.0)
    spy = compile_and_compare(model)
    assert spy.norms() == 1  # the final norm (the scale anchor) is a real norm and stays


def test_gate_between_zero_and_one_compiles_unfolded(make_decoder):
    model = make_decoder("llama", "internal", gate=0.5)
    spy = compile_and_compare(model)
    assert spy.norms() == 2 * model.config.n_layers + 1


def dynamo_graph(model, *, grad: bool):
    """The (graph, example inputs) Dynamo hands a backend for one forward of ``model``."""
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        torch.compile(model, backend=capture, dynamic=False)(torch.zeros(1, 5, dtype=torch.long))
    (graph,) = captured
    return graph


@pytest.fixture
def inductor_calls(monkeypatch):
    """Replace Inductor by a recorder of what the backend hands it."""
    calls = []
    monkeypatch.setattr(
        torch._inductor, "compile", lambda gm, inputs, options=None: calls.append((gm, inputs, options)) or gm
    )
    return calls


def test_model_without_tapernorm_goes_to_inductor_untouched(make_decoder, inductor_calls):
    gm, inputs = dynamo_graph(make_decoder("llama"), grad=False)
    with torch.no_grad():
        compile_backend.taperfx_backend(
            gm, inputs, mode="max-autotune-no-cudagraphs", options={"epilogue_fusion": False}
        )
    ((handed, handed_inputs, options),) = inductor_calls
    assert handed is gm and handed_inputs == list(inputs)
    assert options == {"max_autotune": True, "coordinate_descent_tuning": True, "epilogue_fusion": False}


def test_training_graph_is_not_frozen(make_decoder, inductor_calls):
    gm, inputs = dynamo_graph(make_decoder("gpt2", "internal", gate=0.0), grad=True)
    compile_backend.taperfx_backend(gm, inputs)
    ((handed, _, options),) = inductor_calls
    assert handed is gm and "freezing" not in options  # the weights must stay live inputs for their gradients


def test_inference_graph_freezes_module_state_only(make_decoder, inductor_calls):
    model = make_decoder("gpt2", "internal", gate=0.0)
    gm, inputs = dynamo_graph(model, grad=False)
    with torch.no_grad():  # Dynamo calls the backend under the caller's grad mode
        compile_backend.taperfx_backend(gm, inputs)
    ((frozen, runtime_inputs, options),) = inductor_calls
    assert options["freezing"] and isinstance(options["post_grad_custom_pre_pass"], compile_backend.FoldNormsPass)
    assert len(runtime_inputs) == 1 and runtime_inputs[0].dtype == torch.long  # only input_ids is left
    assert sum(n.op == "get_attr" for n in frozen.graph.nodes) == len(inputs) - 1


def test_options_are_checked_like_inductors():
    with pytest.raises(ValueError, match="unknown Inductor option"):
        compile_backend.inductor_config(None, {"no_such_option": True})
    with pytest.raises(ValueError, match="post_grad_custom_pre_pass"):
        compile_backend.inductor_config(None, {"post_grad_custom_pre_pass": None})
    assert compile_backend.inductor_config("reduce-overhead", None) == {"triton.cudagraphs": True}


def test_backend_is_found_by_name_without_importing_taperfx():
    probe = (
        "import sys, torch\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "assert 'taperfx' in torch._dynamo.list_backends()\n"
        "assert not any(m.startswith('taperfx') for m in sys.modules)\n"
        "fn = lookup_backend('taperfx')\n"
        "print(fn.__module__, fn.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["taperfx.export.compile_backend", "taperfx_backend"]


@pytest.mark.cuda
def test_reduce_overhead_on_cuda(make_decoder):
    model = make_decoder("llama", "internal", gate=0.0).cuda()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="taperfx", mode="reduce-overhead", dynamic=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), device="cuda")
    with torch.no_grad():
        want, _ = model(ids)
        for _ in range(3):  # cudagraphs records on a later call; check the replayed result
            got, _ = compiled(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
