"""``taperfx generate CHECKPOINT --prompt TEXT``: stream text from a checkpoint on a chosen backend.

The three backends run the same KV-cached loop (``taperfx.models.stream``) over
different step functions: the eager model, ``torch.compile(backend="taperfx")``
(folded when the gate is 0), or ONNX Runtime on an exported file. Throughput is
reported for the decode phase only, with prefill timed separately, and the
compiled step is warmed up on the prompt first (prefill and two decode steps: the
second decode step recompiles once, for the cache layout Inductor itself returns),
so the tokens/s figure compares backends, not compilers.

Sampling settings that cannot be what the user meant are refused before the model
loads: ``--top-k`` with greedy decoding, a temperature that is negative or not
finite, ``--onnx`` with a backend other than ``onnx`` (``--onnx`` alone implies it).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

from taperfx.commands.devices import device_name, require_device
from taperfx.errors import BadInput, DataError, InputNotFound

BACKENDS = ("eager", "compile", "onnx")


def add_arguments(p) -> None:
    p.add_argument(
        "checkpoint",
        help="checkpoint directory, folded or not (taperfx fold CKPT -o DIR), or a run directory (its latest)",
    )
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--backend", choices=BACKENDS, help="default: onnx when --onnx is given, else eager")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: up to the end of the context")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument(
        "--top-k", type=int, default=None, help="sample from the k most likely tokens (needs temperature > 0)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--onnx", default=None, help="ONNX file from `taperfx export onnx` (default: export now)")
    p.add_argument(
        "--program", default=None, help=".pt2 from `taperfx fold [--quantize]` to decode with (eager or compile)"
    )


def check_sampling(args) -> None:
    """Refuse settings that would be ignored or meaningless; ``--onnx`` alone selects the onnx backend."""
    if args.onnx is not None:
        if args.backend not in (None, "onnx"):
            raise BadInput(
                f"--onnx {args.onnx} is run by ONNX Runtime, not --backend {args.backend}; drop one of them",
                code="onnx-needs-onnx-backend",
            )
        args.backend = "onnx"
    args.backend = args.backend or "eager"
    if args.program is not None and (args.onnx is not None or args.backend == "onnx"):
        raise BadInput(
            "--program runs on the eager or compile backend; for ONNX Runtime give --onnx", code="program-backend"
        )
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise BadInput(
            f"--temperature {args.temperature}: expected a finite number >= 0 (0 is greedy)", code="bad-temperature"
        )
    if args.top_k is not None:
        if args.temperature == 0:
            raise BadInput(
                "--top-k samples, but --temperature 0 decodes greedily; give a temperature > 0", "top-k-greedy"
            )
        if args.top_k < 1:
            raise BadInput(f"--top-k {args.top_k}: expected an integer >= 1", code="bad-top-k")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens {args.max_new_tokens}: expected an integer >= 1", code="bad-max-new-tokens")


def _onnx_metadata(path: str):
    """The (config, fingerprint) of a taperfx ONNX export, with a clear error for anything else."""
    from google.protobuf.message import DecodeError

    from taperfx.export.onnx_export import read_metadata

    if not Path(path).is_file():
        if Path(path).is_dir():
            raise BadInput(f"--onnx {path} is a directory; give the ONNX file in it (model.onnx)", "onnx-is-directory")
        raise InputNotFound(f"--onnx {path} does not exist")
    try:
        return read_metadata(path)
    except DecodeError as exc:
        raise DataError(f"--onnx {path} is not an ONNX model ({exc})", code="not-onnx") from None
    except ValueError as exc:
        raise DataError(f"--onnx {exc}", code="not-taperfx-onnx") from None


def _onnx_step(model, onnx_path: str | None, device: str, scratch: Path):
    """An ORT decoder for ``model``: the given file, checked to be an export of this model, or a fresh export."""
    from taperfx.export.onnx_export import export_onnx, weights_fingerprint
    from taperfx.export.ort_decoder import OnnxDecoder

    if onnx_path is None:
        return OnnxDecoder(export_onnx(model, scratch), device=device)
    config, fingerprint = _onnx_metadata(onnx_path)
    if config is None:
        raise BadInput(
            f"{onnx_path} was exported from an ExportedProgram, which cannot be matched to this checkpoint; "
            "export it with `taperfx export onnx CHECKPOINT`",
            code="onnx-from-program",
        )
    if fingerprint != weights_fingerprint(model):
        raise BadInput(
            f"{onnx_path} was exported from other weights than this checkpoint's (a checkpoint and its folded copy "
            "count as different): export it with `taperfx export onnx CHECKPOINT` from the one you generate from",
            code="onnx-other-weights",
        )
    return OnnxDecoder(onnx_path, device=device)


def _check_program_source(path: str, recorded: dict, model) -> None:
    """A program folded from other weights than the checkpoint's would be decoded with another model's tokenizer
    and context: refused, as ``--onnx`` is, when the program records its source (``taperfx fold`` writes it)."""
    from taperfx.export.onnx_export import weights_fingerprint

    fingerprint = recorded.get("weights_sha256")
    if fingerprint is not None and fingerprint != weights_fingerprint(model):
        raise BadInput(
            f"--program {path} was folded from other weights than this checkpoint's (a checkpoint and its folded "
            "copy count as different): give the checkpoint it was folded from",
            code="program-other-weights",
        )


def _step_function(args, model, prompt, new_tokens: int, scratch: Path):
    import torch

    from taperfx.models import stream

    if args.program is not None:
        from taperfx.export.program import load_program
        from taperfx.export.program_decoder import ProgramDecoder

        program, recorded = load_program(args.program)
        _check_program_source(args.program, recorded, model)
        step = ProgramDecoder(program)
        if args.backend == "compile":
            step.module = torch.compile(step.module, dynamic=True)
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


def _load_tokenizer(path: str):
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as exc:
        raise DataError(
            f"{path} is not a SentencePiece model; generate decodes with SentencePiece only ({exc})",
            code="not-sentencepiece",
        ) from exc


def _encode_prompt(tokenizer, text: str, context: int, new_tokens: int | None) -> tuple:
    """The prompt's ids (1, T) and how many tokens to generate (by default, up to the end of the context)."""
    ids = tokenizer.encode(text)
    if not ids:
        raise BadInput("the prompt encodes to no tokens; give some text", code="empty-prompt")
    if len(ids) >= context:
        raise BadInput(
            f"prompt of {len(ids)} tokens exceeds the model's context of {context} (no room to generate)",
            code="prompt-too-long",
        )
    new_tokens = context - len(ids) if new_tokens is None else new_tokens
    if len(ids) + new_tokens > context:
        raise BadInput(
            f"prompt of {len(ids)} tokens plus {new_tokens} new tokens exceeds the model's context of {context}",
            code="prompt-too-long",
        )
    import torch

    return torch.tensor([ids]), new_tokens


def _echo(tokens, tokenizer) -> tuple[int, float | None]:
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
    check_sampling(args)
    require_device(args.device)
    if args.onnx is not None:
        _onnx_metadata(args.onnx)  # a file that is not ONNX is named before the model loads
    import torch

    from taperfx.checkpoint_fold import load_inference_model
    from taperfx.models import stream

    torch_device = "cpu" if args.backend == "onnx" else args.device  # ORT places the model itself
    model, meta = load_inference_model(args.checkpoint, device=torch_device)
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
