"""The streamed fold against the in-memory one, on generated checkpoints and plans."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taperfx.errors import DataError, InputNotFound
from taperfx.passes.blockfold import fold_in_place
from taperfx.passes.fold_plan import FoldPlan
from taperfx.passes.shards import INDEX_FILE, ShardReader, ShardWriter, checkpoint_files
from taperfx.passes.stream import spot_check, stream_fold
from taperfx.passes.weights import fold_linear

from helpers.stream_plans import folded_in_memory, layer_plan, write_shards

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ulp_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to one rounding of the stored dtype (float64 sums may differ in order)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    eps = torch.finfo(want.dtype).eps
    scale = want.double().abs().max().item() or 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=eps * scale)


layers_strategy = st.lists(
    st.fixed_dictionaries({"in_out": st.booleans(), "centered": st.booleans(), "bias": st.booleans()}),
    min_size=1,
    max_size=4,
)


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 33),
    outs=st.lists(st.integers(1, 29), min_size=4, max_size=4),
    layers=layers_strategy,
    dtype=st.sampled_from(DTYPES),
    block=st.integers(1, 200),
    seed=st.integers(0, 2**16),
)
def test_streamed_fold_equals_the_in_memory_fold(tmp_path_factory, d, outs, layers, dtype, block, seed):
    g = torch.Generator().manual_seed(seed)
    tensors, specs = {}, []
    for i, layer in enumerate(layers):
        shape = (d, outs[i]) if layer["in_out"] else (outs[i], d)
        tensors[f"l{i}.weight"] = torch.randn(shape, generator=g).to(dtype)
        if layer["bias"]:
            tensors[f"l{i}.bias"] = torch.randn(outs[i], generator=g).to(dtype)
        specs.append({**layer, "weight": f"l{i}.weight", "bias": f"l{i}.bias" if layer["bias"] else None})
    tensors["embed"] = torch.randn(7, d, generator=g).to(dtype)
    tensors["flag"] = torch.tensor(True)
    tensors["norm0.weight"] = torch.ones(d, dtype=dtype)  # a norm's own tensor: the plan drops it
    plan = layer_plan(specs, d, g)
    rewritten = {w.source for w in plan.weights} | {b.source for b in plan.biases}
    plan.keys = {k: k for k in tensors if k not in rewritten and not k.startswith("norm")}
    plan = FoldPlan.from_json(plan.to_json())  # what is applied is what a JSON round trip keeps
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("out")
    keys = list(tensors)
    write_shards(src, [{k: tensors[k] for k in keys[::2]}, {k: tensors[k] for k in keys[1::2]}])

    stats = stream_fold(plan, src, out, progress=False, block_elements=block)

    want = folded_in_memory(plan, tensors)
    files = checkpoint_files(out)
    assert set(files) == set(want) | set(plan.keys)
    assert json.loads((out / INDEX_FILE).read_text())["metadata"]["total_size"] == stats.written_bytes
    for key, name in files.items():
        with ShardReader(out / name) as shard:
            got = shard.view(key).clone()
        if key in want:
            _ulp_close(got, want[key])
        else:
            assert torch.equal(got, tensors[key])
    assert stats.folded_bytes == sum(tensors[w.source].nbytes for w in plan.weights)
    assert all(c.ok for c in spot_check(plan, src, out))


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 40),
    n=st.integers(1, 40),
    in_out=st.booleans(),
    centered=st.booleans(),
    shift=st.booleans(),
    bias=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    block=st.integers(1, 300),
)
def test_fold_in_place_writes_what_fold_linear_returns(d, n, in_out, centered, shift, bias, dtype, block):
    g = torch.Generator().manual_seed(d * 1000 + n)
    weight = torch.randn((d, n) if in_out else (n, d), generator=g).to(dtype)
    scale = torch.rand(d, generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(d, generator=g, dtype=torch.float64) if shift else None
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    want_w, want_b = fold_linear(weight, scale, beta, b, centered=centered, in_out=in_out)
    storage = weight.data_ptr()

    new_b = fold_in_place(weight, scale, beta, centered=centered, in_out=in_out, block_elements=block).new_bias(b)

    assert weight.data_ptr() == storage
    _ulp_close(weight, want_w)
    if beta is None:
        assert new_b is None
    else:
        _ulp_close(new_b.to(want_b.dtype), want_b)


def test_shard_files_refuse_damage_and_miscounted_writes(tmp_path):
    writer = ShardWriter(tmp_path / "a.safetensors", {"x": (torch.float32, (2, 3)), "y": (torch.bfloat16, (4,))})
    writer.write(torch.ones(2, 3))
    with pytest.raises(ValueError, match="more bytes"):
        writer.write(torch.ones(5, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="never written"):
        writer.close()
    path = tmp_path / "b.safetensors"
    writer = ShardWriter(path, {"x": (torch.float32, (2, 3))})
    writer.write(torch.arange(6.0).view(2, 3))
    writer.close()
    with ShardReader(path) as shard:
        assert torch.equal(shard.view("x"), torch.arange(6.0).view(2, 3))
    intact = path.read_bytes()
    header_length = int.from_bytes(intact[:8], "little")
    damaged = {
        "truncated": intact[:-4],
        "header not a table": _with_header(b"[1, 2]", intact[8 + header_length :]),
        "entry not a table": _with_header(b'{"x": 5}', intact[8 + header_length :]),
        "offsets not numbers": _with_header(
            b'{"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": ["a", 24]}}', intact[8 + header_length :]
        ),
        "unknown dtype": _with_header(
            b'{"x": {"dtype": "Q7", "shape": [2, 3], "data_offsets": [0, 24]}}', intact[8 + header_length :]
        ),
    }
    for case, content in damaged.items():
        path.write_bytes(content)
        with pytest.raises(DataError) as refused:
            ShardReader(path)
        assert refused.value.code == "bad-checkpoint", case
    index = tmp_path / "model.safetensors.index.json"
    for weight_map in ('{"weight_map": {"x": "gone.safetensors"}}', '{"weight_map": 5}', "[]", "{"):
        index.write_text(weight_map)
        with pytest.raises(DataError) as refused:
            checkpoint_files(tmp_path)
        assert refused.value.code == "bad-checkpoint", weight_map
    with pytest.raises(InputNotFound) as refused:
        checkpoint_files(tmp_path / "nothing")
    assert refused.value.code == "not-a-checkpoint"


def _with_header(header: bytes, data: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + data
