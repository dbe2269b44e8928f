"""`qpeft quantize` as a library call: uniform round-to-nearest quantization of a
model's selected linear layers under one config (the QLoRA base).

Streams the source safetensors tensor by tensor: a selected weight is quantized
(on `device`) and written as its packed parts, everything else is copied. Memory
stays at one matrix plus one output shard.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import qpeft
from qpeft.io.atomic import atomic_directory
from qpeft.io.checkpoint import DEFAULT_SHARD_BYTES, ShardWriter, dtype_name, stream_model, write_manifest
from qpeft.models.resolve import copy_model_files
from qpeft.models.selection import Targets, parse_targets, targets_json, targets_text
from qpeft.models.skeleton import open_stored, resolve_targets
from qpeft.quant import QuantConfig, bits_per_param, dequantize, quantize, storage_bits
from qpeft.stages.checks import check_config_holds, check_device


def _quantize_matrix(weight: torch.Tensor, config: QuantConfig, key: str, writer: ShardWriter) -> dict[str, Any]:
    """Quantize the weight `key` (MODULE.weight), hand its parts to the writer as
    MODULE.codes etc., return its manifest entry."""
    qt = quantize(weight, config, name=key)
    module = key.removesuffix(".weight")
    for part, value in qt.tensors().items():
        writer.add(f"{module}.{part}", value)
    reference = weight.float()
    error = torch.linalg.norm(dequantize(qt) - reference) / torch.linalg.norm(reference).clamp(min=1e-30)
    return {
        "config": config.name,
        "shape": list(weight.shape),
        "bits": storage_bits(config, weight.shape) / weight.numel(),
        "rel_error": float(error),
    }


def quantize_model(
    model_dir: Path,
    out_dir: Path,
    config: QuantConfig,
    targets: Targets | None = None,
    device: str = "cpu",
    source: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    unquantized_dtype: torch.dtype | None = None,
    task: str | None = None,
) -> dict[str, Any]:
    """Write a qpeft checkpoint of `model_dir` (built as `task`'s class, by default
    config.json's) with every selected matrix under `config` (the other tensors as
    in the source, or in `unquantized_dtype`). Returns the manifest."""
    start = time.perf_counter()
    targets = resolve_targets(model_dir, targets)
    model = open_stored(model_dir, task)
    shapes = model.linear(targets)
    check_config_holds(config, shapes)
    selected = {f"{name}.weight": name for name in shapes}
    with atomic_directory(out_dir) as tmp:
        copy_model_files(model_dir, tmp, model.architecture)
        writer = ShardWriter(tmp, max_shard_bytes)
        matrices = stream_model(
            model.weights,
            writer,
            selected,
            lambda name, tensor: _quantize_matrix(tensor.to(device), config, f"{name}.weight", writer),
            "quantize",
            unquantized_dtype,
        )
        numel = sum(m["shape"][0] * m["shape"][1] for m in matrices.values())
        stored = sum(storage_bits(config, m["shape"]) for m in matrices.values())
        manifest = {
            "method": "quantize",
            "base_model": {"path": str(model_dir), "source": source or str(model_dir)},
            "task": model.task,
            "targets": targets_json(targets),
            "unquantized_dtype": dtype_name(unquantized_dtype),
            "quantized": matrices,
            "summary": {
                "matrices": len(matrices),
                "params": numel,
                "nominal_bits": bits_per_param(config),
                "bits_per_param": stored / numel,
            },
            "weight_map": writer.weight_map,
            "provenance": {
                "qpeft": qpeft.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "device": device,
                "seconds": round(time.perf_counter() - start, 2),
            },
        }
        write_manifest(tmp, manifest, writer)  # last: a directory without it is not a checkpoint
    return manifest


@dataclass
class QuantizeRequest:
    """`qpeft quantize`: every selected matrix under one config."""

    model: str | None
    out: Path
    config: str = "nf4"
    targets: str | Sequence[str] | None = None  # `--targets` text or a recipe's list; None: the family's default
    device: str = "cpu"
    unquantized_dtype: str = "source"
    task: str | None = None  # None: config.json's architectures

    def command(self) -> list[str]:
        """The `qpeft` command line that makes this request."""
        targets = ["--targets", targets_text(parse_targets(self.targets, "--targets"))] if self.targets else []
        task = ["--task", self.task] if self.task else []
        return ["quantize", self.model or "smollm2", "--config", self.config, "--out", str(self.out), *targets, *task]


def run_quantize(request: QuantizeRequest) -> dict[str, Any]:
    """Write the checkpoint; returns its manifest."""
    from qpeft.io.atomic import check_output
    from qpeft.io.checkpoint import UNQUANTIZED_DTYPES
    from qpeft.models.resolve import resolve_model
    from qpeft.quant import parse_config

    config = parse_config(request.config)
    targets = parse_targets(request.targets, "--targets")
    check_device(request.device)
    check_output(request.out)  # before the slow steps, not only when writing starts
    model_dir = resolve_model(request.model)
    return quantize_model(
        model_dir,
        request.out,
        config,
        targets,
        request.device,
        source=request.model or "smollm2",
        unquantized_dtype=UNQUANTIZED_DTYPES[request.unquantized_dtype],
        task=request.task,
    )
