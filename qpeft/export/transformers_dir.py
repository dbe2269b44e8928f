"""What the transformers-directory exports share: the model's other tensors and files,
the shard index, and the adapters in LoRA form."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qpeft.export.lora import LoraFactors, lora_factors
from qpeft.io.checkpoint import ShardWriter
from qpeft.models.resolve import copy_model_files
from qpeft.models.weights import unshared_state
from qpeft.modules import quantized_layers


def relative_error(diff: torch.Tensor, reference: torch.Tensor) -> float:
    """‖diff‖ / ‖reference‖ (Frobenius; ‖diff‖ when the reference is zero)."""
    return float(torch.linalg.norm(diff)) / (float(torch.linalg.norm(reference)) or 1.0)


def adapter_factors(model: nn.Module, rank: int | None) -> tuple[dict[str, LoraFactors], dict[str, float]]:
    """Every adapter of `model` as LoRA factors of rank ≤ `rank`, and each one's relative error."""
    factors = {}
    for name, layer in quantized_layers(model).items():
        if layer.adapter is not None:
            factors[name] = lora_factors(layer.adapter, rank)
    return factors, {name: f.rel_error for name, f in factors.items()}


def start_transformers_dir(model: nn.Module, src: Path, out: Path, dtype: torch.dtype | None) -> ShardWriter:
    """Config and tokenizer files in `out` (not qpeft's own), and a shard writer that
    holds the model's tensors other than the quantized layers' (tied ones once;
    floating ones cast to `dtype` unless None)."""
    copy_model_files(src, out)
    for name in ("qpeft_manifest.json", "cost_table.json"):
        (out / name).unlink(missing_ok=True)
    writer = ShardWriter(out)
    skip = tuple(f"{name}." for name in quantized_layers(model))
    for name, tensor in unshared_state(model).items():
        if not name.startswith(skip):
            writer.add(name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)
    return writer


def unquantized_linear(model: nn.Module) -> list[str]:
    """The model's nn.Linear layers left unquantized (a runtime's skip list)."""
    quantized = set(quantized_layers(model))
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]


def config_dtype_name(dtype: torch.dtype) -> str:
    """config.json's name of `dtype` ("bfloat16", "float16", "float32")."""
    return str(dtype).removeprefix("torch.")


def finish_transformers_dir(out: Path, writer: ShardWriter) -> None:
    """Write the last shard and the shard index."""
    writer.flush()
    index = {"metadata": {}, "weight_map": writer.weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def transformers4_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as transformers 4.57 reads it too: transformers 5 keeps RoPE's
    settings in `rope_parameters`, 4.x in `rope_theta` and `rope_scaling` (without
    them it would run RoPE at θ = 10000)."""
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", scaling)
    return config
