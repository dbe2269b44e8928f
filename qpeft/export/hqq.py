"""`qpeft export CKPT --to hf-hqq`: a transformers directory of HQQ layers (PyPI `hqq`,
`HQQLinear`) holding qpeft's own codes, and the adapters as a peft LoRA directory.

HQQ dequantizes W = (W_q − zero) · scale with groups of g consecutive elements of the
row-major weight (`axis=1`): W_q is the (d_out·d_in / g) × g code matrix, packed along
its first dimension (HQQ's `BitPack`: 4-bit puts row block 0 of two in the high
nibble, 2-bit four blocks at shifts 6, 4, 2, 0, 3-bit ten blocks at 27, 24, … 0 of an
int32, after padding the rows to a multiple of ten), and scale and zero are one
value per group. That is qpeft's integer family (`int<b>-g<G>`, ŵ = (q − z) · s with
fp16 s and z per group of G inputs), so such a matrix is written exactly:

* with g = G where G divides d_in;
* otherwise (qpeft's last group of a row is shorter, HQQ's groups would straddle
  rows) with g the largest power of two dividing both G and d_in, each scale and
  zero repeated for its G/g sub-groups: the same values, stored with 32/g bits per
  parameter for the scales instead of 32/G.

g is halved further until HQQ's packing fills whole rows (2-bit: the groups divide by
four; 4-bit: by two), and must stay ≥ 8 (HQQ's smallest group).

Matrices of other formats (NF) are re-quantized, round-to-nearest from their
dequantized values, to the integer config nearest to them (the smallest
‖deq(Q) − deq(Q_int)‖) among those HQQ stores exactly in at most the matrix's own
bits per parameter (among the cheapest when none is that small), and that relative
error is reported per matrix, with the config written; the report gives HQQ's
stored bits per parameter.

Scale and zero are written in fp16, exact. HQQ casts them to its compute dtype (the
`dtype` the model is loaded with): fp16 and fp32 keep them exact, and in fp32 HQQ's
dequantized weight equals qpeft's bit for bit; bf16 rounds them.

transformers serialises HQQ models up to 4.57 (5.x raises "HQQ is not available
yet"): `AutoModelForCausalLM.from_pretrained(OUT, dtype=...)` with transformers 4.57
and hqq, then `PeftModel.from_pretrained(model, OUT / "adapter")`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qpeft.export.lora import write_peft_adapter
from qpeft.export.requantize import nearest_requantization
from qpeft.export.transformers_dir import (
    adapter_factors,
    config_dtype_name,
    finish_transformers_dir,
    start_transformers_dir,
    unquantized_linear,
)
from qpeft.modules import quantized_layers
from qpeft.quant import QuantConfig, QuantizedTensor
from qpeft.quant.formats.integer import CODE_BITS, MAX_GROUP, IntConfig

SMALLEST_GROUP = 8  # HQQ's BaseQuantizeConfig: group sizes are multiples of 8
PACKED_ROWS = {2: 4, 3: 10, 4: 2, 8: 1}  # code rows HQQ packs into one stored row
PACKING = {2: "2bit_u8", 3: "3bit_32", 4: "4bit_u8", 8: "8bit_u8"}
UNPACK_DTYPE = {2: torch.uint8, 3: torch.int32, 4: torch.uint8, 8: torch.uint8}


def hqq_group(config: IntConfig, shape: tuple[int, int]) -> int | None:
    """HQQ's group size g for an exact copy of an `int<b>-g<G>` matrix of `shape`, or
    None when there is none (g would fall below 8)."""
    rows, cols = shape
    group = math.gcd(config.group_size, cols)  # a power of two: G is one
    whole = 1 if config.bits == 3 else PACKED_ROWS[config.bits]  # 3-bit rows are padded
    while group >= SMALLEST_GROUP and (rows * cols // group) % whole:
        group //= 2
    return group if group >= SMALLEST_GROUP else None


def hqq_holds(config: QuantConfig, shape: tuple[int, int]) -> bool:
    """Whether HQQ stores a matrix of `config` and `shape` exactly (an integer config
    with an HQQ group size)."""
    return isinstance(config, IntConfig) and hqq_group(config, shape) is not None


def hqq_bits_per_param(bits: int, group: int) -> float:
    """HQQ's stored bits per parameter: b-bit codes and an fp16 scale and zero per group."""
    return bits + 32 / group


