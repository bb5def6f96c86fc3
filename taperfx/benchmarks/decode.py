"""KV-cached decoding throughput of the four variants (the paper's Table 2, and beyond).

Method, chosen so that a ratio survives a shared, noisy machine:
- every variant shares one set of random weights, and the fused variant's logits are
  checked against the unfused ones before anything is timed;
- each backend warms every variant up first (compilation, allocator, ORT arenas);
- repeats are interleaved, A B C D, B C D A, …, so machine drift hits every
  variant alike; we report the median and the min–max of the repeats;
- on CUDA the timed region is bracketed by CUDA events after a synchronisation.

Throughput is decode throughput: ``batch × (new_tokens − 1)`` tokens over the seconds
of the single-token steps that follow the prefill and reuse the KV cache (sampling
included). The prefill (prompt forward up to the first token) is reported beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from taperfx.benchmarks._compat import TorchDispatchMode, raise_recompile_limit
from taperfx.benchmarks.variants import VARIANTS, build_variants
from taperfx.errors import BadInput
from taperfx.models import ModelConfig, stream

__all__ = ["Case", "PAPER_GRID", "QUICK_GRID", "BACKENDS", "run_decode_benchmark", "ops_per_step", "quantized_variant"]


@dataclass(frozen=True)
class Case:
    batch: int
    prompt: int
    new_tokens: int


PAPER_GRID = tuple(Case(b, p, 128) for b in (1, 4) for p in (128, 256))
QUICK_GRID = (Case(1, 128, 32), Case(4, 128, 32))


def _eager(model, device):
    return model


def _compiled(mode: str | None):
    def prepare(model, device):
        # Prefill and decode are two graphs per variant, and every variant shares
        # Decoder.forward's code object, so Dynamo's default recompile limit (8) would
        # silently drop later variants to eager.
        raise_recompile_limit(64)
        return torch.compile(model, mode=mode, dynamic=True)

    return prepare


def _onnxruntime(model, device, quantize=None):
    import onnxruntime as ort

    from taperfx.export.onnx_export import export_onnx
    from taperfx.export.ort_decoder import OnnxDecoder
    from taperfx.export.quantized import export_onnx_quantized

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same CPU budget as the torch backends
    out = tempfile.mkdtemp(prefix="taperfx-bench-onnx-")
    path = export_onnx(model, out) if quantize is None else export_onnx_quantized(model, out, quantize)
    return OnnxDecoder(path, device=device.type, options=options)


QUANTIZED_OF = "taper-fused"  # the variant quantized variants start from: the shipped, folded model


def quantized_variant(config) -> str:
    return f"{QUANTIZED_OF}+{config.name}"


def _prepare_steps(backend: str, models: dict, variants: tuple[str, ...], quantize: dict, device) -> dict:
    """One step per variant; a quantized variant on ONNX Runtime is exported from the float folded model and
    quantized by ONNX Runtime's own tools (the torch operators have no ONNX form)."""
    prepare = BACKENDS[backend][0]
    steps = {}
    for v in variants:
        if v in quantize and backend == "onnxruntime":
            steps[v] = _onnxruntime(models[QUANTIZED_OF], device, quantize[v])
        else:
            steps[v] = prepare(models[v], device)
    return steps


# name -> (prepare(model, device) -> step, devices it runs on)
BACKENDS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "eager": (_eager, ("cpu", "cuda")),
    "compile": (_compiled(None), ("cpu", "cuda")),
    "compile-reduce-overhead": (_compiled("reduce-overhead"), ("cuda",)),
    "onnxruntime": (_onnxruntime, ("cpu", "cuda")),
}


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def ops_per_step(model: torch.nn.Module, case: Case, device: torch.device) -> Counter:
    """ATen ops dispatched by one eager single-token decode step: a proxy for kernel launches."""
    ids = torch.zeros(case.batch, case.prompt, dtype=torch.long, device=device)
    _, cache = model(ids)
    token = ids[:, :1]
    positions = torch.full_like(token, case.prompt)
    with _OpCounter() as counter:
        model(token, positions, cache)
    return counter.ops


