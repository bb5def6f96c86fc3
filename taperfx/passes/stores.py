"""Where a graph keeps its weights: the lifted state of an ExportedProgram, or a GraphModule's attributes.

Both stores work on a copy: the graph is copied, the tables of tensors are new
dicts, and a tensor the pass writes is always a new tensor, so the input program
or module (whose state shares storage with the user's model) is never modified.
Tensors the pass does not touch stay shared with the input, as torch.export
shares them with the model.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, OutputKind, TensorArgument
from torch.fx import Node

from taperfx._compat import fake_mode_of

__all__ = ["ProgramStore", "AttributeStore", "GraphStore"]

_STATE_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def _unique_nbytes(tensors) -> int:
    seen = {
        (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors if isinstance(t, torch.Tensor)
    }
    return sum(n for _, n in seen)


def _unique_name(wanted: str, taken) -> str:
    name, i = wanted, 1
    while name in taken:
        name, i = f"{wanted}_{i}", i + 1
    return name


def _placeholders(graph: torch.fx.Graph) -> list[Node]:
    return [n for n in graph.nodes if n.op == "placeholder"]


def _renamed(spec, name: str):
    """``spec`` (an input or output spec) pointing at the node called ``name``."""
    arg = spec.arg
    if getattr(arg, "name", name) == name:
        return spec
    return dataclasses.replace(spec, arg=dataclasses.replace(arg, name=name))


class _Store:
    graph: torch.fx.Graph

    def _fake(self, value: torch.Tensor):
        mode = fake_mode_of(self.graph)
        return None if mode is None else mode.from_tensor(value, static_shapes=True)


class ProgramStore(_Store):
    """The parameters, buffers and lifted constants of a copy of an ExportedProgram."""

    def __init__(self, program: ExportedProgram) -> None:
        self.program = program
        # A copy of the graph alone (node meta copied shallowly, as Graph.__deepcopy__ does); no module
        # around it until ``result``: ExportedProgram builds its own, and generating a module's code
        # twice cost more than the graph edit at 48 layers.
        self.graph = copy.deepcopy(program.graph)
        signature = program.graph_signature
        # By position, not by name: the copy may rename a node whose name shadows a builtin (`input` -> `input_1`).
        self.specs = {
            node.name: _renamed(spec, node.name)
            for node, spec in zip(_placeholders(self.graph), signature.input_specs, strict=True)
        }
        self.state = dict(program.state_dict)
        self.constants = dict(program.constants)
        self._mutated = {s.target for s in signature.output_specs if s.kind == OutputKind.BUFFER_MUTATION}

    def _state_spec(self, node: Node) -> InputSpec | None:
        spec = self.specs.get(node.name) if node.op == "placeholder" else None
        if spec is None or spec.kind not in _STATE_KINDS or spec.target in self._mutated:
            return None
        return spec

    def _table(self, spec: InputSpec) -> dict:
        in_state = spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and spec.persistent)
        return self.state if in_state else self.constants

    def tensor(self, node: Node) -> torch.Tensor | None:
        spec = self._state_spec(node)
        return None if spec is None else self._table(spec)[spec.target]

    def target(self, node: Node) -> str:
        return self.specs[node.name].target

    def replace(self, node: Node, value: torch.Tensor) -> None:
        spec = self.specs[node.name]
        table = self._table(spec)
        old = table[spec.target]
        table[spec.target] = (
            torch.nn.Parameter(value, old.requires_grad) if isinstance(old, torch.nn.Parameter) else value
        )

    def add(self, target: str, value: torch.Tensor, like: Node) -> Node:
        """A new parameter placeholder, placed after the existing parameters as torch.export orders them."""
        target = _unique_name(target, set(self.state) | set(self.constants))
        first_other = next(
            n for n in self.graph.nodes if n.op != "placeholder" or self.specs[n.name].kind != InputKind.PARAMETER
        )
        with self.graph.inserting_before(first_other):
            node = self.graph.placeholder("p_" + target.replace(".", "_"))
        node.meta["val"] = self._fake(value)
        self.specs[node.name] = InputSpec(InputKind.PARAMETER, TensorArgument(node.name), target, None)
        self.state[target] = torch.nn.Parameter(value, requires_grad=False)
        return node

    def prune(self) -> list[str]:
        """Remove placeholders of stored tensors nothing reads; returns their targets."""
        removed = []
        for node in list(self.graph.nodes):
            spec = self._state_spec(node)
            if spec is not None and not node.users:
                self.graph.erase_node(node)
                del self.specs[node.name]
                self._table(spec).pop(spec.target, None)
                removed.append(spec.target)
        return removed

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the program holds (parameters, buffers, constants), read by the graph or not."""
        return [t for t in (*self.state.values(), *self.constants.values()) if isinstance(t, torch.Tensor)]

    def nbytes(self) -> int:
        return _unique_nbytes(self.tensors())

    def _output_specs(self) -> list:
        """The output specs, by position, pointing at whatever nodes the graph returns now (a fold may
        replace an output node, e.g. ``mm`` by ``addmm``)."""
        outputs = self.graph.output_node().args[0]
        return [
            _renamed(spec, out.name) if isinstance(out, Node) else spec
            for spec, out in zip(self.program.graph_signature.output_specs, outputs, strict=True)
        ]

    def result(self) -> ExportedProgram:
        placeholders = _placeholders(self.graph)
        signature = ExportGraphSignature(
            input_specs=[self.specs[n.name] for n in placeholders],
            output_specs=self._output_specs(),
        )
        # The input's module as the root: the copy has the same get_attr targets (the pass adds placeholders).
        return ExportedProgram(
            root=self.program.graph_module,
            graph=self.graph,
            graph_signature=signature,
            state_dict=self.state,
            range_constraints=copy.deepcopy(self.program.range_constraints),
            module_call_graph=copy.deepcopy(self.program.module_call_graph),
            example_inputs=self.program.example_inputs,
            constants=self.constants,
            verifiers=self.program.verifiers,
        )


