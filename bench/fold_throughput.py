"""Fold throughput: GB/s of weights rewritten by each fold path, beside a plain copy of the same bytes.

A GPT-2-XL-shaped Internal-Taper model (width 1600, ``--layers`` layers, random
fp32 weights, g = 0) is saved as a taperfx checkpoint on disk, then folded by every
path, interleaved within each repeat (the machine is shared; each timing records
the 1-minute load average):

- ``memory``: ``taperfx.fold(program)``, the result owns fresh copies of the rewritten weights;
- ``memory_in_place``: ``taperfx.fold(program, inplace=True)``, the weights are rewritten where
  they are (each repeat folds what the previous one left: other values, the same work);
- ``stream``: ``stream_fold`` of the checkpoint's shards into a new directory (plan computed
  once beforehand, its time reported apart; output synced to disk);
- ``stream_in_place``: the crash-safe in-place fold (``stream_fold_in_place``) of a copy of the
  checkpoint (the copy made untimed before each repeat);
- ``copy_floor``: a plain read + write (synced) of every shard: the same bytes a streamed fold
  reads and writes, with no arithmetic, i.e. the physical floor on this disk.

Rates are bytes of weights rewritten per second of wall time (GB = 1e9 bytes); the
streamed paths also write the tensors they keep, so their rate is lower than the
copy's by construction even at equal disk speed: both are reported in bytes moved
per second too. The source shards are in the page cache after the first read (this
measures the write side of the disk and the arithmetic, not a cold read).

Usage: ``python bench/fold_throughput.py [--layers 12] [--repeats 3] [--dir /tmp]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from fold_speed import build, interleaved

import taperfx
from taperfx.atomic import write_text
from taperfx.benchmarks.decode import environment
from taperfx.checkpoint_fold import plan_checkpoint
from taperfx.errors import InputNotFound, TaperfxError
from taperfx.passes.journal import stream_fold_in_place
from taperfx.passes.shards import checkpoint_files
from taperfx.passes.stream import stream_fold
from taperfx.train.checkpoint import save_checkpoint

RESULTS = Path(__file__).parent / "results"
GB = 1e9
CHUNK = 64 * 2**20


def copy_synced(src: Path, dst: Path) -> int:
    """Read ``src`` and write ``dst`` in 64 MiB chunks, then fsync: the floor of any read + write."""
    n = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            fout.write(chunk)
            n += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads; default: torch's own (the cores), what a user gets"
    )
    parser.add_argument("--dir", default=None, help="where the checkpoints go (default: the system temp dir)")
    parser.add_argument("--out", default=str(RESULTS / "fold_throughput"))
    args = parser.parse_args()
    if args.dir is not None and not Path(args.dir).is_dir():  # before minutes of building: nothing to clean up
        raise InputNotFound(f"--dir {args.dir}: no such directory (the checkpoints are written there)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, ids = build(args.layers)
    work = Path(tempfile.mkdtemp(prefix="taperfx-throughput-", dir=args.dir))
    try:
        result = measure(model, ids, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_text(out.with_suffix(".md"), markdown(result))
    print(out.with_suffix(".md").read_text())


def measure(model, ids, work: Path, args) -> dict:
    tokenizer = work / "tokenizer.model"
    tokenizer.write_bytes(b"stand-in")
    meta = {"protocol": "internal", "model": model.config.to_dict()}
    ckpt = save_checkpoint(work / "run", 0, model, meta, tokenizer)
    t0 = time.perf_counter()
    plan = plan_checkpoint(ckpt, keep_keys=True).plan  # in place cannot rename; the same plan for both
    plan_s = time.perf_counter() - t0
    shards = sorted(set(checkpoint_files(ckpt).values()))
    checkpoint_bytes = sum((ckpt / s).stat().st_size for s in shards)

    with torch.no_grad():
        program = torch.export.export(model, (ids,), strict=False)
    folded, report = taperfx.fold_program(program)  # warm-up, with the global check (timed apart)
    verify_s = report.verify_seconds
    names = [w for f in report.folded for w in f.weights]
    del folded
    rewritten = sum(program.state_dict[n].nbytes for n in names)

    def fresh_dir(name: str) -> Path:
        path = work / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        return path

    def stream() -> None:
        stream_fold(plan, ckpt, fresh_dir("streamed"), progress=False)

    def copy_floor() -> None:
        out = fresh_dir("copied")
        for s in shards:
            copy_synced(ckpt / s, out / s)

    def prepare_in_place() -> None:
        target = work / "in_place"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(ckpt, target)

    tasks = {
        "memory": (None, lambda: taperfx.fold(program, verify=False)),
        "memory_in_place": (None, lambda: taperfx.fold(program, inplace=True, verify=False)),
        "stream": (None, stream),
        "stream_in_place": (prepare_in_place, lambda: stream_fold_in_place(plan, work / "in_place", progress=False)),
        "copy_floor": (None, copy_floor),
    }
    runs = interleaved(tasks, args.repeats)

    stream_bytes = plan_bytes(plan, ckpt)
    return {
        **environment(torch.device("cpu")),
        "cores": os.cpu_count(),
        "shape": {"layers": args.layers, "width": 1600, "mlp": 6400, "dtype": "float32"},
        "plan_s": round(plan_s, 2),
        "global_check_s": round(verify_s, 2),
        "weights_rewritten_bytes": rewritten,
        "streamed_weights_bytes": stream_bytes,
        "checkpoint_bytes": checkpoint_bytes,
        "runs": runs,
    }


def plan_bytes(plan, ckpt: Path) -> int:
    from taperfx.passes.shards import ShardReader

    files = checkpoint_files(ckpt)
    total = 0
    for w in plan.weights:
        with ShardReader(ckpt / files[w.source]) as shard:
            total += shard.tensors[w.source].nbytes
    return total


def markdown(r: dict) -> str:
    names = list(r["runs"][0])
    rewritten = {
        "memory": r["weights_rewritten_bytes"],
        "memory_in_place": r["weights_rewritten_bytes"],
        "stream": r["streamed_weights_bytes"],
        "stream_in_place": r["streamed_weights_bytes"],
        "copy_floor": r["checkpoint_bytes"],
    }
    moved = {**rewritten, "stream": r["checkpoint_bytes"], "copy_floor": r["checkpoint_bytes"]}
    rows = []
    for name in names:
        walls = sorted(run[name]["wall_s"] for run in r["runs"])
        best, median = walls[0], walls[len(walls) // 2]
        loads = ", ".join(f"{run[name]['load']:.1f}" for run in r["runs"])
        rows.append(
            f"| {name} | {best:.2f} | {median:.2f} | {rewritten[name] / best / GB:.2f} "
            f"| {moved[name] / best / GB:.2f} | {loads} |"
        )
    return (
        f"# fold throughput, GPT-2-XL shape ({r['date']})\n\n"
        f"Machine: {r['cpu']}, {r['cores']} cores ({r['threads']} torch thread(s)); torch {r['torch']}, "
        f"Python {r['python']}. Shared machine: the load column is the 1-minute load average after each repeat.\n\n"
        f"Model: {r['shape']['layers']} layers, width 1600, fp32; checkpoint {r['checkpoint_bytes'] / GB:.2f} GB, "
        f"weights rewritten {r['weights_rewritten_bytes'] / GB:.2f} GB; the streamed plan took "
        f"{r['plan_s']:.1f} s (meta-device export + matcher; not in the timings).\n\n"
        "| path | best (s) | median (s) | GB/s of weights rewritten (best) | GB/s of bytes written (best) "
        "| load per repeat |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"The in-memory paths run without the global check (`verify=False`); on this program it costs "
        f"{r['global_check_s']:.2f} s on top (float64 run of the original and a run of the folded program). "
        "`copy_floor` rewrites nothing: its first rate column is the whole checkpoint read and written. "
        "The in-memory paths write nothing to disk; their second column equals the first.\n"
    )


if __name__ == "__main__":
    try:
        main()
    except TaperfxError as error:
        print(f"fold_throughput: error[{error.code}]: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