class _Clock:
    """Timestamps in stream order: wall clock on CPU, CUDA events on a GPU (no sync in between)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []
        if self.cuda:
            torch.cuda.synchronize(device)

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _timed_generation(step, ids: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, float]:
    """Seconds of (prefill up to the first token, the remaining ``new_tokens - 1`` cached steps)."""
    clock = _Clock(device)
    clock.mark()
    for i, _ in enumerate(stream(step, ids, new_tokens)):
        if i == 0:
            clock.mark()
    clock.mark()
    prefill, decode = clock.intervals()
    return prefill, decode


def _check_fused_matches_unfused(models: dict, config: ModelConfig, device, dtype) -> float:
    ids = torch.randint(0, config.vocab_size, (2, 16), device=device, generator=torch.Generator(device).manual_seed(1))
    with torch.no_grad():
        ref = models["taper-unfused"](ids)[0].double()
        got = models["taper-fused"](ids)[0].double()
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    bound = 1e-4 if dtype == torch.float32 else 5e-2
    top1_differs = not torch.equal(got.argmax(-1), ref.argmax(-1))
    if not err <= bound or (dtype == torch.float32 and top1_differs):  # NaN fails too
        raise RuntimeError(
            f"fused logits differ from unfused by {err:.2e} (relative, bound {bound:g}); refusing to time"
        )
    return err


def _summary(timings: list[tuple[float, float]], batch: int, new_tokens: int) -> dict:
    rates = sorted(batch * (new_tokens - 1) / decode for _, decode in timings)
    return {
        "tokens_per_s": statistics.median(rates),
        "min": rates[0],
        "max": rates[-1],
        "prefill_ms": 1e3 * statistics.median(p for p, _ in timings),
        "seconds": [[p, d] for p, d in timings],
    }


def environment(device: torch.device) -> dict:
    import onnxruntime

    env = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def run_decode_benchmark(
    config: ModelConfig,
    cases: tuple[Case, ...] = PAPER_GRID,
    backends: tuple[str, ...] = ("eager",),
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    variants: tuple[str, ...] = VARIANTS,
    threads: int | None = None,
    quantize: tuple = (),
    progress: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Time every (backend, case, variant); returns a JSON-able dict (see ``report``).

    ``threads`` sets torch's intra-op threads (ONNX Runtime gets as many); on a shared
    machine one thread per process gives the steadiest ratios. Each config in ``quantize``
    (``taperfx.quantize`` schemes) adds a variant ``taper-fused+SCHEME``: the folded model
    quantized, timed in the same interleaved rounds as the float ones.
    """
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise BadInput(f"unknown backend(s) {sorted(unknown)}; choose from {sorted(BACKENDS)}")
    if repeats < 1:
        raise BadInput(f"repeats must be >= 1, got {repeats}", code="bad-repeats")
    if warmup < 0:
        raise BadInput(f"warmup must be >= 0, got {warmup}", code="bad-warmup")
    # Beyond the machine's cores threads only oversubscribe it (and tens of thousands crash OpenMP).
    if threads is not None and not 1 <= threads <= (os.cpu_count() or 1):
        raise BadInput(f"threads must be 1 to {os.cpu_count()} (this machine's CPUs), got {threads}", "bad-threads")
    for case in cases:
        if case.new_tokens < 2:
            raise BadInput(f"{case}: decode throughput needs new_tokens >= 2")
        if case.prompt + case.new_tokens > config.max_seq_len:
            raise BadInput(f"{case} does not fit the model's context of {config.max_seq_len}")
    if threads is not None:
        torch.set_num_threads(threads)
    models = build_variants(config, device, dtype, seed)
    fold_error = _check_fused_matches_unfused(models, config, device, dtype)
    quantized = {quantized_variant(q): q for q in quantize}
    if quantized:
        from taperfx.quantize import quantize as quantize_model

        models.update({name: quantize_model(models[QUANTIZED_OF], q) for name, q in quantized.items()})
        variants = tuple(variants) + tuple(quantized)
    rows = []
    ops = {v: dict(ops_per_step(models[v], cases[0], device)) for v in variants}
    for backend in backends:
        if device.type not in BACKENDS[backend][1]:
            progress(f"skipping {backend}: not available on {device.type}")
            continue
        steps = _prepare_steps(backend, models, variants, quantized, device)
        for case in cases:
            gen = torch.Generator().manual_seed(seed + case.batch * 1000 + case.prompt)
            ids = torch.randint(0, config.vocab_size, (case.batch, case.prompt), generator=gen).to(device)
            for v in variants:
                for _ in range(warmup):
                    _timed_generation(steps[v], ids, case.new_tokens, device)
            timings = {v: [] for v in variants}
            for r in range(repeats):
                order = variants[r % len(variants) :] + variants[: r % len(variants)]
                for v in order:
                    timings[v].append(_timed_generation(steps[v], ids, case.new_tokens, device))
            summaries = {v: _summary(timings[v], case.batch, case.new_tokens) for v in variants}
            for v in variants:
                rows.append({"backend": backend, **dataclasses.asdict(case), "variant": v, **summaries[v]})
            progress(f"{backend} {case}: " + ", ".join(f"{v} {summaries[v]['tokens_per_s']:.1f}" for v in variants))
    return {
        "environment": environment(device),
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "model": config.to_dict(),
        "method": {
            "repeats": repeats,
            "warmup": warmup,
            "seed": seed,
            "interleaved": True,
            "throughput": "batch*(new_tokens-1) / seconds of the cached single-token steps after prefill",
            "prefill_ms": "prompt forward up to the first sampled token",
        },
        "fused_vs_unfused_max_rel_logit_error": fold_error,
        "aten_ops_per_decode_step": ops,
        "results": rows,
    }
