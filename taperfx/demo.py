"""``taperfx demo``: the README's main command."""

from __future__ import annotations

import time
from pathlib import Path

import torch

import taperfx
from taperfx.models import ModelConfig, build_model, generate


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for arch in ("llama", "gpt2"):
        config = ModelConfig(arch=arch, vocab_size=256, dim=64, n_layers=2, n_heads=4, max_seq_len=128)
        model = build_model(config).eval()
        prompt = torch.randint(0, config.vocab_size, (1, 8))
        t0 = time.perf_counter()
        tokens = generate(model, prompt, 16)
        dt = time.perf_counter() - t0
        taperfx.convert(model, "internal")
        print(f"{arch}: decoded {tokens.shape[1] - prompt.shape[1]} tokens in {dt * 1e3:.1f} ms; "
              f"{sum(1 for _ in taperfx.tapernorms(model))} norms converted to TaperNorm")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole product on the embedded default corpus")
    p.add_argument("--out", default="out/demo", help="output directory (reused by a second run)")
    p.set_defaults(func=run)
