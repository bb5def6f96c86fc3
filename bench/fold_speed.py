"""How fast ``taperfx.fold`` is on a GPT-2-XL-shaped program, and how much transient memory it holds.

48 layers, width 1600, fused qkv, GELU MLP of 6400, TaperLN (Internal-Taper) at
g = 0, random fp32 weights (numerics are not the point here; only shapes and
sizes are). The vocabulary is cut to 1024: the embedding is never folded and only
costs RAM. Export time is reported separately.

Time: ``fold`` (the result owns fresh weights) and ``fold(inplace=True)`` (the
weights rewritten where they lie), both without the global check (timed apart,
once), interleaved with a *floor* for the default: cloning exactly the weights the
fold rewrites. A result-owning fold must read those weights and write as many
bytes into fresh memory (the input's weights are shared with the user's model), so
the clone is the least it can cost on this machine; the in-place fold has no such
floor. Interleaving makes all three see the same load (recorded per repeat).

Memory: the fold runs once under ``torch.profiler`` with ``profile_memory=True``,
which reports every CPU tensor allocation and free. Transient memory is the peak
of live bytes allocated by the pass minus the bytes still live at its end (the
folded weights it returns), to compare with one copy of the largest weight.

Usage: ``python bench/fold_speed.py [--layers 48] [--threads N] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import taperfx
from taperfx.atomic import write_text
from taperfx.benchmarks.decode import environment
from taperfx.models import ModelConfig, build_model

RESULTS = Path(__file__).parent / "results"
MIB = 2**20


def build(layers: int) -> tuple[torch.nn.Module, torch.Tensor]:
    config = ModelConfig(arch="gpt2", vocab_size=1024, dim=1600, n_layers=layers, n_heads=25, max_seq_len=64)
    model = taperfx.convert(build_model(config), "internal")
    ids = torch.randint(0, config.vocab_size, (1, 8))
    taperfx.calibrate(model, [ids])
    taperfx.set_gate(model, 0.0)
    return model.eval(), ids


def timed(fn) -> dict:
    """Wall and CPU seconds ``fn`` took, CPU split into user and kernel (``sys``: page faults of fresh
    memory land there), and the 1-minute load average when it finished. CPU time is what load from
    other jobs inflates least."""
    gc.collect()
    t0, c0 = time.perf_counter(), os.times()
    result = fn()
    c1 = os.times()
    timing = {
        "wall_s": round(time.perf_counter() - t0, 3),
        "cpu_s": round(c1.user + c1.system - c0.user - c0.system, 3),
        "sys_s": round(c1.system - c0.system, 3),
        "load": os.getloadavg()[0],
    }
    if isinstance(result, tuple):  # fold_program: the local checks' share of the time
        timing["check_s"] = round(result[1].check_seconds, 3)
    return timing


def interleaved(tasks: dict, repeats: int) -> list[dict]:
    """``repeats`` rounds of ``{name: timed(fn)}`` over ``tasks = {name: (prepare or None, fn)}``, the order
    reversed every other round so that no task always runs on another's freed memory."""
    runs = []
    for i in range(repeats):
        run = {}
        for name in list(tasks) if i % 2 == 0 else list(tasks)[::-1]:
            prepare, fn = tasks[name]
            if prepare is not None:
                prepare()
            run[name] = timed(fn)
        runs.append(run)
    return runs


