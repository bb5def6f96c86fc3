"""``taperfx generate CHECKPOINT --prompt TEXT``: stream text from a checkpoint on a chosen backend.

The three backends run the same KV-cached loop (``taperfx.models.stream``) over
different step functions: the eager model, ``torch.compile(backend="taperfx")``
(folded when the gate is 0), or ONNX Runtime on an exported file. Throughput is
reported for the decode phase only, with prefill timed separately, and the
compiled step is warmed up on the prompt first (prefill and two decode steps: the
second decode step recompiles once, for the cache layout Inductor itself returns),
so the tokens/s figure compares backends, not compilers.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch

from taperfx.export.onnx_export import export_onnx, read_metadata, weights_fingerprint
from taperfx.export.ort_decoder import OnnxDecoder
from taperfx.export.program_decoder import ProgramDecoder, load_program
from taperfx.models import stream
from taperfx.train.checkpoint import load_model

BACKENDS = ("eager", "compile", "onnx")


def _onnx_step(model, onnx_path: str | None, device: str, scratch: Path) -> OnnxDecoder:
    """An ORT decoder for ``model``: the given file, checked to be an export of this model, or a fresh export."""
    if onnx_path is None:
        return OnnxDecoder(export_onnx(model, scratch), device=device)
    config, fingerprint = read_metadata(onnx_path)
    if config is None:
        raise ValueError(
            f"{onnx_path} was exported from an ExportedProgram, which cannot be matched to this checkpoint; "
            "export it with `taperfx export onnx CHECKPOINT`"
        )
    if fingerprint != weights_fingerprint(model):
        raise ValueError(
            f"{onnx_path} was exported from another model: its weights fingerprint differs from the checkpoint's"
        )
    return OnnxDecoder(onnx_path, device=device)


def _program_step(path: str, backend: str) -> ProgramDecoder:
    """A decode step over a saved program (``taperfx fold [--quantize]``); compiled by Inductor for ``compile``."""
    if backend == "onnx":
        raise ValueError("--program runs on the eager or compile backend; for ONNX Runtime give --onnx")
    step = ProgramDecoder(load_program(path))
    if backend == "compile":
        step.module = torch.compile(step.module, dynamic=True)
    return step


def _step_function(args, model, prompt: torch.Tensor, new_tokens: int, scratch: Path):
    if args.program is not None:
        step = _program_step(args.program, args.backend)
    elif args.backend == "eager":
        return model
    elif args.backend == "compile":
        step = torch.compile(model, backend="taperfx", dynamic=True)
    else:
        return _onnx_step(model, args.onnx, args.device, scratch)
    if args.backend == "compile":
        for _ in stream(step, prompt, min(3, new_tokens)):
            pass
    return step


def _load_tokenizer(path: str) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as exc:
        raise ValueError(
            f"{path} is not a SentencePiece model; generate decodes with SentencePiece only ({exc})"
        ) from exc


def _encode_prompt(
    tokenizer: spm.SentencePieceProcessor, text: str, context: int, new_tokens: int | None
) -> tuple[torch.Tensor, int]:
    """The prompt's ids (1, T) and how many tokens to generate (by default, up to the end of the context)."""
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give some text")
    if len(ids) >= context:
        raise ValueError(f"prompt of {len(ids)} tokens exceeds the model's context of {context} (no room to generate)")
    new_tokens = context - len(ids) if new_tokens is None else new_tokens
    if len(ids) + new_tokens > context:
        raise ValueError(
            f"prompt of {len(ids)} tokens plus {new_tokens} new tokens exceeds the model's context of {context}"
        )
    return torch.tensor([ids]), new_tokens


def _echo(tokens, tokenizer: spm.SentencePieceProcessor) -> tuple[int, float | None]:
    """Print the text as tokens arrive (stopping at end-of-sequence); return the count and the first token's time."""
    generated: list[int] = []
    shown = ""
    first_token_at = None
    for token in tokens:
        first_token_at = first_token_at or time.perf_counter()
        if int(token[0]) == tokenizer.eos_id():
            break
        generated.append(int(token[0]))
        text = tokenizer.decode(generated)
        sys.stdout.write(text[len(shown) :])
        sys.stdout.flush()
        shown = text
    print()
    return len(generated), first_token_at


def run(args) -> int:
    torch_device = "cpu" if args.backend == "onnx" else args.device  # ORT places the model itself
    model, meta = load_model(args.checkpoint, device=torch_device)
    tokenizer = _load_tokenizer(meta["tokenizer_path"])
    prompt, new_tokens = _encode_prompt(tokenizer, args.prompt, model.config.max_seq_len, args.max_new_tokens)
    prompt = prompt.to(torch_device)
    generator = torch.Generator(torch_device).manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="taperfx-generate-") as scratch:
        step = _step_function(args, model, prompt, new_tokens, Path(scratch))
        start = time.perf_counter()
        tokens = stream(step, prompt, new_tokens, temperature=args.temperature, top_k=args.top_k, generator=generator)
        count, first_token_at = _echo(tokens, tokenizer)
        end = time.perf_counter()
    decoded = max(count - 1, 0)  # the first token comes out of prefill
    prefill_ms = 1e3 * ((first_token_at or end) - start)
    rate = decoded / (end - first_token_at) if decoded else 0.0
    print(
        f"[{args.backend}] prefill {prompt.shape[1]} tokens in {prefill_ms:.1f} ms; "
        f"decode {decoded} tokens at {rate:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="stream text from a checkpoint (eager, torch.compile or ONNX Runtime)")
    p.add_argument("checkpoint", help="checkpoint directory (or a run directory: its latest checkpoint)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--backend", choices=BACKENDS, default="eager")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: up to the end of the context")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--onnx", default=None, help="ONNX file from `taperfx export onnx` (default: export now)")
    p.add_argument(
        "--program", default=None, help=".pt2 from `taperfx fold [--quantize]` to decode with (eager or compile)"
    )
    p.set_defaults(func=run)
