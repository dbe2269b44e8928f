"""Loading models for inference: plain HF models and qpeft checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from qpeft.errors import QpeftError
from qpeft.io.checkpoint import is_checkpoint, iter_shards, read_manifest
from qpeft.methods import build_adapter
from qpeft.models.resolve import resolve_model
from qpeft.models.skeleton import TASKS, build_skeleton, model_task
from qpeft.modules import QuantLinear
from qpeft.quant import parse_config


def locate(spec: str | None) -> Path:
    """The directory behind MODEL_OR_CHECKPOINT: a qpeft checkpoint as it is, anything
    else resolved to a safetensors model directory (both hold the tokenizer)."""
    if spec is not None and is_checkpoint(Path(spec)):
        read_manifest(Path(spec))  # a damaged manifest or a missing file: one line, before any loading
        return Path(spec)
    return resolve_model(spec)


def load_model(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """Load a located model directory or qpeft checkpoint for inference (eval mode),
    as the class of its task (`qpeft.models.skeleton.model_task`)."""
    if is_checkpoint(path):
        return load_checkpoint(path, dtype, device)
    import transformers

    auto_class = getattr(transformers, TASKS[model_task(path)])
    return auto_class.from_pretrained(path, dtype=dtype).to(device).eval()


def load_checkpoint(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """Rebuild a quantized model from a qpeft checkpoint, one shard at a time."""
    manifest = read_manifest(path)
    model = build_skeleton(path, dtype)
    quantized: dict[str, Any] = manifest["quantized"]
    quantized_parts: set[str] = set()
    for name, entry in quantized.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise QpeftError(f"checkpoint {path}: {name} is not a linear layer of this model")
        module = QuantLinear(
            linear.in_features,
            linear.out_features,
            parse_config(entry["config"]),
            linear.bias is not None,
            "meta",
            dtype,
            build_adapter(entry.get("adapter"), linear.in_features, linear.out_features, "meta", dtype),
        )
        model.set_submodule(name, module)
        quantized_parts.update(f"{name}.{part}" for part in module.part_names)
    for shard, tensors in iter_shards(path, manifest, device):
        for key, tensor in tensors.items():
            if key not in quantized_parts and tensor.is_floating_point():
                tensors[key] = tensor.to(dtype)
        result = model.load_state_dict(tensors, strict=False, assign=True)
        if result.unexpected_keys:
            raise QpeftError(
                f"checkpoint {path}: {shard} holds tensors this model does not have: {result.unexpected_keys[:3]}"
            )
    model.tie_weights()
    missing = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise QpeftError(f"checkpoint {path} is missing tensors: {missing[:3]}")
    return model.to(device).eval()