def rewritten_weights(program, report) -> list[torch.Tensor]:
    """The original tensors of the weights the fold rewrote (the floor clones these)."""
    names = {w for f in report.folded for w in f.weights}
    return [program.state_dict[n] for n in names]


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def transient_bytes(program) -> tuple[int, int]:
    """``(peak live bytes − bytes live at the end, bytes live at the end)`` over one fold."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        folded = taperfx.fold(program, verify=False)
    live = peak = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            live += event.nbytes()  # frees are negative
            peak = max(peak, live)
    del folded
    return peak - live, live


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads; default: torch's own (the cores), what a user gets"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "fold_speed"))
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model, ids = build(args.layers)
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(model, (ids,), strict=False)
    export_s = time.perf_counter() - t0

    # Warm-up; names the rewritten weights. Without the global check: its float64 copy of a 6 GB model
    # would not fit beside everyone else's jobs (bench/fold_throughput.py times it on 12 layers).
    folded, report = taperfx.fold_program(program, verify=False)
    originals = rewritten_weights(program, report)
    del folded
    tasks = {
        "fold": (None, lambda: taperfx.fold_program(program, verify=False)),
        "fold_inplace": (None, lambda: taperfx.fold_program(program, inplace=True, verify=False)),
        "clone_floor": (None, lambda: [w.clone() for w in originals]),
    }
    runs = interleaved(tasks, args.repeats)
    transient, results_bytes = transient_bytes(program)
    rewritten = sum(w.nbytes for w in originals)

    result = {
        **environment(torch.device("cpu")),
        "cores": os.cpu_count(),
        "shape": {"layers": args.layers, "width": 1600, "mlp": 6400, "dtype": "float32", "vocab": 1024},
        "params": sum(p.numel() for p in model.parameters()),
        "export_s": round(export_s, 2),
        "runs": runs,
        "fold_s_best": min(r["fold"]["wall_s"] for r in runs),
        "fold_s_median": median([r["fold"]["wall_s"] for r in runs]),
        "fold_inplace_s_best": min(r["fold_inplace"]["wall_s"] for r in runs),
        "fold_inplace_s_median": median([r["fold_inplace"]["wall_s"] for r in runs]),
        "fold_s_best_without_checks": min(r["fold"]["wall_s"] - r["fold"]["check_s"] for r in runs),
        "fold_inplace_s_best_without_checks": min(
            r["fold_inplace"]["wall_s"] - r["fold_inplace"]["check_s"] for r in runs
        ),
        "local_check_s": round(report.check_seconds, 3),
        "clone_floor_s_best": min(r["clone_floor"]["wall_s"] for r in runs),
        "norms_folded": len(report.folded),
        "weights_rewritten_bytes": rewritten,
        "fresh_write_rate_gib_s": round(rewritten / min(r["clone_floor"]["wall_s"] for r in runs) / 2**30, 2),
        "largest_weight_bytes": max(t.nbytes for t in program.state_dict.values()),
        "bytes_live_after_fold": results_bytes,
        "transient_peak_bytes_beyond_results": transient,
        "bytes_saved": report.bytes_saved,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_text(out.with_suffix(".md"), markdown(result))
    print(out.with_suffix(".md").read_text())


def markdown(r: dict) -> str:
    names = ("fold", "fold_inplace", "clone_floor")
    best_cpu = {name: min(run[name]["cpu_s"] for run in r["runs"]) for name in names}

    def loads(run: dict) -> str:
        return " / ".join(f"{run[n]['load']:.1f}" for n in names)

    def cell(run: dict, name: str) -> str:
        t = run[name]
        check = f" [{t['check_s']:.2f}]" if "check_s" in t else ""
        return f"{t['wall_s']:.2f}{check} | {t['cpu_s']:.2f} ({t['sys_s']:.2f})"

    rows = "\n".join(
        f"| {i + 1} | {' then '.join(run)} | {cell(run, 'fold')} | {cell(run, 'fold_inplace')} "
        f"| {cell(run, 'clone_floor')} | {loads(run)} |"
        for i, run in enumerate(r["runs"])
    )
    met = {
        "in place < 1 s best": r["fold_inplace_s_best"] < 1,
        "in place < 1.5 s median": r["fold_inplace_s_median"] < 1.5,
        "default < 2 s best": r["fold_s_best"] < 2,
    }
    return (
        f"# fold speed, GPT-2-XL shape ({r['date']})\n\n"
        f"Machine: {r['cpu']}, {r['cores']} cores ({r['threads']} torch thread(s)); torch {r['torch']}, "
        f"onnxruntime {r['onnxruntime']}, Python {r['python']}. The machine is shared: the load column is the "
        "1-minute load average after each timing (fold / in place / clone).\n\n"
        f"Program: {r['shape']['layers']} layers, width 1600, {r['params'] / 1e9:.2f} B params, fp32; "
        f"export {r['export_s']:.1f} s; {r['norms_folded']} norms folded, "
        f"{r['weights_rewritten_bytes'] / MIB:.0f} MiB of weights rewritten.\n\n"
        "`fold` is `taperfx.fold(program, verify=False)` (the result owns fresh weights); `fold_inplace` is "
        "`taperfx.fold(program, inplace=True, verify=False)` (the weights are rewritten where they lie: each repeat "
        "folds the weights the previous one left, other values, the same work; no copy of 3 GiB to restore). "
        "Both include the local float64 check of every rewritten layer "
        f"({r['local_check_s']:.2f} s in the warm-up fold); the global check on the example inputs "
        "(`verify=True`, the default) comes on top and is timed apart, in `fold_throughput.md`.\n\n"
        "Wall times in brackets: the part spent in the local checks.\n\n"
        "| repeat | order | fold wall [checks] (s) | fold CPU (kernel) (s) | in place wall [checks] (s) "
        "| in place CPU (kernel) (s) "
        "| floor: clone, wall (s) | floor CPU (kernel) (s) | load |\n|---|---|---|---|---|---|---|---|---|\n"
        f"{rows}\n\n"
        f"Best / median: fold {r['fold_s_best']:.2f} / {r['fold_s_median']:.2f} s, in place "
        f"{r['fold_inplace_s_best']:.2f} / {r['fold_inplace_s_median']:.2f} s; without the local checks' share, "
        f"best fold {r['fold_s_best_without_checks']:.2f} s, in place {r['fold_inplace_s_best_without_checks']:.2f} s. "
        "Targets (with the local checks): "
        + ", ".join(f"{k}: {'met' if v else 'not met'}" for k, v in met.items())
        + ".\n\n"
        f"Memory held beyond the results at the peak of the (default) fold: "
        f"{r['transient_peak_bytes_beyond_results'] / MIB:.2f} MiB "
        f"(largest weight: {r['largest_weight_bytes'] / MIB:.1f} MiB), "
        "counted from every CPU tensor allocation and free (torch.profiler, profile_memory=True).\n\n"
        f"Floor of the default fold: it writes {r['weights_rewritten_bytes'] / MIB:.0f} MiB into fresh memory; "
        f"a plain clone of those weights writes them at {r['fresh_write_rate_gib_s']:.2f} GiB/s here "
        f"(best of the repeats), i.e. {r['clone_floor_s_best']:.2f} s before any arithmetic "
        f"({best_cpu['clone_floor']:.2f} s CPU; fold {best_cpu['fold']:.2f} s, in place "
        f"{best_cpu['fold_inplace']:.2f} s CPU at best). The in-place fold has no such floor: it allocates nothing "
        "of the weights' size.\n"
    )


if __name__ == "__main__":
    main()
