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


def select_linear(model: nn.Module, patterns: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Names of the `nn.Linear` modules of `model` that match `patterns`, in module order."""
    selected = [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and matches(name, patterns)
    ]
    if not selected:
        raise QpeftError(f"no linear layer matches the patterns {list(patterns)}")
    return selected
