"""The package layering of taperfx, checked on the source: imports go one way, private names stay private.

Data flows corpus -> train -> checkpoint -> export -> fold -> quantize -> compile/ONNX -> decode; the
packages depend on each other in this order, lowest first (docs/architecture.md says why)::

    rank 0  method     taperfx._config, _compat, errors, jsonfile, atomic, locks, kinds, norms, norm_families,
                       convert, schedule, scale_loss
    rank 1  models     reference decoders, the transformers adapter, the ModelSource protocol and both sources
    rank 2  train      data, config, loop, checkpoints        passes   the fold compiler (knows only the method)
    rank 3  hf         HF data, presets, folded save/load      quantize  weight-only quantization after the fold
    rank 4  export     compile backend, ONNX, ORT decoder, the exported program of a checkpoint
    rank 5  taperfx    the public facade (the package's __init__)
    rank 6  apps       benchmarks, evaluate, checkpoint-level folding
    rank 7  commands   the command line (cli, commands/, demo)

A module may import its own group and any group of a lower rank; groups of one rank are independent of
each other (train and passes never import one another). Every import counts: module level, inside
functions, under ``TYPE_CHECKING``, and ``importlib.import_module("taperfx....")`` with a literal name.
A new top-level package or module not listed here is an application (rank 6) until it is placed lower.

Private names: no module imports a ``_name`` from another module, nor another package's private module
(``taperfx._config`` is private to taperfx as a whole); no module reads ``obj._name`` (or ``getattr(obj,
"_name")``) where ``_name`` is a private attribute another taperfx module defines; private torch APIs
(``torch._inductor``, ``torch.utils._pytree``, ``torch.ops.aten._x``...) appear only in compat modules
(files named ``_compat.py``).
"""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "taperfx"
TESTS_ROOT = Path(__file__).resolve().parent

LAYERS: tuple[dict[str, tuple[str, ...]], ...] = (
    {
        "method": (
            "_config",
            "_compat",
            "errors",
            "jsonfile",
            "atomic",
            "locks",
            "kinds",
            "norms",
            "norm_families",
            "convert",
            "schedule",
            "scale_loss",
        )
    },
    {"models": ("models",)},
    {"train": ("train",), "passes": ("passes",)},
    {"hf": ("hf",), "quantize": ("quantize",)},
    {"export": ("export",)},
    {"facade": ("taperfx",)},
    {"apps": ("benchmarks", "evaluate", "checkpoint_fold")},
    {"commands": ("commands", "cli", "demo", "__main__")},
)
APPS_RANK = 6

# Known offenders, each fixed by the work named beside it; delete an entry when its fix is merged.
KNOWN_OFFENDERS: set[tuple[str, str, str]] = set()


# -- reading the package ----------------------------------------------------------------------
def module_name(path: Path, root: Path = PACKAGE_ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_package(root: Path = PACKAGE_ROOT) -> dict[str, tuple[Path, str]]:
    """``{module name: (file, source)}`` for every module of the package."""
    return {module_name(p, root): (p, p.read_text()) for p in sorted(root.rglob("*.py"))}


@functools.cache
def nodes(source: str) -> tuple[ast.AST, ...]:
    """Every node of ``source``'s syntax tree (parsed once, whichever rule asks)."""
    return tuple(ast.walk(ast.parse(source)))


def unit_of(module: str) -> str:
    """The layering unit of a taperfx module: its top-level package or module, or ``taperfx`` for the facade."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def group_of(unit: str) -> tuple[int, str]:
    for rank, groups in enumerate(LAYERS):
        for group, units in groups.items():
            if unit in units:
                return rank, group
    return APPS_RANK, "apps"


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def is_package(module: str, modules) -> bool:
    return any(m.startswith(module + ".") for m in modules)


# -- imports ----------------------------------------------------------------------------------
def imports_of(module: str, source: str, modules) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import in ``source``, at any depth."""
    package = module if is_package(module, modules) else module.rpartition(".")[0]
    found = []
    for node in nodes(source):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                if child in modules:  # `from taperfx import norms` imports the module taperfx.norms
                    found.append((child, None, node.lineno))
                else:
                    found.append((base, alias.name, node.lineno))
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("importlib.import_module", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.args[0].value, None, node.lineno))
    return found


