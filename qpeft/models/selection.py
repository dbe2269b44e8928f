"""Which linear layers get quantized: a list of name patterns.

A pattern matches a module when it equals the module name's last component
(``q_proj``) or, as a shell glob, the full dotted name (``model.layers.*.mlp.*``).
Only `nn.Linear` modules are selected, so it works on any architecture built from
them; embeddings and lm_head are left alone unless a pattern names them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from qpeft.errors import QpeftError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def matches(name: str, patterns: Sequence[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(p == leaf or fnmatch.fnmatchcase(name, p) for p in patterns)


def parse_targets(text: str | None, what: str) -> tuple[str, ...]:
    """Comma-separated patterns; None means the default set, and an empty list is an
    error (`what` names the flag or recipe key in it)."""
    if text is None:
        return DEFAULT_TARGETS
    patterns = tuple(t.strip() for t in text.split(",") if t.strip())
    if not patterns:
        raise QpeftError(f"{what} is empty: name layers (e.g. q_proj,v_proj), or leave it out for the default set")
    return patterns


def select_linear(model: nn.Module, patterns: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Names of the `nn.Linear` modules of `model` that match `patterns`, in module order."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    selected = [name for name in linear if matches(name, patterns)]
    if not selected:
        raise QpeftError(
            f"no linear layer matches the patterns {list(patterns)} (a pattern is a module's last name, e.g. "
            f"q_proj, or a glob of its full name); this model's include {', '.join(linear[:5])}"
        )
    return selected
