"""The decode benchmark's machinery (not its speed): variants agree, rows and report are complete."""

import json

import pytest
import torch

from taperfx.benchmarks.decode import Case, run_decode_benchmark
from taperfx.benchmarks.report import markdown_table, write_report
from taperfx.benchmarks.variants import VARIANTS, build_variants
from taperfx.models import ModelConfig

CONFIG = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, max_seq_len=48)


def test_variants_share_weights_and_compute_the_same_function():
    models = build_variants(CONFIG, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        logits = {name: m(ids)[0] for name, m in models.items()}
    torch.testing.assert_close(logits["baseline-handwritten"], logits["baseline-fused"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits["taper-fused"], logits["taper-unfused"], rtol=1e-5, atol=1e-5)
    assert models["baseline-fused"].output.weight.data_ptr() != models["taper-fused"].output.weight.data_ptr()
    torch.testing.assert_close(models["baseline-fused"].output.weight, models["taper-fused"].output.weight)
    assert not any("norm" in type(m).__name__.lower() for m in models["taper-fused"].layers.modules())


def test_benchmark_rows_and_report(tmp_path):
    result = run_decode_benchmark(CONFIG, (Case(1, 8, 4), Case(2, 8, 4)), ("eager",), repeats=2, warmup=0)
    assert len(result["results"]) == 2 * len(VARIANTS)
    assert result["fused_vs_unfused_max_rel_logit_error"] < 1e-4
    for row in result["results"]:
        assert len(row["seconds"]) == 2 and row["prefill_ms"] > 0 and row["min"] <= row["tokens_per_s"] <= row["max"]
    ops = result["aten_ops_per_decode_step"]
    assert sum(ops["taper-fused"].values()) < sum(ops["taper-unfused"].values()) < sum(ops["baseline-fused"].values())
    table = markdown_table(result)
    assert table.count("| eager |") == 2 * len(VARIANTS)
    paths = write_report(result, tmp_path, "decode")
    assert json.loads(paths[0].read_text())["device"] == "cpu"
    assert paths[2].stat().st_size > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backend"):
        run_decode_benchmark(CONFIG, (Case(1, 8, 4),), ("tensorrt",))
    with pytest.raises(ValueError, match="context of 48"):
        run_decode_benchmark(CONFIG, (Case(1, 40, 20),), ("eager",))
    with pytest.raises(ValueError, match="llama-style"):
        build_variants(CONFIG.replace(arch="gpt2"), torch.device("cpu"), torch.float32)


@pytest.mark.slow  # depth-8 variants on every backend path (about 6 s)
def test_deep_variants_stay_finite():
    """Eight random layers at g = 0 must not overflow, or the fused-vs-unfused check compares NaNs."""
    models = build_variants(CONFIG.replace(n_layers=8), torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        assert all(torch.isfinite(m(ids)[0]).all() for m in models.values())
