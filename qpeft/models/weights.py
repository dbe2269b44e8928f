"""Streaming access to the tensors of a safetensors model directory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qpeft.errors import QpeftError


def unshared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A model's state dict with each tied tensor once, under its first name (the
    input embedding, not lm_head: where transformers looks for it), contiguous."""
    seen, tensors = set(), {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.contiguous()
    return tensors


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class SafetensorsWeights:
    """Tensor name → shard file of a model directory; tensors are read one at a time.
    `renamed` gives a view under other names (a model class's own)."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.model_dir.glob("*.safetensors"))
            if not files:
                raise QpeftError(f"{self.model_dir}: no safetensors weights")
            self.weight_map = {}
            for file in files:
                with safe_open(str(file), framework="pt") as handle:
                    self.weight_map.update(dict.fromkeys(handle.keys(), file.name))
        self.stored_key = {key: key for key in self.weight_map}  # name here → key in the file

    def renamed(self, stored_key: dict[str, str]) -> SafetensorsWeights:
        """A view holding just the tensors `stored_key` names (new name → stored key)."""
        view = object.__new__(SafetensorsWeights)
        view.model_dir, view.stored_key = self.model_dir, dict(stored_key)
        view.weight_map = {name: self.weight_map[key] for name, key in stored_key.items()}
        return view

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, read from its shard."""
        with safe_open(str(self.model_dir / self.weight_map[key]), framework="pt") as handle:
            return handle.get_tensor(self.stored_key[key])

    def stored_dtype(self, key: str) -> torch.dtype:
        """The dtype `key` is stored in, from its shard's header (no data read)."""
        with safe_open(str(self.model_dir / self.weight_map[key]), framework="pt") as handle:
            return _SAFETENSORS_DTYPES[handle.get_slice(self.stored_key[key]).get_dtype()]

    def _by_shard(self) -> dict[str, list[str]]:
        by_shard: dict[str, list[str]] = {}
        for key, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(key)
        return by_shard

    def stream_order(self) -> list[str]:
        """Every tensor name, in the order `items` yields them."""
        return [key for keys in self._by_shard().values() for key in keys]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """All tensors, shard by shard (each shard opened once)."""
        for shard, keys in self._by_shard().items():
            with safe_open(str(self.model_dir / shard), framework="pt") as handle:
                for key in keys:
                    yield key, handle.get_tensor(self.stored_key[key])
