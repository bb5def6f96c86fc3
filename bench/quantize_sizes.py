"""Size on disk of the deployable artefacts, fp32 against quantized, and the weight bytes one decode step reads.

The width-512 depth-8 model (vocab 32000, tied embeddings; random weights: sizes do not depend on the
values) is folded, then saved as ``.pt2`` (``taperfx fold [--quantize]``) and as ONNX
(``taperfx export onnx [--quantize]``). "Read per token" is what batch-1 decoding must stream from
memory for each token: every linear weight in its stored form (codes, scales, zeros) plus one row of
the embedding; it is what bounds decode speed on a CPU (BENCHMARKS.md, Quantization).

Usage: ``python bench/quantize_sizes.py``; writes ``bench/results/quantize_sizes.{json,md}``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

import taperfx
import taperfx.quantize as tq
from taperfx.benchmarks.decode import environment
from taperfx.benchmarks.variants import build_variants
from taperfx.export.onnx_export import export_onnx
from taperfx.export.program import decoder_program
from taperfx.export.quantized import export_onnx_quantized
from taperfx.models import preset

RESULTS = Path(__file__).parent / "results"
SCHEMES = (
    tq.Int4WeightOnly(group_size=32),
    tq.Int4WeightOnly(group_size=128),
    tq.Int4WeightOnly(group_size=32, embedding=True),
    tq.Int8WeightOnly(),
)
MIB = 2**20


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _read_per_token(program, config) -> int:
    """Linear weights as stored, plus one embedding row."""
    linears = [n for n in program.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    state = {**program.state_dict, **program.constants}
    names = {s.arg.name: s.target for s in program.graph_signature.input_specs if s.target is not None}
    seen, total = set(), 0
    for node in linears:
        for arg in node.args:
            target = names.get(getattr(arg, "name", None))
            if target is not None and target not in seen:
                seen.add(target)
                total += state[target].numel() * state[target].element_size()
    return total + 4 * config.dim


def main() -> None:
    torch.set_num_threads(1)
    config = preset("tinystories-512")
    model = build_variants(config, torch.device("cpu"), torch.float32)["taper-fused"]
    folded = taperfx.fold(decoder_program(model))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for scheme in (None, *SCHEMES):
            name = "fp32" if scheme is None else scheme.name + (" + embedding" if scheme.embedding else "")
            program = folded if scheme is None else tq.quantize(folded, scheme)
            pt2 = scratch / f"{len(rows)}.pt2"
            torch.export.save(program, pt2)
            row = {"scheme": name, "pt2_bytes": pt2.stat().st_size, "read_per_token": _read_per_token(program, config)}
            if scheme is None or not scheme.embedding:
                out = scratch / f"onnx-{len(rows)}"
                export_onnx(model, out) if scheme is None else export_onnx_quantized(model, out, scheme)
                row["onnx_bytes"] = _dir_bytes(out)
            rows.append(row)
            print(row)
    result = {"environment": environment(torch.device("cpu")), "model": config.to_dict(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantize_sizes.json").write_text(json.dumps(result, indent=2) + "\n")
    fp32 = rows[0]
    lines = [
        "# Size on disk and weight bytes read per decoded token",
        "",
        f"Width 512, depth 8, vocab 32000, tied embeddings, folded; torch {result['environment']['torch']}, "
        f"onnxruntime {result['environment']['onnxruntime']}, {result['environment']['date']}.",
        "",
        "| scheme | .pt2 MiB | × fp32 | model.onnx MiB | × fp32 | read per token MiB | × fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        onnx = row.get("onnx_bytes")
        onnx_cells = f"{onnx / MIB:.1f} | {fp32['onnx_bytes'] / onnx:.2f}" if onnx else "– | –"
        lines.append(
            f"| {row['scheme']} | {row['pt2_bytes'] / MIB:.1f} | {fp32['pt2_bytes'] / row['pt2_bytes']:.2f} | "
            f"{onnx_cells} | {row['read_per_token'] / MIB:.1f} | {fp32['read_per_token'] / row['read_per_token']:.2f} |"
        )
    (RESULTS / "quantize_sizes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
