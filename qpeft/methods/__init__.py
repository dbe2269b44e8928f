"""The registered decomposition methods of `qpeft decompose` (and of the recipes
that train on a decomposed base). A method is one package here defining its
`MethodPlugin` (`qpeft.methods.base`) and listed in `METHODS`; the CLI, the stages,
the recipes and the trainer read this registry only."""

from __future__ import annotations

from typing import Any

from torch import nn

from qpeft.errors import QpeftError
from qpeft.methods.base import ADAPTER_DTYPE, Method, MethodPlugin, Needs, Split
from qpeft.methods.lqlora import LQLoRAPlugin
from qpeft.methods.qwha import QWHAPlugin
from qpeft.methods.uniform import UniformPlugin
from qpeft.modules.adapters import LowRankAdapter

METHODS: dict[str, MethodPlugin] = {plugin.name: plugin for plugin in (LQLoRAPlugin(), QWHAPlugin(), UniformPlugin())}
DEFAULT_METHOD = "lqlora"
# every adapter kind a checkpoint can hold: the methods' and QLoRA's fresh LoRA
ADAPTERS: dict[str, type[nn.Module]] = {LowRankAdapter.kind: LowRankAdapter} | {
    plugin.adapter.kind: plugin.adapter for plugin in METHODS.values() if plugin.adapter is not None
}

__all__ = [
    "ADAPTERS",
    "ADAPTER_DTYPE",
    "DEFAULT_METHOD",
    "METHODS",
    "Method",
    "MethodPlugin",
    "Needs",
    "Split",
    "build_adapter",
    "method_plugin",
]


def build_adapter(spec: dict[str, Any] | None, in_features: int, out_features: int, device=None, dtype=None):
    """The (empty) adapter a manifest's spec describes, or None for no adapter."""
    if not spec:
        return None
    kind = spec.get("kind")
    if kind not in ADAPTERS:
        raise QpeftError(f"unknown adapter kind {kind!r} (this qpeft knows {', '.join(ADAPTERS)})")
    return ADAPTERS[kind].from_spec(spec, in_features, out_features, device, dtype)


def method_plugin(name: str, what: str = "--method") -> MethodPlugin:
    """The registered method `name`, or a one-line error listing them."""
    if name not in METHODS:
        raise QpeftError(f"{what}: unknown method {name!r} (registered: {', '.join(METHODS)})")
    return METHODS[name]


def foreign_flags(method: MethodPlugin, given: dict[str, object]) -> None:
    """Error if `given` (flag values by option name, None: not given) holds flags of
    another method than `method`."""
    for other in METHODS.values():
        names = [flag for key, flag in other.flags.items() if other is not method and given.get(key) is not None]
        if names:
            listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
            verb = "is" if len(names) == 1 else "are"
            raise QpeftError(f"{listed} {verb} for --method {other.name} only, not {method.name}")


def check_rank(method: MethodPlugin, rank: int, shapes: dict[str, tuple[int, int]], what: str) -> None:
    """Error (before any slow work) naming the matrix that cannot take `rank`; `what`
    names the flag or recipe key."""
    if not shapes:
        return
    name = min(shapes, key=lambda n: method.max_rank(shapes[n]))
    limit = method.max_rank(shapes[name])
    if rank <= limit:
        return
    rows, cols = shapes[name]
    why = method.rank_reason(rank, (rows, cols), limit)
    raise QpeftError(f"{what} {rank} is too large for {name} ({rows}×{cols}): {why}")
