"""How fast ``taperfx.fold`` is on a GPT-2-XL-shaped program, and how much transient memory it holds.

48 layers, width 1600, fused qkv, GELU MLP of 6400, TaperLN (Internal-Taper) at
g = 0, random fp32 weights (numerics are not the point here; only shapes and
sizes are). The vocabulary is cut to 1024: the embedding is never folded and only
costs RAM. Export time is reported separately; the fold itself is timed with
``time.perf_counter`` around ``fold_program``.

Memory: a sampler thread reads the process RSS every millisecond. The fold must
allocate its results (the folded weights); what it holds beyond them is
``peak RSS − RSS before − bytes of new tensors``, to compare with one copy of the
largest weight. Usage: ``python bench/fold_speed.py [--layers 48] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from datetime import date
from pathlib import Path

import torch

import taperfx
from taperfx.models import ModelConfig, build_model

RESULTS = Path(__file__).parent / "results"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest RSS seen while the block runs, sampled every millisecond."""

    def __enter__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def build(layers: int) -> tuple[torch.nn.Module, torch.Tensor]:
    config = ModelConfig(arch="gpt2", vocab_size=1024, dim=1600, n_layers=layers, n_heads=25, max_seq_len=64)
    model = taperfx.convert(build_model(config), "internal")
    ids = torch.randint(0, config.vocab_size, (1, 8))
    model.train()
    with torch.no_grad():
        model(ids)  # calibration batch at g = 1
    taperfx.start_taper(model)
    taperfx.set_gate(model, 0.0)
    return model.eval(), ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: more threads than free cores stall)")
    parser.add_argument("--out", default=str(RESULTS / "fold_speed"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model, ids = build(args.layers)
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(model, (ids,), strict=False)
    export_s = time.perf_counter() - t0

    before_ptrs = {t.untyped_storage().data_ptr() for t in program.state_dict.values()}
    largest = max(p.nbytes for p in program.state_dict.values())
    rss_before = rss_bytes()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        folded, report = taperfx.fold_program(program)
        fold_s = time.perf_counter() - t0
    new_bytes = sum(t.nbytes for t in folded.state_dict.values() if t.untyped_storage().data_ptr() not in before_ptrs)
    transient = peak.peak - rss_before - new_bytes

    result = {
        "date": date.today().isoformat(),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads},
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "shape": {"layers": args.layers, "width": 1600, "mlp": 6400, "dtype": "float32", "vocab": 1024},
        "params": sum(p.numel() for p in model.parameters()),
        "export_s": round(export_s, 2),
        "fold_s": round(fold_s, 3),
        "norms_folded": len(report.folded),
        "weights_rewritten_bytes": new_bytes,
        "largest_weight_bytes": largest,
        "transient_bytes_beyond_results": transient,
        "bytes_saved": report.bytes_saved,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    mib = 2**20
    out.with_suffix(".md").write_text(
        f"# fold speed, GPT-2-XL shape ({result['date']})\n\n"
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores ({args.threads} torch threads); "
        f"torch {result['torch']}, onnxruntime {result['onnxruntime']}.\n\n"
        "| layers | width | params | export (s) | fold (s) | norms folded | weights rewritten (MiB) "
        "| largest weight (MiB) | transient beyond results (MiB) |\n|---|---|---|---|---|---|---|---|---|\n"
        f"| {args.layers} | 1600 | {result['params'] / 1e9:.2f} B | {export_s:.1f} | {fold_s:.2f} | {len(report.folded)} "
        f"| {new_bytes / mib:.0f} | {largest / mib:.1f} | {transient / mib:.1f} |\n"
    )
    print(out.with_suffix(".md").read_text())
    print(report.__str__().splitlines()[0])


if __name__ == "__main__":
    main()
