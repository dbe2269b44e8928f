"""Safetensors files that carry their own JSON description under one metadata key
(the Fisher statistics, the input Gram matrices): written atomically, and read back
with one-line errors that say which kind of file was expected."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qpeft.errors import QpeftError
from qpeft.io.atomic import atomic_file

# What reading a missing, truncated or foreign safetensors file raises.
READ_ERRORS = (OSError, ValueError, SafetensorError)


def save_tagged(path: Path, tensors: dict[str, torch.Tensor], key: str, description: Any) -> None:
    """Write `tensors` with `description` as JSON under metadata `key`, atomically."""
    with atomic_file(Path(path)) as tmp:
        body = {name: t.contiguous() for name, t in tensors.items()}
        save_file(body, str(tmp), metadata={key: json.dumps(description, sort_keys=True)})


def load_tagged(path: Path, key: str, what: str, lazy: bool = False) -> tuple[Any, Any]:
    """(tensors, description) of a file written by `save_tagged`, or with `lazy`
    (tensor names, description) without reading any tensor; `what` names the kind of
    file in the errors (e.g. "Fisher file")."""
    path = Path(path)
    if not path.is_file():
        raise QpeftError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            description = json.loads((handle.metadata() or {}).get(key, "null"))
            names = list(handle.keys())
            tensors = names if lazy else {name: handle.get_tensor(name) for name in names}
    except READ_ERRORS as exc:  # json.JSONDecodeError is a ValueError
        raise QpeftError(f"cannot read the {what} {path}: {exc}") from exc
    if description is None:
        raise QpeftError(f"{path} is not a qpeft {what} (no {key} metadata)")
    return tensors, description


class FileTensors(Mapping[str, torch.Tensor]):
    """Tensors of a safetensors file under names of one's own (name → stored key),
    each read when asked for: a decomposition then holds one large statistic at a
    time (LLaMA-2-7B's Gram matrices are 44 GB in fp64), not all of them."""

    def __init__(self, path: Path, stored: dict[str, str]) -> None:
        self.path, self.stored = Path(path), stored

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read([name])[name]

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Several tensors, the file opened once."""
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                return {name: handle.get_tensor(self.stored[name]) for name in names}
        except READ_ERRORS as exc:
            raise QpeftError(f"cannot read {self.path}: {exc}") from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self.stored)

    def __len__(self) -> int:
        return len(self.stored)
