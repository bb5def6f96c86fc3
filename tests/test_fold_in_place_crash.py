"""The in-place fold survives being killed: a re-run finishes it, equal to a fold that never crashed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from taperfx.passes.journal import JOURNAL_DIR, has_journal, stream_fold_in_place
from taperfx.passes.shards import ShardReader, checkpoint_files
from taperfx.passes.stream import stream_fold

from helpers.stream_plans import layer_plan, write_shards

D, OUT = 512, 4096  # 8 MiB fp32 weights, 12 of them

CHILD = textwrap.dedent(
    """
    import sys
    from taperfx.passes.fold_plan import FoldPlan
    from taperfx.passes.journal import stream_fold_in_place

    plan = FoldPlan.from_json(open(sys.argv[1]).read())
    stream_fold_in_place(plan, sys.argv[2], progress=False, block_elements=4096)
    """
)


def _checkpoint(directory):
    g = torch.Generator().manual_seed(0)
    tensors, layers, shards = {}, [], [{}, {}]
    for n in range(12):
        in_out = n % 3 == 1
        weight = torch.randn((D, OUT) if in_out else (OUT, D), generator=g)
        shards[n % 2][f"l{n}.weight"] = weight
        bias = f"l{n}.bias" if n % 2 == 0 else None
        if bias:
            shards[n % 2][bias] = torch.randn(OUT, generator=g)
        layers.append({"weight": f"l{n}.weight", "in_out": in_out, "centered": n % 4 != 3, "bias": bias})
    for shard in shards:
        tensors.update(shard)
    shards[0]["norm0.weight"] = torch.ones(D)  # dropped by the plan: leaves the index, keeps its bytes
    write_shards(directory, shards)
    plan = layer_plan(layers, D, g)
    rewritten = {w.source for w in plan.weights} | {b.source for b in plan.biases}
    plan.keys = {k: k for k in tensors if k not in rewritten}
    return plan


def _read_all(directory) -> dict[str, torch.Tensor]:
    out = {}
    for key, name in checkpoint_files(directory).items():
        with ShardReader(directory / name) as shard:
            out[key] = shard.view(key).clone()
    return out


@pytest.mark.slow
def test_killed_in_place_fold_completes_on_re_run(tmp_path):
    src, pristine, reference = tmp_path / "ckpt", tmp_path / "pristine", tmp_path / "reference"
    src.mkdir()
    plan = _checkpoint(src)
    shutil.copytree(src, pristine)
    reference.mkdir()
    stream_fold(plan, pristine, reference, progress=False, block_elements=4096)  # the same blocks as the child
    (tmp_path / "plan.json").write_text(plan.to_json())

    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "plan.json"), str(src)])
    journal = src / JOURNAL_DIR
    deadline = time.monotonic() + 300
    while child.poll() is None and time.monotonic() < deadline:
        # Kill while a tensor is being rewritten, after at least one was finished.
        done = journal / "done.json"
        if (journal / "backup.json").is_file() and done.is_file() and len(json.loads(done.read_text() or "[]")) >= 2:
            os.kill(child.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    child.wait()

    assert child.returncode == -signal.SIGKILL, "the fold finished before it could be killed"
    assert has_journal(src)
    finished = []
    applied = stream_fold_in_place(None, src, progress=False, finish=finished.append)

    assert applied == plan and finished == [plan] and not has_journal(src)
    got, want = _read_all(src), _read_all(reference)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key  # bit-identical to the fold that never crashed
    with pytest.raises(ValueError, match="no in-place fold to resume"):
        stream_fold_in_place(None, src, progress=False)
