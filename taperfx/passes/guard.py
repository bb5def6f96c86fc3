"""The call-path guard of a folded eager model (``fold_module(..., guard_calls=True)``).

``fold_module`` proves a fold from one traced call: on that call every folded norm
fed only the linear layers it was folded into. A forward that takes another path
(a flag that returns the hidden state after the final norm, a direct call of a
submodule) would silently compute wrong values with the norm gone. The guard makes
such paths fail loudly instead: during every call of the root module, the folded
norms and their linear layers must be called in exactly the order the trace
recorded them (each norm, then each of its linears), and nowhere else. Any other
order, a missing call, or a call outside the root's forward raises ``FoldError``
with code ``untraced_call_path``.
"""

from __future__ import annotations

from torch import nn

from taperfx.passes.reasons import SkipReason
from taperfx.passes.report import FoldError

__all__ = ["CallPath", "GuardedIdentity", "install_guard"]


class CallPath:
    """The traced order of calls of the watched modules, checked during each call of the root module."""

    def __init__(self, expected: list[str]) -> None:
        self.expected = expected
        self.position: int | None = None  # None: no root call running

    def enter(self, module, args) -> None:
        self.position = 0

    def leave(self, module, args, output) -> None:
        position, self.position = self.position, None
        if position != len(self.expected):
            missing = self.expected[position] if position is not None else self.expected[0]
            self._fail(f"the forward returned without calling {missing}, which the trace called")

    def event(self, path: str) -> None:
        if self.position is None:
            self._fail(f"{path} was called outside the folded model's forward")
        if self.position >= len(self.expected) or self.expected[self.position] != path:
            want = self.expected[self.position] if self.position < len(self.expected) else "nothing more"
            self.position = None
            self._fail(f"{path} was called where the trace called {want}")
        self.position += 1

    @staticmethod
    def _fail(what: str) -> None:
        raise FoldError(
            f"{what}: this call takes a path the fold's trace did not see, on which the folded norms are not "
            "identities. Fold with example inputs that take this path, or pass guard_calls=False if you know "
            "every path feeds each folded norm only to its linear layers",
            code=SkipReason.UNTRACED_CALL_PATH,
        )


class GuardedIdentity(nn.Module):
    """Stands where a folded norm was: the identity, reporting each call to the model's ``CallPath``.

    ``contiguous``: the forward views the norm's output (``h.view(-1, d)``), which was a fresh
    tensor; its input may be a slice no view can read, so it is handed on contiguous (free when it is).
    """

    def __init__(self, path: str, call_path: CallPath, contiguous: bool = False) -> None:
        super().__init__()
        self.path = path
        self.call_path = call_path
        self.contiguous = contiguous

    def forward(self, x):
        self.call_path.event(self.path)
        return x.contiguous() if self.contiguous else x


class _Watch:
    """A forward pre-hook reporting a watched module's call. An object, not a closure, so that
    ``copy.deepcopy`` of the model gives the copy's hooks the copy's ``CallPath`` (a closure would keep
    reporting to the original's)."""

    def __init__(self, path: str, call_path: CallPath) -> None:
        self.path = path
        self.call_path = call_path

    def __call__(self, module, args) -> None:
        self.call_path.event(self.path)


def install_guard(model: nn.Module, order: list[str], norms: dict[str, bool]) -> None:
    """Replace the ``norms`` of ``model`` (``{path: whose output the forward views}``) by ``GuardedIdentity``
    and watch calls of every module in ``order``."""
    call_path = CallPath(order)
    for path in order:
        if path in norms:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, GuardedIdentity(path, call_path, norms[path]))
        else:
            model.get_submodule(path).register_forward_pre_hook(_Watch(path, call_path))
    model.register_forward_pre_hook(call_path.enter)
    model.register_forward_hook(call_path.leave)
