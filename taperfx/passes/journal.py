"""Fold a checkpoint's shards in place, crash-safe: a journal makes a re-run finish what a crash left.

Rewriting weights inside the source shards saves a copy of the checkpoint on disk,
but a process killed midway would leave some tensors folded, one torn, and no way
to tell. The journal (``<checkpoint>/.taperfx-fold-journal/``) prevents that:

1. Before any byte of the checkpoint changes, the journal is created complete (in a
   temporary directory renamed into place): the plan, every new bias value (``b + W β``
   needs the *original* weights), and the shard of new tensors (folded copies of
   shared weights, added biases).
2. Each tensor folded in place: its original bytes go to ``backup.bin`` with their
   SHA-256 in ``backup.json`` (both synced); the tensor is rewritten through a
   writable map and synced; its key is appended to ``done.json``; the backup is
   dropped. A tensor is therefore always original, folded and listed done, or
   recoverable from a backup whose checksum proves it whole.
3. The new shard moves in, the index is rewritten, the caller's ``finish`` writes
   what else must change (the config), and the journal is removed: the fold is done.

A re-run with a journal present resumes from it (its plan, not a new one: the
checkpoint is half folded): a tensor with a backup is restored first and folded
again, done tensors are skipped. Extra disk: the new tensors and one tensor's backup.
In place never renames and never drops bytes: a dropped tensor (a folded norm's
own vectors) only leaves the index.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from taperfx.atomic import fsync, write_bytes
from taperfx.passes.fold_plan import FoldPlan
from taperfx.passes.shards import ShardReader, ShardWriter, write_index
from taperfx.passes.stream import BLOCK_ELEMENTS, Sources, fold_weight_into, new_biases
from taperfx.passes.weights import one_intra_op_thread

__all__ = ["JOURNAL_DIR", "ADDED_SHARD", "stream_fold_in_place", "has_journal"]

JOURNAL_DIR = ".taperfx-fold-journal"
ADDED_SHARD = "model-taperfx-folded-added.safetensors"
_PLAN, _BIASES, _DONE, _BACKUP, _BACKUP_META = (
    "plan.json",
    "biases.safetensors",
    "done.json",
    "backup.bin",
    "backup.json",
)


def has_journal(directory: str | os.PathLike) -> bool:
    """True when an in-place fold of ``directory`` started and did not finish."""
    return (Path(directory) / JOURNAL_DIR).is_dir()


def _check_in_place(plan: FoldPlan) -> None:
    renamed = sorted(k for k, v in plan.keys.items() if k != v)
    if renamed:
        raise ValueError(f"an in-place fold cannot rename tensors ({renamed[:4]}); write a new directory instead")


def _in_place_targets(plan: FoldPlan) -> list[str]:
    """Keys rewritten inside their own shard: weights and biases written under their source key."""
    return [w.target for w in plan.weights if w.target == w.source] + [
        b.target for b in plan.biases if b.target == b.source
    ]


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    writer = ShardWriter(path, {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
    for t in tensors.values():
        writer.write(t)
    writer.close()


def _start(plan: FoldPlan, directory: Path, journal: Path, block_elements: int) -> None:
    """Create the journal complete, from the untouched checkpoint, and commit it by one rename."""
    tmp = directory / (JOURNAL_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with ExitStack() as stack:
        sources = Sources(directory, stack)
        biases = new_biases(plan, sources, block_elements=block_elements)
        _write_tensors(tmp / _BIASES, biases)
        added = {w.target: w for w in plan.weights if w.target != w.source}
        new_bias_keys = [b.target for b in plan.biases if b.target != b.source]
        layout = {k: (sources.info(w.source).dtype, sources.info(w.source).shape) for k, w in added.items()}
        layout.update({k: (biases[k].dtype, tuple(biases[k].shape)) for k in new_bias_keys})
        writer = ShardWriter(tmp / ADDED_SHARD, layout)
        for key, spec in added.items():
            fold_weight_into(
                plan, spec, sources.view(spec.source), lambda a, rows: writer.write(rows), block_elements=block_elements
            )
        for key in new_bias_keys:
            writer.write(biases[key])
        writer.close()
    (tmp / _DONE).write_text("[]")
    write_bytes(tmp / _PLAN, plan.to_json().encode())
    tmp.rename(journal)
    fsync(directory)


def stream_fold_in_place(
    plan: FoldPlan | None,
    directory: str | os.PathLike,
    *,
    finish: Callable[[FoldPlan], None] | None = None,
    progress: bool = True,
    block_elements: int = BLOCK_ELEMENTS,
) -> FoldPlan:
    """Fold the checkpoint in ``directory`` in place by ``plan``, or resume the journal found there.

    ``plan`` may be None only to resume. ``finish(plan)`` runs after every tensor
    is written and before the journal is removed (write the config there: a crash
    before the journal is gone re-runs it). Returns the plan that was applied.
    """
    directory = Path(directory)
    journal = directory / JOURNAL_DIR
    if journal.is_dir():
        plan = FoldPlan.from_json((journal / _PLAN).read_text())
    elif plan is None:
        raise ValueError(f"{directory}: no in-place fold to resume (no {JOURNAL_DIR})")
    else:
        _check_in_place(plan)
        with one_intra_op_thread():
            _start(plan, directory, journal, block_elements)
    done = json.loads((journal / _DONE).read_text())
    weights = {w.target: w for w in plan.weights}
    targets = [k for k in _in_place_targets(plan) if k not in done]
    with ExitStack() as stack:
        stack.enter_context(one_intra_op_thread())
        sources = Sources(directory, stack, writable=True)
        biases = stack.enter_context(ShardReader(journal / _BIASES))
        bar = stack.enter_context(tqdm(total=len(targets), desc="fold in place", disable=not progress, leave=False))
        for key in targets:
            shard = sources.shard(key)
            _protect(journal, key, shard)
            view = shard.view(key)
            if key in weights:
                fold_weight_into(
                    plan,
                    weights[key],
                    view,
                    lambda a, rows: view[a : a + rows.shape[0]].copy_(rows),
                    block_elements=block_elements,
                )
            else:
                view.copy_(biases.view(key))
            shard.flush()
            done.append(key)
            write_bytes(journal / _DONE, json.dumps(done).encode())
            (journal / _BACKUP_META).unlink()
            bar.update(1)
        files = dict(sources.files)
    _publish(plan, directory, journal, files)
    if finish is not None:
        finish(plan)
    shutil.rmtree(journal)
    return plan


def _protect(journal: Path, key: str, shard: ShardReader) -> None:
    """Make ``key`` original and backed up: restore it from a whole backup, or back it up now."""
    meta_path, backup = journal / _BACKUP_META, journal / _BACKUP
    raw = shard.raw(key)
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["key"] == key:
            data = backup.read_bytes()
            if hashlib.sha256(data).hexdigest() != meta["sha256"] or len(data) != len(raw):
                raise ValueError(f"{journal}: the backup of {key} is damaged; the checkpoint cannot be recovered")
            raw[:] = data
            shard.flush()
            return
        meta_path.unlink()  # a backup of a tensor that was finished (the crash hit before it was dropped)
    write_bytes(backup, bytes(raw))
    write_bytes(meta_path, json.dumps({"key": key, "sha256": hashlib.sha256(raw).hexdigest()}).encode())


def _publish(plan: FoldPlan, directory: Path, journal: Path, files: dict[str, str]) -> None:
    """Move the shard of new tensors in and write the index of the folded checkpoint."""
    added = journal / ADDED_SHARD
    if added.is_file():
        os.replace(added, directory / ADDED_SHARD)
    new = {w.target for w in plan.weights if w.target != w.source} | {
        b.target for b in plan.biases if b.target != b.source
    }
    weight_map = {key: ADDED_SHARD if key in new else files[key] for key in plan.output_keys()}
    total = 0
    for name in set(weight_map.values()):
        with ShardReader(directory / name) as shard:
            total += sum(shard.tensors[k].nbytes for k, f in weight_map.items() if f == name)
    write_index(directory, weight_map, total)
    fsync(directory)
