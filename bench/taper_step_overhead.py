"""Cost of a training step during the taper vs the same model with plain RMSNorm.

Issue 3's budget: a TaperNorm step during the taper (0 < g < 1, both branches live)
may cost at most 10 % more than a plain-RMSNorm step. Each variant runs the same
full step (forward, backward, AdamW) on the same batch; variants are interleaved in
every repeat so that drift on a shared machine hits all of them alike. Results go to
bench/results/taper_step_overhead.{json,md}.

    .venv/bin/python bench/taper_step_overhead.py --repeats 30
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F
from _runs import add_shape_arguments, machine, use_threads

import taperfx
from taperfx.models import build_model, preset


def _variants(width: int, vocab: int, context: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    plain = build_model(preset(f"tinystories-{width}", vocab_size=vocab, max_seq_len=context))
    tapering = taperfx.convert(copy.deepcopy(plain), "internal")
    taperfx.calibrate(tapering, [torch.randint(0, vocab, (2, context))])  # one g = 1 batch calibrates c
    taperfx.set_gate(tapering, 0.5)
    gate_zero = copy.deepcopy(tapering)
    taperfx.set_gate(gate_zero, 0.0)
    return {"plain RMSNorm": plain, "TaperNorm g=0.5": tapering, "TaperNorm g=0": gate_zero}


def _stepper(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> float:
        t0 = time.perf_counter()
        logits, _ = model(x)
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def _layer_times(width: int, tokens: tuple[int, int], repeats: int) -> dict[str, float]:
    """Median forward+backward time (ms) of one norm layer alone: where the step's extra cost comes from."""
    x = torch.randn(*tokens, width, requires_grad=True)
    plain = torch.nn.RMSNorm(width)
    taper = taperfx.TaperRMSNorm(width)
    taperfx.calibrate(taper, [x.detach()])
    taper.set_gate(0.5)
    times: dict[str, list[float]] = {"plain RMSNorm": [], "TaperNorm g=0.5": []}
    for _ in range(repeats):
        for name, layer in (("plain RMSNorm", plain), ("TaperNorm g=0.5", taper)):
            t0 = time.perf_counter()
            layer(x).sum().backward()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(p)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    use_threads(args.threads)

    x = torch.randint(0, args.vocab_size, (args.batch_size, args.context), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    steps = {name: _stepper(m, x, y) for name, m in _variants(args.width, args.vocab_size, args.context).items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.warmup + args.repeats):
        for name, step in steps.items():
            t = step()
            if r >= args.warmup:
                times[name].append(t)

    # Median and minimum both: on a shared machine the minimum is the least disturbed estimate.
    plain = times["plain RMSNorm"]
    rows = {
        name: {
            "median_ms": 1e3 * statistics.median(ts),
            "min_ms": 1e3 * min(ts),
            "max_ms": 1e3 * max(ts),
            "overhead_median": statistics.median(ts) / statistics.median(plain) - 1.0,
            "overhead_min": min(ts) / min(plain) - 1.0,
        }
        for name, ts in times.items()
    }
    layer = _layer_times(args.width, (args.batch_size, args.context), 10 * args.repeats)
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "settings": vars(args)
        | {"results": str(args.results), "model": f"llama tinystories-{args.width} (depth 8, 16 heads)"},
        "rows": rows,
        "layer_median_ms": layer,
        "times_s": times,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "taper_step_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# Training-step cost during the taper",
        "",
        f"{m['cpu']}, {m['cores']} cores ({args.threads} torch thread(s)), torch {m['torch']}, {result['date']}.",
        f"Width {args.width}, depth 8, batch {args.batch_size} × {args.context} tokens, vocab {args.vocab_size}, fp32. "
        f"Full step (forward, backward, AdamW); median of {args.repeats} interleaved repeats "
        f"after {args.warmup} warm-up.",
        "",
        "| variant | median ms | min–max ms | vs plain (median) | vs plain (min) |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f}–{r['max_ms']:.1f} | "
            f"{100 * r['overhead_median']:+.1f} % | {100 * r['overhead_min']:+.1f} % |"
            for name, r in rows.items()
        ),
        "",
        f"One norm layer alone, forward + backward on ({args.batch_size}, {args.context}, {args.width}), median of "
        f"{10 * args.repeats}: "
        + ", ".join(f"{name} {ms:.2f} ms" for name, ms in layer.items())
        + f" ({layer['TaperNorm g=0.5'] / layer['plain RMSNorm']:.1f}×). The model has 2 norms per block.",
    ]
    (args.results / "taper_step_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
