"""`qpeft export DIR --to FORMAT --out OUT`: a qpeft checkpoint for tools without qpeft.

* `hf-bnb`: OUT, a transformers directory whose config.json has a bitsandbytes
  4-bit NF4 `quantization_config` and whose quantized matrices are bitsandbytes'
  serialized NF4 state (`AutoModelForCausalLM.from_pretrained(OUT)` loads it), and
  OUT/adapter, the adapters as a peft LoRA directory (`PeftModel.from_pretrained`).
  Matrices under a config other than NF4 / blocks of 64 / 8-bit double-quantized
  scales (`nf4`) are re-quantized to it from their dequantized values with
  `--requantize` (an error without); the extra error ‖deq(Q) − deq(Q_nf4)‖ /
  ‖deq(Q)‖ is reported per matrix.
* `hf-hqq`: OUT, a transformers directory of HQQ layers holding qpeft's integer
  codes exactly (`qpeft.export.hqq`; other formats re-quantized to the nearest
  integer config, the error reported), and OUT/adapter as for hf-bnb.
* `gguf`: OUT/model.gguf and OUT/adapter.gguf for llama.cpp, GGUF block-format
  matrices as stored (`qpeft.export.gguf`; others re-quantized with `--requantize`).
* `merged`: OUT, a plain transformers model with W = deq(Q) + ΔW in `--dtype`.
* `peft`: OUT, the adapters alone as a peft LoRA directory, for a base the user holds.

`--rank R` compresses every adapter to rank ≤ R for the LoRA-form exports (a QWHA
adapter needs it: it has no factors); the error is reported. Every export is written
atomically (a killed export leaves no directory at OUT) with a report,
OUT/qpeft_export.json. Matrices are converted one at a time into shards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qpeft.errors import QpeftError
from qpeft.export.gguf import check_gguf_config, export_gguf, gguf_holds
from qpeft.export.hqq import export_hf_hqq, hqq_holds
from qpeft.export.lora import write_peft_adapter
from qpeft.export.transformers_dir import (
    adapter_factors,
    config_dtype_name,
    finish_transformers_dir,
    relative_error,
    start_transformers_dir,
    transformers4_config,
    unquantized_linear,
)
from qpeft.io.atomic import atomic_directory
from qpeft.io.checkpoint import read_manifest
from qpeft.modules import quantized_layers
from qpeft.quant import PRESETS, QuantConfig, QuantizedTensor, dequantize, quantize
from qpeft.quant.config import TORCH_DTYPES

REPORT_NAME = "qpeft_export.json"
NF4 = PRESETS["nf4"]  # bitsandbytes' NF4 with double quantization


def bnb_state(qt: QuantizedTensor, compute_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """bitsandbytes' serialized NF4 state of an `nf4` matrix (the tensors stored as
    WEIGHT, WEIGHT.absmax, WEIGHT.quant_map, ...; keys here without 'WEIGHT.')."""
    import bitsandbytes.functional as bnbf

    from qpeft.quant.codebooks import dynamic_codebook, nf_codebook

    numel, parts = qt.shape[0] * qt.shape[1], qt.parts
    layout = qt.config.layout(numel)
    nested = bnbf.QuantState(
        absmax=parts["scale_scales"].float(), code=dynamic_codebook(), blocksize=256, dtype=torch.float32
    )
    state = bnbf.QuantState(
        absmax=parts["scales"][: layout.num_blocks],
        shape=torch.Size(qt.shape),
        code=nf_codebook(4),
        blocksize=64,
        quant_type="nf4",
        dtype=compute_dtype,
        offset=parts["scale_offset"].float().reshape(()),
        state2=nested,
    )
    packed = parts["codes"][: (numel + 1) // 2].reshape(-1, 1)
    # the codebooks are cached tensors shared by every matrix: each gets its own copy
    return {"": packed, **{f".{k}": v.clone() for k, v in state.as_dict(packed=True).items()}}


def export_hf_bnb(
    model, manifest, src: Path, out: Path, final: Path, rank: int | None, dtype: torch.dtype
) -> dict[str, Any]:
    from transformers import AutoConfig, BitsAndBytesConfig

    factors, adapter_errors = adapter_factors(model, rank)
    requantized: dict[str, float] = {}
    writer = start_transformers_dir(model, src, out, None)
    for name, layer in quantized_layers(model).items():
        qt = layer.quantized
        if qt.config != NF4:
            weight = dequantize(qt)
            qt = quantize(weight, NF4)
            requantized[name] = relative_error(weight - dequantize(qt), weight)
        for suffix, tensor in bnb_state(qt, dtype).items():
            writer.add(f"{name}.weight{suffix}", tensor)
        if layer.bias is not None:
            writer.add(f"{name}.bias", layer.bias)
    finish_transformers_dir(out, writer)
    config = AutoConfig.from_pretrained(out)
    skip = unquantized_linear(model)
    config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=skip or None,
    ).to_dict()
    config.save_pretrained(out)
    if factors:
        write_peft_adapter(out / "adapter", factors, str(final))  # its base: the exported model
    return {"requantized_rel_error": requantized, "adapter_rel_error": adapter_errors}


def export_merged(
    model, manifest, src: Path, out: Path, final: Path, rank: int | None, dtype: torch.dtype
) -> dict[str, Any]:
    writer = start_transformers_dir(model, src, out, dtype)
    for name, layer in quantized_layers(model).items():
        weight = layer.dequantized_weight(torch.float32)
        if layer.adapter is not None:
            weight += layer.adapter.delta_weight(torch.float32).detach()
        writer.add(f"{name}.weight", weight.to(dtype))
        if layer.bias is not None:
            writer.add(f"{name}.bias", layer.bias.to(dtype))
    finish_transformers_dir(out, writer)
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = config_dtype_name(dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return {}


def export_peft(
    model, manifest, src: Path, out: Path, final: Path, rank: int | None, dtype: torch.dtype
) -> dict[str, Any]:
    factors, adapter_errors = adapter_factors(model, rank)
    base = manifest.get("base_model", {})
    task = manifest.get("task", "causal-lm")  # checkpoints before tasks were causal LMs
    write_peft_adapter(out, factors, base.get("source") or base.get("path") or str(src), task=task)
    return {"adapter_rel_error": adapter_errors}


# what a format checks of the checkpoint's config.json before anything is loaded
CONFIG_CHECKS = {"gguf": check_gguf_config}
EXPORTERS = {
    "hf-bnb": export_hf_bnb,
    "hf-hqq": export_hf_hqq,
    "gguf": export_gguf,
    "merged": export_merged,
    "peft": export_peft,
}


def holds_exactly(to: str, config: QuantConfig, shape: tuple[int, int]) -> bool:
    """Whether the export format `to` stores a matrix of `config` and `shape` as it is
    (the LoRA-form and merged exports hold anything)."""
    if to == "hf-bnb":
        return config == NF4
    if to == "hf-hqq":
        return hqq_holds(config, shape)
    if to == "gguf":
        return gguf_holds(config, shape)
    return True


def _check_requantization(model: nn.Module, to: str, requantize: bool) -> None:
    held_not = {
        name: layer.config.name
        for name, layer in quantized_layers(model).items()
        if not holds_exactly(to, layer.config, (layer.out_features, layer.in_features))
    }
    if held_not and not requantize:
        name, config = next(iter(held_not.items()))
        raise QpeftError(
            f"{to} cannot hold {len(held_not)} of the checkpoint's matrices as they are (e.g. {name}, {config}): "
            "pass --requantize to re-quantize them (each one's error is reported)"
        )


# hf-hqq: HQQ casts its fp16 scales and zeros to this, and fp16 keeps them exact;
# gguf: None, the unquantized tensors as they are stored
DEFAULT_DTYPES = {"hf-hqq": "fp16", "gguf": None}


def export_checkpoint(
    src: Path, to: str, out: Path, rank: int | None = None, dtype: str | None = None, requantize: bool = False
) -> dict[str, Any]:
    """Export the qpeft checkpoint `src` to `out` as `to` (`dtype` None: the format's
    default, `DEFAULT_DTYPES` or bf16); returns the report. Matrices the format cannot
    hold as they are are re-quantized with `requantize`, and are an error without."""
    from qpeft.models.loading import load_checkpoint

    if to not in EXPORTERS:
        raise QpeftError(f"unknown export format {to!r} (choose from {', '.join(EXPORTERS)})")
    if rank is not None and rank <= 0:
        raise QpeftError(f"--rank must be positive, got {rank}")
    dtype = dtype or DEFAULT_DTYPES.get(to, "bf16")
    manifest = read_manifest(src)
    if to in CONFIG_CHECKS:
        CONFIG_CHECKS[to](json.loads((src / "config.json").read_text()))
    model = load_checkpoint(src)
    _check_requantization(model, to, requantize)
    torch_dtype = TORCH_DTYPES[dtype] if dtype else None
    with atomic_directory(out) as tmp:
        report = EXPORTERS[to](model, manifest, src, tmp, Path(out).resolve(), rank, torch_dtype)
        config = tmp / "config.json"
        if config.is_file():  # readable by transformers 4 as well as 5
            config.write_text(json.dumps(transformers4_config(json.loads(config.read_text())), indent=2) + "\n")
        report = {"source": str(src), "format": to, "rank": rank, "dtype": dtype, "requantize": requantize, **report}
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    return report