class AttributeStore(_Store):
    """The ``get_attr`` tensors of a copy of a GraphModule (e.g. a graph with frozen parameters).

    Written tensors become new top-level attributes and the ``get_attr`` node is
    retargeted, so a submodule the copy shares with the input is never modified.
    """

    def __init__(self, module: torch.fx.GraphModule) -> None:
        self.source = module
        self.module = torch.fx.GraphModule(module, copy.deepcopy(module.graph), class_name=type(module).__name__)
        self.graph = self.module.graph

    def tensor(self, node: Node) -> torch.Tensor | None:
        if node.op != "get_attr":
            return None
        value = self._fetch(node.target)
        return value if isinstance(value, torch.Tensor) else None

    def _fetch(self, target: str):
        owner, _, field = target.rpartition(".")
        return getattr(self.module.get_submodule(owner), field, None)

    def target(self, node: Node) -> str:
        return node.target

    def _attach(self, target: str, value: torch.Tensor) -> str:
        name = _unique_name(target.replace(".", "_"), set(dir(self.module)))
        self.module.register_buffer(name, value)
        return name

    def replace(self, node: Node, value: torch.Tensor) -> None:
        node.target = self._attach(node.target, value)
        node.meta["val"] = self._fake(value)

    def add(self, target: str, value: torch.Tensor, like: Node) -> Node:
        with self.graph.inserting_before(like if like.op == "get_attr" else next(iter(self.graph.nodes))):
            node = self.graph.get_attr(self._attach(target, value))
        node.meta["val"] = self._fake(value)
        return node

    def prune(self) -> list[str]:
        """Remove ``get_attr`` nodes nothing reads, and the attributes only the copy holds."""
        removed = []
        for node in list(self.graph.nodes):
            if node.op == "get_attr" and not node.users and self.tensor(node) is not None:
                self.graph.erase_node(node)
                removed.append(node.target)
                owner, _, field = node.target.rpartition(".")
                if owner == "" or self.module.get_submodule(owner) is not self._source_owner(owner):
                    if not any(n.op == "get_attr" and n.target == node.target for n in self.graph.nodes):
                        delattr(self.module.get_submodule(owner), field)
        return removed

    def _source_owner(self, owner: str):
        try:
            return self.source.get_submodule(owner)
        except AttributeError:
            return None

    def nbytes(self) -> int:
        return _unique_nbytes(self.tensor(n) for n in self.graph.nodes if n.op == "get_attr")

    def result(self) -> torch.fx.GraphModule:
        self.graph.lint()
        self.module.recompile()
        return self.module


class GraphStore(AttributeStore):
    """The ``get_attr`` tensors of a GraphModule whose graph the caller hands over to be edited in place.

    For a graph that belongs to the pass, such as the one Inductor gives a post-grad pass: no copy is
    made. Folded tensors become new attributes of the module; attributes are never deleted (only the
    ``get_attr`` nodes nothing reads), so the tensors the module shares with the user's model stay as
    they were. ``restore_point()`` and ``restore()`` bring the graph back if a check fails.
    """

    def __init__(self, module: torch.fx.GraphModule) -> None:
        self.source = self.module = module
        self.graph = module.graph

    def restore_point(self) -> torch.fx.Graph:
        """A copy of the graph's nodes (tensors are not copied), to hand to ``restore``."""
        return copy.deepcopy(self.graph)

    def restore(self, saved: torch.fx.Graph) -> None:
        """Put the nodes of ``saved`` back in place of the graph's current ones."""
        for node in reversed(list(self.graph.nodes)):
            self.graph.erase_node(node)
        self.graph.output(self.graph.graph_copy(saved, {}))

    def result(self) -> torch.fx.GraphModule:
        self.graph.lint()
        return self.module
