"""The ``taperfx`` command line: a table of commands, each a module of ``taperfx.commands``.

A command module defines ``add_arguments(parser)`` and ``run(args) -> int``, and may
define ``interrupted(args) -> str`` (what Ctrl-C kept and how to resume). Only the
module of the command that runs is imported, so ``taperfx --help`` does not import
torch. The entry layer turns every ``taperfx.errors.TaperfxError`` into one line
``taperfx COMMAND: error[CODE]: MESSAGE`` and its class's exit code, an ``OSError``
from the environment (permissions, disk full) into one line with exit code 3, and
Ctrl-C into exit code 130; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from dataclasses import dataclass

from taperfx import __version__
from taperfx.errors import EXIT_INTERRUPTED, TaperfxError

EXIT_IO = 3


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]  # ("export", "onnx")
    module: str
    help: str

    @property
    def name(self) -> str:
        return " ".join(self.words)


COMMANDS = (
    Command(("data", "prepare"), "taperfx.commands.data", "train a tokenizer and write memory-mapped token streams"),
    Command(("train",), "taperfx.commands.train", "train with TaperNorm to a gate-zero checkpoint"),
    Command(("plot",), "taperfx.commands.plot", "figures from the metrics of one or more runs"),
    Command(
        ("fold",), "taperfx.commands.fold", "fold a gate-zero checkpoint's norms into its weights, save the program"
    ),
    Command(("export", "onnx"), "taperfx.commands.export_onnx", "ONNX decoder with the KV cache as inputs and outputs"),
    Command(
        ("export", "hf"), "taperfx.commands.export_hf", "fold a Hugging Face model's checkpoint, save_pretrained it"
    ),
    Command(("generate",), "taperfx.commands.generate", "stream text from a checkpoint (eager, compile or ONNX)"),
    Command(("eval",), "taperfx.commands.eval", "mean held-out cross-entropy of a run, checkpoint or folded program"),
    Command(("bench", "decode"), "taperfx.commands.bench", "KV-cached decoding throughput of norm variants"),
    Command(("demo",), "taperfx.commands.demo", "the whole product on the embedded corpus, offline"),
)

GROUP_HELP = {"data": "prepare training data", "export": "write a deployable model", "bench": "benchmarks"}


def _chosen(argv: list[str]) -> Command | None:
    """The command ``argv`` names (its leading non-option words), if any."""
    words = []
    for arg in argv:
        if arg.startswith("-"):
            break
        words.append(arg)
    for command in COMMANDS:
        if tuple(words[: len(command.words)]) == command.words:
            return command
    return None


class Parser(argparse.ArgumentParser):
    """argparse's parser, with its usage errors in the one-line form of every other expected failure (exit 2);
    sub-parsers are of the same class (argparse makes them of the parent's).

    ``parse_args`` leaves the arguments no sub-parser took to the top-level parser, whose error would name
    ``taperfx`` alone; the top level refuses them in the name of the command they followed (``command``, the
    sub-parser of the command ``build_parser`` was given)."""

    command: argparse.ArgumentParser | None = None

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            (self.command or self).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error[usage]: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser, with the arguments of the command ``argv`` names (only its module is imported)."""
    parser = Parser(
        prog="taperfx",
        description="Train normalization away (TaperNorm), fold it into the weights, ship a norm-free graph.",
    )
    parser.add_argument("--version", action="version", version=f"taperfx {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen(argv)
    groups: dict[str, argparse._SubParsersAction] = {}
    for command in COMMANDS:
        first, *rest = command.words
        if rest:
            if first not in groups:
                group = top.add_parser(first, help=GROUP_HELP[first])
                groups[first] = group.add_subparsers(dest=f"{first}_command", metavar="ACTION", required=True)
            p = groups[first].add_parser(rest[0], help=command.help, description=command.help)
        else:
            p = top.add_parser(first, help=command.help, description=command.help)
        p.set_defaults(command_entry=command)
        if command == chosen:
            importlib.import_module(command.module).add_arguments(p)
            parser.command = p
    return parser


def one_line(message: str) -> str:
    """A multi-line message (a list of refused norms, a verification table) as one line: parts joined by "; "."""
    return "; ".join(part.strip().rstrip(":") for part in message.splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    command: Command | None = getattr(args, "command_entry", None)
    if command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(command.module)
    prefix = f"taperfx {command.name}"
    try:
        return int(module.run(args) or 0)
    except TaperfxError as exc:
        print(f"{prefix}: error[{exc.code}]: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.errno is None:
            raise  # not the environment's answer to a system call: a bug
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        print(f"{prefix}: error[io-{name}]: {exc}", file=sys.stderr)
        return EXIT_IO
    except KeyboardInterrupt:
        kept = module.interrupted(args) if hasattr(module, "interrupted") else "nothing to resume"
        print(f"\n{prefix}: interrupted: {kept}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
