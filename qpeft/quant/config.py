"""Blockwise NormalFloat quantization configs and their exact storage cost.

A config is (b, B0, b0, B1, b1) in LQ-LoRA's notation (Guo et al. 2024, §3.2):
code bits b, first-level block size B0, bits b0 of the quantized block scales,
second-level block size B1 and the dtype of the second-level scales (b1 bits).
Storage per parameter is b + b0/B0 + b1/(B0·B1); without double quantization the
block scales are kept in `scale_dtype` and the cost is b + bits(scale_dtype)/B0.

String form, used by the CLI and manifests:

    nf4-b64-s8x256-fp32   NF4 codes, B0=64, 8-bit scales in blocks of 256, fp32 level-2
    nf4-b64-fp16          NF4 codes, B0=64, fp16 scales (no double quantization)

Presets: ``nf4`` (QLoRA's 4.127 bits, bitsandbytes' NF4 + double quant), ``nf3``,
``nf2`` and ``nf8`` (the same scale scheme under 3-, 2- and 8-bit codes).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from qpeft.errors import QpeftError
from qpeft.quant.packing import group_shape

CODE_BITS = (2, 3, 4, 8)
SCALE_BITS = (2, 3, 4, 8)
SCALE_DTYPE_BITS = {"fp16": 16, "bf16": 16, "fp32": 32}
MAX_BLOCK = 4096

_PATTERN = re.compile(r"^nf(?P<b>\d+)-b(?P<B0>\d+)(?:-s(?P<b0>\d+)x(?P<B1>\d+))?-(?P<dtype>fp16|bf16|fp32)$")


@dataclass(frozen=True)
class QuantConfig:
    """How one matrix is quantized; see the module docstring for the notation."""

    bits: int = 4
    block_size: int = 64
    scale_bits: int | None = 8
    scale_block_size: int | None = 256
    scale_dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.bits not in CODE_BITS:
            raise QpeftError(f"code bits must be one of {CODE_BITS}, got {self.bits}")
        _check_block("block size", self.block_size, minimum=8)
        if self.scale_dtype not in SCALE_DTYPE_BITS:
            raise QpeftError(f"scale dtype must be one of {tuple(SCALE_DTYPE_BITS)}, got {self.scale_dtype!r}")
        if (self.scale_bits is None) != (self.scale_block_size is None):
            raise QpeftError("scale bits and scale block size must be given together (or neither)")
        if self.scale_bits is not None:
            if self.scale_bits not in SCALE_BITS:
                raise QpeftError(f"scale bits must be one of {SCALE_BITS}, got {self.scale_bits}")
            _check_block("scale block size", self.scale_block_size, minimum=8)

    @property
    def double_quant(self) -> bool:
        return self.scale_bits is not None

    @property
    def name(self) -> str:
        head = f"nf{self.bits}-b{self.block_size}"
        if self.double_quant:
            head += f"-s{self.scale_bits}x{self.scale_block_size}"
        return f"{head}-{self.scale_dtype}"

    def __str__(self) -> str:
        return self.name

    @property
    def bits_per_param(self) -> float:
        return bits_per_param(self)


def _check_block(what: str, size: int | None, minimum: int) -> None:
    # Powers of two keep every block byte-aligned for every code width (3-bit codes
    # pack 8 to 3 bytes), which both the packer and GPU kernels rely on.
    if size is None or size < minimum or size > MAX_BLOCK or size & (size - 1):
        raise QpeftError(f"{what} must be a power of two from {minimum} to {MAX_BLOCK}, got {size}")


PRESETS: dict[str, QuantConfig] = {
    f"nf{b}": QuantConfig(bits=b, block_size=64, scale_bits=8, scale_block_size=256, scale_dtype="fp32")
    for b in (2, 3, 4, 8)
}


def parse_config(text: str) -> QuantConfig:
    """Parse a preset name or the string form (inverse of `QuantConfig.name`)."""
    key = text.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    match = _PATTERN.match(key)
    if not match:
        raise QpeftError(
            f"unknown quantization config {text!r}: use a preset ({', '.join(PRESETS)}) "
            "or the form nf<b>-b<B0>[-s<b0>x<B1>]-<fp16|bf16|fp32>, e.g. nf4-b64-s8x256-fp32"
        )
    groups = match.groupdict()
    return QuantConfig(
        bits=int(groups["b"]),
        block_size=int(groups["B0"]),
        scale_bits=int(groups["b0"]) if groups["b0"] else None,
        scale_block_size=int(groups["B1"]) if groups["B1"] else None,
        scale_dtype=groups["dtype"],
    )


def bits_per_param(config: QuantConfig) -> float:
    """Asymptotic storage in bits per parameter: b + b0/B0 + b1/(B0·B1)
    (double quantization) or b + bits(scale dtype)/B0 (plain scales).

    Exact for matrices whose size divides B0·B1; `storage_bits` gives the exact cost
    of a given size, padding and the per-matrix scale offset included."""
    scale_dtype_bits = SCALE_DTYPE_BITS[config.scale_dtype]
    if not config.double_quant:
        return config.bits + scale_dtype_bits / config.block_size
    return (
        config.bits
        + config.scale_bits / config.block_size
        + scale_dtype_bits / (config.block_size * config.scale_block_size)
    )


@dataclass(frozen=True)
class StorageLayout:
    """Element counts of every stored part of one quantized matrix."""

    numel: int  # real elements
    padded_numel: int  # codes stored (multiple of B0)
    num_blocks: int  # first-level scales
    padded_num_blocks: int  # quantized scales stored (whole bytes of packed scale codes)
    num_scale_blocks: int  # second-level scales (0 without double quant)

    @property
    def padding(self) -> int:
        return self.padded_numel - self.numel


def storage_layout(config: QuantConfig, numel: int) -> StorageLayout:
    if numel <= 0:
        raise QpeftError(f"cannot quantize an empty tensor (numel={numel})")
    num_blocks = math.ceil(numel / config.block_size)
    if config.double_quant:
        num_scale_blocks = math.ceil(num_blocks / config.scale_block_size)
        # only whole packing groups are needed (8 codes for 3-bit scales), not whole B1 blocks
        group, _ = group_shape(config.scale_bits)
        padded_num_blocks = math.ceil(num_blocks / group) * group
    else:
        num_scale_blocks = 0
        padded_num_blocks = num_blocks
    return StorageLayout(numel, num_blocks * config.block_size, num_blocks, padded_num_blocks, num_scale_blocks)


OFFSET_BITS = 32  # one fp32 scale offset per double-quantized matrix


def storage_bits(config: QuantConfig, numel: int) -> int:
    """Exact bits stored for a matrix of `numel` elements: packed codes (padding
    included), quantized or plain scales, second-level scales and the scale offset."""
    layout = storage_layout(config, numel)
    scale_dtype_bits = SCALE_DTYPE_BITS[config.scale_dtype]
    bits = layout.padded_numel * config.bits
    if config.double_quant:
        bits += layout.padded_num_blocks * config.scale_bits
        bits += layout.num_scale_blocks * scale_dtype_bits + OFFSET_BITS
    else:
        bits += layout.num_blocks * scale_dtype_bits
    return bits
