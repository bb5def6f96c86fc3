"""Two-process data-parallel training on CPU (gloo): every rank freezes the same c and s*."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import taperfx
from taperfx.train.config import load_config
from taperfx.train.loop import Trainer
from taperfx.train.prepare import prepare_data

pytestmark = pytest.mark.slow  # two training processes (about 20 s)

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, data_dir: str, out: str, results: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    config = load_config(
        None,
        [
            f"data={json.dumps(data_dir)}",
            f"out={json.dumps(out)}",
            "protocol='all'",
            "scale_loss_weight=1.0",
            "steps=8",
            "taper_start=3",
            "calibration_steps=3",  # far shorter than a tapered run from scratch may be by default
            "model.dim=32",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.max_seq_len=32",
            "batch_size=4",
            "eval_batches=1",
            "eval_interval=8",
            "checkpoint_interval=8",
            "progress=false",
        ],
    )
    trainer = Trainer(config)
    first_batch = trainer.train_stream.sample(4, torch.Generator().set_state(trainer.data_rng.get_state()))[0]
    trainer.run()
    torch.save(
        {
            "c": torch.stack([m.c for m in taperfx.tapernorms(trainer.model)]),
            "target": trainer.anchor.target.clone(),
            "weights": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "first_batch": first_batch,
        },
        os.path.join(results, f"rank{rank}.pt"),
    )


def _spawn_ranks(*args, attempts: int = 3) -> None:
    """``mp.spawn`` the ranks on a free port; again on a new one if another process took it between the probe
    and rank 0's bind (the one race a probed port has), and only then."""
    for attempt in range(attempts):
        try:
            mp.spawn(_rank, args=(_free_port(), *args), nprocs=WORLD)
            return
        except mp.ProcessRaisedException as exc:
            if "address already in use" not in str(exc).lower() or attempt == attempts - 1:
                raise


def test_two_ranks_freeze_identical_calibration(tmp_path):
    data_dir = prepare_data(tmp_path / "data", n_stories=200, vocab_size=320)
    _spawn_ranks(str(data_dir), str(tmp_path / "run"), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))

    assert not torch.equal(r0["first_batch"], r1["first_batch"])  # each rank calibrates on its own data...
    assert torch.equal(r0["c"], r1["c"])  # ...and the reduced statistics give one c
    assert not torch.equal(r0["c"], torch.ones_like(r0["c"]))
    assert torch.equal(r0["target"], r1["target"]) and r0["target"] > 0
    for name, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][name]), name
    assert (tmp_path / "run" / "checkpoints" / "step-0000008").is_dir()
