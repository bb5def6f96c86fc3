"""The command line end to end on a tiny corpus: data prepare → train → plot."""

import shutil

import matplotlib.image
import pytest
import torch

from taperfx.cli import main
from taperfx.train.checkpoint import load_model
from taperfx.train.plot import plot_runs

from helpers.tiny_runs import TINY as TINY_RUN

# The loop tests' tiny run, with this file's eval cadence (later settings win).
TINY = [arg for item in (*TINY_RUN, "eval_batches=1", "eval_interval=4", "log_interval=2") for arg in ("--set", item)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["data", "prepare", "--out", str(root / "data"), "--stories", "200", "--vocab-size", "320"]) == 0
    for protocol, lam in (("baseline", "0"), ("all", "0"), ("all", "1.0")):
        out = root / f"{protocol}-{lam}"
        assert (
            main(
                [
                    "train",
                    "--data",
                    str(root / "data"),
                    "--out",
                    str(out),
                    "--protocol",
                    protocol,
                    "--scale-loss-weight",
                    lam,
                    "--steps",
                    "8",
                    *TINY,
                ]
            )
            == 0
        )
    return root


def test_train_command_writes_a_gate_zero_checkpoint(runs):
    model, meta = load_model(runs / "all-1.0")
    assert meta["protocol"] == "all" and meta["gate_zero"] and meta["train"]["scale_loss_weight"] == 1.0
    _, baseline = load_model(runs / "baseline-0")
    assert baseline["gate"] is None and not baseline["gate_zero"]


@pytest.mark.slow  # matplotlib and four figures (about 6 s)
def test_plot_writes_four_readable_figures(runs, tmp_path):
    paths = plot_runs([runs / "baseline-0", runs / "all-0", runs / "all-1.0"], tmp_path).paths
    assert sorted(p.name for p in paths) == ["grad_norms.png", "loss.png", "scale.png", "schedule.png"]
    for path in paths:
        height, width, _ = matplotlib.image.imread(path).shape
        assert width >= 900 and height >= 500


def test_cli_errors_are_one_line(runs, tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("taperfx train: error[not-found]:") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()  # refused before anything was written
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err.startswith("taperfx plot: error[not-found]:")


def test_resume_alone_continues_with_the_recorded_settings(runs, tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(runs / "data"),
        "--out",
        str(out),
        "--protocol",
        "all",
        "--steps",
        "6",
        "--set",
        "checkpoint_interval=3",
        *TINY,
    ]
    assert main(args) == 0
    first, _ = load_model(out)
    shutil.rmtree(out / "checkpoints" / "step-0000006")  # interrupted after the step-3 checkpoint
    assert main(["train", "--out", str(out), "--resume"]) == 0
    again, meta = load_model(out)
    assert meta["step"] == 6 and meta["protocol"] == "all" and meta["gate_zero"]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
