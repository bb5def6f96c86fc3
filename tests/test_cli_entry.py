"""The entry layer: lazy command modules, one-line errors with codes and exit codes, tracebacks for bugs."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import taperfx
from taperfx import cli
from taperfx.errors import EXIT_INTERRUPTED, BadInput, DataError, Locked, TaperfxError, WriteFailed

HEAVY = ("torch", "onnx", "onnxruntime", "matplotlib", "numpy", "sentencepiece", "transformers")


def test_help_imports_no_heavy_module():
    """`taperfx --help` and every `taperfx COMMAND --help` build their parser without torch, onnx or matplotlib."""
    script = f"""
import sys
from taperfx.cli import COMMANDS, main
for argv in [["--help"], *[[*c.words, "--help"] for c in COMMANDS]]:
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code == 0, argv
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(taperfx.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m_runs_the_same_command_line(tmp_path):
    """``python -m taperfx`` is the ``taperfx`` script: same parser, same one-line errors and exit codes."""
    env = {**os.environ, "PYTHONPATH": str(Path(taperfx.__file__).parents[1])}
    run = [sys.executable, "-m", "taperfx"]
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, env=env)
    missing = subprocess.run([*run, "eval", str(tmp_path / "nothing")], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout.split() == ["taperfx", taperfx.__version__]
    assert missing.returncode == 2 and "error[not-found]" in missing.stderr and "Traceback" not in missing.stderr


def test_every_command_module_defines_its_arguments_and_run():
    import importlib

    for command in cli.COMMANDS:
        module = importlib.import_module(command.module)
        assert callable(module.add_arguments) and callable(module.run), command.name


def test_bench_backends_match_the_benchmark():
    from taperfx.benchmarks.decode import BACKENDS
    from taperfx.commands.bench import BACKENDS as CLI_BACKENDS

    assert sorted(CLI_BACKENDS) == sorted(BACKENDS)


@pytest.mark.parametrize(
    "argv, prog",
    [
        (["train", "--bogus", "1"], "taperfx train"),
        (["eval", "ckpt", "surplus"], "taperfx eval"),
        (["export", "onnx", "ckpt", "-o", "out", "--bogus"], "taperfx export onnx"),
        (["--bogus", "train"], "taperfx"),  # before any command: the top-level parser's
    ],
)
def test_an_unrecognised_argument_is_the_named_commands_usage_error(capsys, argv, prog):
    """argparse left arguments no parser took to the top-level parser: ``taperfx: error[usage]``."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error[usage]: ")
    assert err.endswith(f"(see {prog} --help)\n")


@pytest.mark.parametrize(
    "error, exit_code, code",
    [
        (BadInput("x", code="config-type"), 2, "config-type"),
        (DataError("x"), 3, "bad-data"),
        (DataError("norms stay:\n  a: real\n  b: shared\n"), 3, "bad-data"),  # one line all the same
        (WriteFailed("x"), 3, "write-failed"),
        (Locked("x"), 4, "locked"),
        (PermissionError(errno.EACCES, "Permission denied", "/somewhere"), 3, "io-EACCES"),
    ],
)
def test_expected_failures_are_one_line_with_a_code(monkeypatch, capsys, tmp_path, error, exit_code, code):
    from taperfx.commands import plot

    def fail(args):
        raise error

    monkeypatch.setattr(plot, "run", fail)
    assert cli.main(["plot", str(tmp_path)]) == exit_code
    err = capsys.readouterr().err
    assert err.startswith(f"taperfx plot: error[{code}]: ") and err.count("\n") == 1 and err.endswith("\n")


def test_bugs_keep_their_traceback(monkeypatch, tmp_path):
    from taperfx.commands import plot

    def bug(args):
        raise RuntimeError("an internal torch error")

    monkeypatch.setattr(plot, "run", bug)
    with pytest.raises(RuntimeError):
        cli.main(["plot", str(tmp_path)])


def test_ctrl_c_exits_130(monkeypatch, capsys, tmp_path):
    from taperfx.commands import plot

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(plot, "run", interrupted)
    assert cli.main(["plot", str(tmp_path)]) == EXIT_INTERRUPTED == 130
    assert "Traceback" not in capsys.readouterr().err


def test_error_classes_are_also_the_builtin_exceptions():
    """Library callers that catch ValueError / FileNotFoundError / OSError keep working."""
    from taperfx.errors import InputNotFound, OutputNotWritable

    assert issubclass(BadInput, ValueError) and issubclass(DataError, ValueError)
    assert issubclass(InputNotFound, FileNotFoundError) and issubclass(OutputNotWritable, OSError)
    assert all(issubclass(c, TaperfxError) for c in (BadInput, DataError, InputNotFound, Locked, WriteFailed))
    assert str(InputNotFound("no such file")) == "no such file"


def test_lazy_package_keeps_the_public_names():
    import taperfx.convert  # noqa: F401  (the submodule import must not shadow the function)

    assert callable(taperfx.convert) and taperfx.convert.__name__ == "convert"
    assert set(taperfx.__all__) <= set(dir(taperfx))
    with pytest.raises(AttributeError):
        taperfx.no_such_name  # noqa: B018


def test_atomic_writes_replace_whole_and_leave_nothing_on_failure(tmp_path):
    from taperfx.atomic import atomic_dir, atomic_path, write_text

    old = os.umask(0o027)
    try:
        write_text(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("1")
            os.chmod(d / "x", 0o600)  # as safetensors leaves its files
        with pytest.raises(ZeroDivisionError), atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            1 / 0
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").read_text() == "{}" and (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d" / "x").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "d"]