def hqq_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """HQQ's packing of an (n × g) code matrix along its first dimension (`BitPack`)."""
    if bits == 8:
        return codes.to(torch.uint8)
    n = codes.shape[0]
    if bits == 3:
        padded = codes.new_zeros((-(-n // 10) * 10, codes.shape[1]), dtype=torch.int32)
        padded[:n] = codes
        step = padded.shape[0] // 10
        packed = torch.zeros(step, codes.shape[1], dtype=torch.int32, device=codes.device)
        for k in range(10):
            packed |= padded[k * step : (k + 1) * step] << (27 - 3 * k)
        return packed
    per_byte = 8 // bits
    if n % per_byte:
        raise ValueError(f"{n} rows of {bits}-bit codes do not fill whole bytes")
    step, codes = n // per_byte, codes.to(torch.uint8)
    packed = torch.zeros(step, codes.shape[1], dtype=torch.uint8, device=codes.device)
    for k in range(per_byte):
        packed |= codes[k * step : (k + 1) * step] << (8 - bits * (k + 1))
    return packed


def _encoded(value: Any) -> torch.Tensor:
    """hqq's safetensors encoding of a metadata value (`encode_safetensor_type`)."""
    if isinstance(value, torch.dtype):
        value = str(value)
    if isinstance(value, bool):
        return torch.tensor(int(value), dtype=torch.uint8)
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.int32)
    if isinstance(value, str):
        return torch.tensor([ord(c) for c in value], dtype=torch.uint8)
    if isinstance(value, torch.Size | tuple):
        return torch.tensor(list(value), dtype=torch.int64)
    raise TypeError(f"no hqq encoding for {type(value).__name__}")


def weight_quant_params(bits: int, group: int) -> dict[str, Any]:
    """The `weight_quant_params` of an HQQ config that stores (not optimizes) codes."""
    return {
        "nbits": bits,
        "channel_wise": True,
        "group_size": group,
        "optimize": False,
        "round_zero": False,
        "axis": 1,
        "view_as_float": False,
    }


def hqq_state(qt: QuantizedTensor, compute_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The serialized `HQQLinear` state of an integer matrix (keys without the layer
    prefix), exactly its codes, scales and zeros. Raises ValueError when HQQ cannot
    hold it exactly (`hqq_group` is None)."""
    config = qt.config
    if not isinstance(config, IntConfig):
        raise ValueError(f"HQQ holds integer configs exactly, not {config.name}")
    rows, cols = qt.shape
    group = hqq_group(config, (rows, cols))
    if group is None:
        raise ValueError(f"HQQ has no group size for {config.name} on {cols}-wide rows")
    codes, scales, zeros = config.unpacked(qt)
    # one (scale, zero) per HQQ group: qpeft's group of each g-th column
    scales = scales.repeat_interleave(config.group_size, dim=1)[:, :cols:group].reshape(-1, 1)
    zeros = zeros.repeat_interleave(config.group_size, dim=1)[:, :cols:group].reshape(-1, 1)
    bits = config.bits
    meta = {
        "shape": torch.Size((rows, cols)),
        "packing": PACKING[bits],
        "unpack_view_dtype": UNPACK_DTYPE[bits],
        "quant_scale": False,
        "quant_zero": False,
        "compute_dtype": compute_dtype,
        "offload_meta": False,
        "encoded_state_dict": True,
        "stores_quant_config": True,
        **weight_quant_params(bits, group),
    }
    state = {"W_q": hqq_pack(codes.reshape(-1, group), bits), "scale": scales.contiguous(), "zero": zeros.contiguous()}
    return state | {key: _encoded(value) for key, value in meta.items()}


def int_candidates(shape: tuple[int, int]) -> list[tuple[IntConfig, float]]:
    """Every integer config HQQ holds exactly on `shape` (its group is G itself), with
    HQQ's stored bits per parameter."""
    out = []
    for bits in CODE_BITS:
        group = SMALLEST_GROUP
        while group <= MAX_GROUP:
            config = IntConfig(bits, group)
            if hqq_group(config, shape) == group:
                out.append((config, hqq_bits_per_param(bits, group)))
            group *= 2
    return out


def requantize(qt: QuantizedTensor) -> tuple[QuantizedTensor, float]:
    """A non-integer matrix re-quantized to the nearest integer config HQQ holds
    exactly in at most its own bits (`nearest_requantization`), and that relative error."""
    return nearest_requantization(qt, int_candidates((qt.shape[0], qt.shape[1])))


def hqq_quant_config(layers: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """config.json's HQQ `quant_config`: per linear tag (the module name without its
    layer index, as transformers' `dynamic_config`) the most common (bits, group) of
    that tag. The exact per-layer settings are in each layer's serialized state,
    which is what a pre-quantized load reads."""
    tags: dict[str, Counter] = {}
    for name, setting in layers.items():
        tag = ".".join(p for p in name.split(".") if p not in ("model", "layers") and not p.isnumeric())
        tags.setdefault(tag, Counter())[setting] += 1
    out = {}
    for tag, counts in sorted(tags.items()):
        bits, group = counts.most_common(1)[0][0]
        out[tag] = {
            "weight_quant_params": weight_quant_params(bits, group),
            "scale_quant_params": None,
            "zero_quant_params": None,
            "offload_meta": False,
        }
    return out


def export_hf_hqq(
    model: nn.Module, manifest: dict, src: Path, out: Path, final: Path, rank: int | None, dtype: torch.dtype
) -> dict[str, Any]:
    factors, adapter_errors = adapter_factors(model, rank)
    requantized: dict[str, dict[str, Any]] = {}
    settings: dict[str, tuple[int, int]] = {}
    stored_bits = params = 0
    writer = start_transformers_dir(model, src, out, dtype)  # HQQ runs the whole model in its compute dtype
    for name, layer in quantized_layers(model).items():
        qt, shape = layer.quantized, (layer.out_features, layer.in_features)
        if not hqq_holds(qt.config, shape):
            qt, error = requantize(qt)
            requantized[name] = {"from": layer.config.name, "to": qt.config.name, "rel_error": error}
        state = hqq_state(qt, dtype)
        group = int(state["group_size"])
        settings[name] = (qt.config.bits, group)
        stored_bits += hqq_bits_per_param(qt.config.bits, group) * shape[0] * shape[1]
        params += shape[0] * shape[1]
        for key, tensor in state.items():
            writer.add(f"{name}.{key}", tensor)
        if layer.bias is not None:
            writer.add(f"{name}.bias", layer.bias.to(dtype))
    finish_transformers_dir(out, writer)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {
        "quant_method": "hqq",
        "quant_config": hqq_quant_config(settings),
        "skip_modules": unquantized_linear(model),
    }
    config["torch_dtype"] = config["dtype"] = config_dtype_name(dtype)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    if factors:
        write_peft_adapter(out / "adapter", factors, str(final))
    return {
        "hqq_bits_per_param": stored_bits / params if params else 0.0,
        "hqq_layers": {name: {"nbits": b, "group_size": g} for name, (b, g) in settings.items()},
        "requantized": requantized,
        "requantized_rel_error": {name: r["rel_error"] for name, r in requantized.items()},
        "adapter_rel_error": adapter_errors,
    }
