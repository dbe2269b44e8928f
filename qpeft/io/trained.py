"""The trained model as a qpeft checkpoint: the base's packed tensors as they were,
the trained adapters (bf16) in place of the base's, and a manifest that records the
adapters and the training run. `qpeft eval` loads it like any checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from qpeft.io.atomic import atomic_directory
from qpeft.io.checkpoint import ShardWriter, iter_shards, read_manifest, write_manifest
from qpeft.io.summary import summarise, type_table
from qpeft.methods import ADAPTER_DTYPE
from qpeft.models.resolve import copy_model_files
from qpeft.modules import quantized_layers


def save_trained(model: nn.Module, base: Path, out: Path, training: dict[str, Any]) -> dict[str, Any]:
    """Write `model` (the base checkpoint `base` with trained adapters) to `out`."""
    manifest = read_manifest(base)
    layers = quantized_layers(model)
    with atomic_directory(out) as tmp:
        copy_model_files(base, tmp)
        writer = ShardWriter(tmp)
        for _, tensors in iter_shards(base, manifest):
            for key, tensor in tensors.items():
                if ".adapter." not in key:
                    writer.add(key, tensor)
        matrices = manifest["quantized"]
        for name, entry in matrices.items():
            adapter = layers[name].adapter
            state = {} if adapter is None else adapter.state_dict()
            for part, tensor in state.items():
                writer.add(f"{name}.adapter.{part}", tensor.to(ADAPTER_DTYPE) if tensor.is_floating_point() else tensor)
            entry["adapter"] = None if adapter is None else adapter.spec()
            entry["adapter_bits"] = sum(
                8 * t.numel() * (ADAPTER_DTYPE.itemsize if t.is_floating_point() else t.element_size())
                for t in state.values()
            )
            entry["adapter_params"] = sum(t.numel() for t in state.values() if t.is_floating_point())
            if adapter is not None and adapter.spec()["kind"] == "lowrank":
                entry["rank"] = adapter.rank
        writer.flush()
        manifest |= {
            "summary": summarise(matrices) | {"budget": manifest["summary"].get("budget")},
            "by_type": type_table(matrices),
            "weight_map": writer.weight_map,
            "training": training | {"base": str(base), "written": time.strftime("%Y-%m-%dT%H:%M:%S")},
        }
        write_manifest(tmp, manifest, writer)
    return manifest