def import_violations(sources: dict[str, str]) -> set[tuple[str, str, str]]:
    """Upward and sideways imports between layering units, imports of private names and modules, and cycles."""
    violations = set()
    edges: dict[str, set[str]] = defaultdict(set)
    for module, source in sources.items():
        for target, name, _ in imports_of(module, source, sources):
            if not (target == "taperfx" or target.startswith("taperfx.")):
                continue
            if name is not None and is_private(name) and target != module:
                violations.add(("private name", module, f"{target}.{name}"))
            private_parent = next(
                (".".join(target.split(".")[:i]) for i, part in enumerate(target.split(".")) if is_private(part)),
                None,
            )
            if private_parent and private_parent != "taperfx" and not module.startswith(private_parent):
                violations.add(("private module", module, target))
            mine, theirs = unit_of(module), unit_of(target)
            if mine == theirs:
                continue
            edges[mine].add(theirs)
            (my_rank, my_group), (their_rank, their_group) = group_of(mine), group_of(theirs)
            if their_rank > my_rank or (their_rank == my_rank and their_group != my_group):
                violations.add(("upward import", module, target))
    violations |= {("import cycle", " -> ".join(cycle), "") for cycle in cycles(edges)}
    return violations


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected set of units, starting at its smallest name."""
    found, seen = [], set()
    for start in sorted(edges):
        if start in seen:
            continue
        stack, visited = [(start, [start])], {start}
        while stack:
            node, path = stack.pop()
            for nxt in sorted(edges.get(node, ())):
                if nxt == start:
                    found.append(path + [start])
                    seen.update(path)
                    stack.clear()
                    break
                if nxt not in visited and nxt > start:
                    visited.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


# -- private attributes -----------------------------------------------------------------------
def private_names_defined(source: str) -> set[str]:
    """Private names a module defines: globals, class members and ``self._x`` / ``cls._x`` attributes."""
    names = set()
    for node in nodes(source):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                names.add(node.attr)
    return {n for n in names if is_private(n)}


def private_reads(module: str, source: str) -> set[str]:
    """Private attribute names ``source`` reads from something other than ``self``, ``cls`` or ``super()``."""
    read = set()
    for node in nodes(source):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                continue
            read.add(node.attr)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and is_private(node.args[1].value)
        ):
            read.add(node.args[1].value)
    return read


def attribute_violations(sources: dict[str, str]) -> set[tuple[str, str, str]]:
    defined = {module: private_names_defined(source) for module, source in sources.items()}
    violations = set()
    for module, source in sources.items():
        for name in private_reads(module, source) - defined[module]:
            if any(name in names for other, names in defined.items() if other != module):
                violations.add(("private read", module, name))
    return violations


def torch_private_violations(sources: dict[str, str], compat: set[str]) -> set[tuple[str, str, str]]:
    """Private torch modules imported, names imported from torch, or ``torch.<...>._x`` read outside compat."""
    violations = set()
    for module, source in sources.items():
        if module in compat:
            continue
        for target, name, _ in imports_of(module, source, sources):
            if target.split(".")[0] == "torch":
                if any(is_private(part) for part in target.split(".")):
                    violations.add(("private torch", module, target))
                elif name is not None and is_private(name):
                    violations.add(("private torch", module, f"{target}.{name}"))
        for node in nodes(source):
            if isinstance(node, ast.Attribute):
                chain = ast.unparse(node)
                parts = chain.split(".")
                if parts[0] == "torch" and all(p.isidentifier() for p in parts) and is_private(parts[-1]):
                    violations.add(("private torch", module, chain))
    return violations


def suite_violations(tests: dict[str, str], package: dict[str, str]) -> set[tuple[str, str, str]]:
    """Tests that import from ``conftest``, import taperfx's private names or modules, or read its private
    attributes: a test goes through the public API, and shared helpers live in ``tests/helpers/``."""
    defined = set().union(*map(private_names_defined, package.values()))
    violations = set()
    for module, source in tests.items():
        for target, name, _ in imports_of(module, source, {**tests, **package}):
            if target == "conftest":
                violations.add(("conftest import", module, target))
            if target.split(".")[0] != "taperfx":
                continue
            if any(is_private(part) for part in target.split(".")):
                violations.add(("private name", module, target))
            elif name is not None and is_private(name):
                violations.add(("private name", module, f"{target}.{name}"))
        for name in (private_reads(module, source) - private_names_defined(source)) & defined:
            violations.add(("private read", module, name))
    return violations


def package_violations() -> set[tuple[str, str, str]]:
    package = read_package()
    sources = {module: source for module, (_, source) in package.items()}
    compat = {module for module, (path, _) in package.items() if path.name == "_compat.py"}
    tests = {module_name(p, TESTS_ROOT): p.read_text() for p in sorted(TESTS_ROOT.rglob("*.py"))}
    return (
        import_violations(sources)
        | attribute_violations(sources)
        | torch_private_violations(sources, compat)
        | suite_violations(tests, sources)
    )


# -- the checks -------------------------------------------------------------------------------
def test_imports_follow_the_layers_and_names_stay_private():
    new = sorted(package_violations() - KNOWN_OFFENDERS)
    assert not new, "layering violations (see this test's docstring and docs/architecture.md):\n" + "\n".join(
        map(repr, new)
    )


def test_the_checker_finds_each_kind_of_violation():
    """The rules above on a made-up package, so that a check which cannot fail would show here."""
    sources = {
        "taperfx": "",
        "taperfx.norms": "class TaperNorm:\n    def f(self):\n        self._tapering = 1\n",
        "taperfx.passes": "",
        "taperfx.passes._compat": "from torch._guards import detect_fake_mode\n",
        "taperfx.passes.fold": "from taperfx.passes._compat import detect_fake_mode\n",
        "taperfx.train": "",
        "taperfx.train.loop": "def f(m):\n    from taperfx.hf.data import x\n    return m._tapering\n",
        "taperfx.hf": "",
        "taperfx.hf.data": "from taperfx.train.loop import _helper\nimport torch\ny = torch._dynamo.config\n",
        "taperfx.export": "",
        "taperfx.export.backend": "from taperfx.passes._compat import detect_fake_mode\n",
        "taperfx.models": "import importlib\nimportlib.import_module('taperfx.export.backend')\n",
    }
    tests = {
        "tests.test_a": "from conftest import requires_cuda\nfrom taperfx.passes._compat import detect_fake_mode\n",
        "tests.test_b": "from taperfx.train.loop import _helper\n\ndef test(norm):\n    assert norm._tapering\n",
    }
    found = (
        import_violations(sources)
        | attribute_violations(sources)
        | torch_private_violations(sources, {"taperfx.passes._compat"})
        | suite_violations(tests, sources)
    )
    assert found == {
        ("upward import", "taperfx.train.loop", "taperfx.hf.data"),  # function-local, still counted
        ("upward import", "taperfx.models", "taperfx.export.backend"),  # importlib with a literal name
        ("import cycle", "hf -> train -> hf", ""),
        ("private name", "taperfx.hf.data", "taperfx.train.loop._helper"),
        ("private module", "taperfx.export.backend", "taperfx.passes._compat"),
        ("private read", "taperfx.train.loop", "_tapering"),
        ("private torch", "taperfx.hf.data", "torch._dynamo"),
        ("conftest import", "tests.test_a", "conftest"),
        ("private name", "tests.test_a", "taperfx.passes._compat"),
        ("private name", "tests.test_b", "taperfx.train.loop._helper"),
        ("private read", "tests.test_b", "_tapering"),
    }
