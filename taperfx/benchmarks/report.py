"""Turn a decode-benchmark result into the artefacts we commit: markdown table and bar chart."""

from __future__ import annotations

import json
import os
from pathlib import Path

from taperfx.atomic import atomic_path, write_text

COMPARED_WITH = ("baseline-handwritten", "baseline-fused", "taper-fused")


def _groups(result: dict) -> dict[tuple, dict[str, dict]]:
    groups: dict[tuple, dict[str, dict]] = {}
    for row in result["results"]:
        key = (row["backend"], row["batch"], row["prompt"], row["new_tokens"])
        groups.setdefault(key, {})[row["variant"]] = row
    return groups


def markdown_table(result: dict) -> str:
    """Tokens/s (median, min–max) per variant, and each variant's ratio to both baselines."""
    env = result["environment"]
    lines = [
        f"Device: {result['device']} ({env.get('gpu', env['cpu'])}), dtype {result['dtype']}, "
        f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, {env['threads']} threads, {env['date']}.",
        f"Model: {result['model']['arch']} width {result['model']['dim']}, depth {result['model']['n_layers']}, "
        f"{result['model']['n_heads']} heads, vocab {result['model']['vocab_size']}. "
        f"Median of {result['method']['repeats']} interleaved repeats (min–max in brackets).",
        "",
        "| backend | batch | prompt | new | variant | decode tokens/s | × handwritten | × fused RMSNorm "
        "| × taper-fused | prefill ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (backend, batch, prompt, new), rows in _groups(result).items():
        for variant, row in rows.items():
            ratios = [
                f"{row['tokens_per_s'] / rows[b]['tokens_per_s']:.3f}" if b in rows else "–" for b in COMPARED_WITH
            ]
            lines.append(
                f"| {backend} | {batch} | {prompt} | {new} | {variant} | "
                f"{row['tokens_per_s']:.1f} ({row['min']:.1f}–{row['max']:.1f}) | {' | '.join(ratios)} | "
                f"{row['prefill_ms']:.1f} |"
            )
    ops = result.get("aten_ops_per_decode_step")
    if ops:
        lines += [
            "",
            "ATen ops dispatched per eager single-token decode step (a proxy for kernel launches):",
            "",
            "| variant | ops | of which norm-related |",
            "|---|---|---|",
        ]
        norm_ops = ("rsqrt", "pow", "mean", "rms_norm", "_fused_rms_norm", "mul", "add")
        for variant, counts in ops.items():
            lines.append(
                f"| {variant} | {sum(counts.values())} | "
                + ", ".join(f"{k} {counts[k]}" for k in norm_ops if counts.get(k))
                + " |"
            )
    return "\n".join(lines) + "\n"


def bar_chart(result: dict, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(result)
    variants = list(next(iter(groups.values())))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4.2))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        xs = [g + i * width for g in range(len(groups))]
        rows = [rows[variant] for rows in groups.values()]
        med = [r["tokens_per_s"] for r in rows]
        err = [[m - r["min"] for m, r in zip(med, rows)], [r["max"] - m for m, r in zip(med, rows)]]
        ax.bar(xs, med, width, yerr=err, capsize=2, label=variant)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{b}\nB={bs} P={p}" for b, bs, p, _ in groups], fontsize=8)
    ax.set_ylabel("decode tokens/s (median, min–max)")
    ax.set_title(f"KV-cached decoding, {result['device']} {result['dtype']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)


def write_report(result: dict, out_dir: str | os.PathLike, stem: str) -> list[Path]:
    """``stem.json``, ``stem.md`` and ``stem.png`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"]
    write_text(paths[0], json.dumps(result, indent=2) + "\n")
    write_text(paths[1], markdown_table(result))
    bar_chart(result, paths[2])
    return paths
