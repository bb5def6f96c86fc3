"""Outputs checked before the work, generate's flags, fold's report (issue 14, classes 4, 5, 6, 8, 11)."""

from __future__ import annotations

import warnings

import pytest
import torch

from taperfx.cli import main
from taperfx.commands.fold import describe
from taperfx.passes import FoldReport
from taperfx.train.checkpoint import save_checkpoint


def error_code(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err.split("error[", 1)[1].split("]", 1)[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, make_decoder):
    root = tmp_path_factory.mktemp("run")
    tokenizer = root / "tokenizer.txt"  # not .model: fold -o X.pt2 records a stand-in's bytes, not pieces
    tokenizer.write_bytes(b"stand-in")
    model = make_decoder("llama", "internal", gate=0.0)
    return save_checkpoint(root, 1, model, {"model": model.config.to_dict(), "protocol": "internal"}, tokenizer)


def test_output_paths_are_checked_before_the_source_is_read(tmp_path, capsys):
    """The source does not exist: an output error proves the output was checked first."""
    missing = tmp_path / "no-checkpoint"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    (tmp_path / "dir.pt2").mkdir()
    cases = [
        (["fold", missing, "-o", tmp_path / "dir.pt2"], "output-is-directory"),
        (["fold", missing, "-o", a_file / "sub" / "out.pt2"], "output-under-file"),
        (["fold", missing, "-o", "/proc/taperfx-out.pt2"], "output-not-writable"),
        (["export", "onnx", missing, "-o", a_file], "output-is-file"),
        (["export", "onnx", missing, "-o", a_file / "onnx"], "output-under-file"),
        (["export", "hf", missing, "--out", tmp_path], "output-exists"),
        (["train", "--data", missing, "--out", a_file], "output-is-file"),
        (["data", "prepare", "--out", a_file / "data"], "output-under-file"),
    ]
    for argv, code in cases:
        assert main(list(map(str, argv))) in (2, 3), argv
        assert error_code(capsys) == code, argv


@pytest.mark.parametrize(
    "flags, code",
    [
        (["--onnx", "model.onnx", "--backend", "eager"], "onnx-needs-onnx-backend"),
        (["--top-k", "5"], "top-k-greedy"),
        (["--temperature", "inf"], "bad-temperature"),
        (["--temperature", "nan"], "bad-temperature"),
        (["--temperature", "-1"], "bad-temperature"),
        (["--temperature", "1", "--top-k", "0"], "bad-top-k"),
        (["--max-new-tokens", "0"], "bad-max-new-tokens"),
    ],
)
def test_generate_refuses_settings_it_would_ignore(tmp_path, capsys, flags, code):
    assert main(["generate", str(tmp_path / "no-checkpoint"), "--prompt", "x", *flags]) == 2
    assert error_code(capsys) == code


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible; the refusal cannot be reached")
@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["eval"]])
def test_a_cuda_device_torch_cannot_see_is_refused_before_loading(tmp_path, capsys, command):
    assert main([command[0], str(tmp_path / "no-checkpoint"), *command[1:], "--device", "cuda"]) == 2
    assert error_code(capsys) == "no-cuda"


def test_unknown_device_names_and_old_opsets_are_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(tmp_path), "--prompt", "x", "--device", "tpu"])
    assert exit_info.value.code == 2
    capsys.readouterr()
    assert main(["export", "onnx", str(tmp_path / "missing"), "-o", str(tmp_path / "o"), "--opset", "11"]) == 2
    assert error_code(capsys) == "bad-opset"


def test_an_onnx_file_alone_selects_the_onnx_backend():
    from argparse import Namespace

    from taperfx.commands.generate import check_sampling

    args = Namespace(onnx="model.onnx", backend=None, temperature=0.0, top_k=None, max_new_tokens=None, program=None)
    check_sampling(args)
    assert args.backend == "onnx"


def test_generate_names_a_file_that_is_not_onnx(tmp_path, capsys):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"PK\x03\x04 this is a zip archive, not an ONNX protobuf")
    assert main(["generate", str(tmp_path / "no-checkpoint"), "--prompt", "x", "--onnx", str(fake)]) == 3
    assert error_code(capsys) == "not-onnx"


@pytest.mark.slow  # exports and verifies a model
def test_fold_reports_verification_units_and_no_torch_warning(checkpoint, tmp_path, capsys):
    out = tmp_path / "folded.pt2"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fold", str(checkpoint), "-o", str(out)]) == 0
    assert not [w for w in caught if ".pt2" in str(w.message)]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("folded 4 norm(s), kept 1;") and " KiB" in lines[0]
    assert lines[-2].startswith("verification: passed;")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded.pt2"]
    program = torch.export.load(out)
    assert program.example_inputs is not None


def test_fold_says_adds_when_untying_costs_memory():
    text = describe(FoldReport(bytes_before=2**20, bytes_after=3 * 2**20))
    assert "(adds 2.00 MiB: untied copies)" in text and "-2.00" not in text
    text = describe(FoldReport(bytes_before=3 * 2**20, bytes_after=2**20))
    assert "(saves 2.00 MiB)" in text
