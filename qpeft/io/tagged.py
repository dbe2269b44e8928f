"""Safetensors files that carry their own JSON description under one metadata key
(the Fisher statistics, the input Gram matrices): written atomically, and read back
with one-line errors that say which kind of file was expected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qpeft.errors import QpeftError
from qpeft.io.atomic import atomic_file


def save_tagged(path: Path, tensors: dict[str, torch.Tensor], key: str, description: Any) -> None:
    """Write `tensors` with `description` as JSON under metadata `key`, atomically."""
    with atomic_file(Path(path)) as tmp:
        body = {name: t.contiguous() for name, t in tensors.items()}
        save_file(body, str(tmp), metadata={key: json.dumps(description, sort_keys=True)})


def load_tagged(path: Path, key: str, what: str) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors, description) of a file written by `save_tagged`; `what` names the
    kind of file in the errors (e.g. "Fisher file")."""
    path = Path(path)
    if not path.is_file():
        raise QpeftError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            description = json.loads((handle.metadata() or {}).get(key, "null"))
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise QpeftError(f"cannot read the {what} {path}: {exc}") from exc
    if description is None:
        raise QpeftError(f"{path} is not a qpeft {what} (no {key} metadata)")
    return tensors, description
