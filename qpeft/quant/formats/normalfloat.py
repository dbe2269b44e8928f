"""NormalFloat: blockwise absmax NF codes with double-quantized scales (QLoRA §3,
LQ-LoRA §3.2), bitsandbytes-exact for `nf4`.

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

The flattened matrix is cut into blocks of B0 values (the last one zero-padded);
each block is divided by its absmax and every value is mapped to the nearest NF
level (QLoRA §3). The block absmaxes are then quantized themselves ("double
quantization", QLoRA §3):

* b0 = 8: bitsandbytes' scheme. Subtract the mean absmax, split into blocks of B1,
  divide each block by its absmax and round to the signed 8-bit dynamic map. With
  NF4/B0=64/B1=256/fp32 this is bit for bit `bitsandbytes.functional.quantize_4bit(
  compress_statistics=True, quant_type="nf4")`.
* b0 < 8: LQ-LoRA's reference scheme. Subtract the minimum absmax, split into blocks
  of B1 and round (absmax - min) / blockmax to b0-bit unsigned uniform levels, which
  spends every level on the non-negative range that the shifted scales occupy.

In both cases the per-block second-level scale is kept in `scale_dtype` and the
offset (mean or minimum) in fp32. The forward multiplies each code's level by the
dequantized scale s. With 8-bit scales (or none) the codes are chosen against the
exact fp32 block absmax m, as bitsandbytes does: s is within about 1% of m. With
2–4-bit scales s can be far from m, and the codes are chosen against s itself
(nearest level of x / s, clipped to ±1), as LQ-LoRA's reference code and GPTQ do
(`NFConfig.codes_follow_scales`, docs/DECOMPOSE.md).

Everything is torch ops (CPU or CUDA) working through the matrix in chunks of
blocks, so a 28672×8192 matrix never needs more than a chunk of fp32 temporaries
beside its input and output.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from qpeft.errors import QpeftError
from qpeft.quant.codebooks import dynamic_codebook, nearest_level, nf_codebook, uniform_codebook
from qpeft.quant.config import SCALE_DTYPE_BITS, TORCH_DTYPES, QuantConfig, Shape, chunk_for
from qpeft.quant.packing import decode_lut, group_shape, pack_codes, packed_numel, unpack_codes
from qpeft.quant.tensor import QuantizedTensor

CODE_BITS = (2, 3, 4, 8)
SCALE_BITS = (2, 3, 4, 8)
MAX_BLOCK = 4096
OFFSET_BITS = 32  # one fp32 scale offset per double-quantized matrix

# Elements per chunk of `simulate` and `normalized_blocks`, the quantizer of the
# LQ-LoRA searches: its ~10 passes then stay in a core's L2 cache (1 MiB here). Alone
# on a 1536x576 matrix up to 2.2x faster than whole-matrix passes (16 Ki and 128 Ki
# chunks were slower); within the SmolLM2 cost table 0.96-0.97x its time (1 thread,
# 2-core EPYC VM, interleaved A/B, together with nearest_level's dense-part change).
SEARCH_CHUNK = 1 << 16

_PATTERN = re.compile(r"^nf(?P<b>\d+)-b(?P<B0>\d+)(?:-s(?P<b0>\d+)x(?P<B1>\d+))?-(?P<dtype>fp16|bf16|fp32)$")


def _check_block(what: str, size: int | None, minimum: int) -> None:
    # Powers of two keep every block byte-aligned for every code width (3-bit codes
    # pack 8 to 3 bytes), which both the packer and GPU kernels rely on.
    if size is None or size < minimum or size > MAX_BLOCK or size & (size - 1):
        raise QpeftError(f"{what} must be a power of two from {minimum} to {MAX_BLOCK}, got {size}")


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


@dataclass(frozen=True)
class NFConfig(QuantConfig):
    """How one matrix is quantized; see the module docstring for the notation."""

    family: ClassVar[str] = "nf"
    syntax: ClassVar[str] = "nf<b>-b<B0>[-s<b0>x<B1>]-<fp16|bf16|fp32>, e.g. nf4-b64-s8x256-fp32"

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

    @classmethod
    def parse(cls, text: str) -> NFConfig | None:
        match = _PATTERN.match(text)
        if not match:
            return None
        groups = match.groupdict()
        return cls(
            bits=int(groups["b"]),
            block_size=int(groups["B0"]),
            scale_bits=int(groups["b0"]) if groups["b0"] else None,
            scale_block_size=int(groups["B1"]) if groups["B1"] else None,
            scale_dtype=groups["dtype"],
        )

    @property
    def double_quant(self) -> bool:
        return self.scale_bits is not None

    @property
    def codes_follow_scales(self) -> bool:
        """Whether codes are chosen against the stored block scale s (x / s) instead
        of the exact block absmax m (x / m, bitsandbytes' order). True for 2–4-bit
        scales: coding against m then costs up to 14× the squared error on Gaussian
        weights (median 1.12× over the 324 such configs of LQ-LoRA's grid; 1.24× for
        nf3-b64-s2x256, 2.43× for nf4-b16-s2x256; tools/code_scale_errors.py),
        because every level is off by the block's factor s/m. 8-bit dynamic scales
        keep m's codes (bitsandbytes-exact)."""
        return self.double_quant and self.scale_bits < 8

    @property
    def name(self) -> str:
        head = f"nf{self.bits}-b{self.block_size}"
        if self.double_quant:
            head += f"-s{self.scale_bits}x{self.scale_block_size}"
        return f"{head}-{self.scale_dtype}"

    @property
    def bits_per_param(self) -> float:
        """Asymptotic storage in bits per parameter: b + b0/B0 + b1/(B0·B1)
        (double quantization) or b + bits(scale dtype)/B0 (plain scales).

        Exact for matrices whose size divides B0·B1; `storage_bits` gives the exact
        cost of a given size, padding and the per-matrix scale offset included."""
        scale_dtype_bits = SCALE_DTYPE_BITS[self.scale_dtype]
        if not self.double_quant:
            return self.bits + scale_dtype_bits / self.block_size
        return (
            self.bits + self.scale_bits / self.block_size + scale_dtype_bits / (self.block_size * self.scale_block_size)
        )

    def layout(self, numel: int) -> StorageLayout:
        if numel <= 0:
            raise QpeftError(f"cannot quantize an empty tensor (numel={numel})")
        num_blocks = math.ceil(numel / self.block_size)
        if self.double_quant:
            num_scale_blocks = math.ceil(num_blocks / self.scale_block_size)
            # only whole packing groups are needed (8 codes for 3-bit scales), not whole B1 blocks
            group, _ = group_shape(self.scale_bits)
            padded_num_blocks = math.ceil(num_blocks / group) * group
        else:
            num_scale_blocks = 0
            padded_num_blocks = num_blocks
        return StorageLayout(numel, num_blocks * self.block_size, num_blocks, padded_num_blocks, num_scale_blocks)

    def storage_bits(self, shape: Shape) -> int:
        """Exact bits stored: packed codes (padding included), quantized or plain
        scales, second-level scales and the scale offset."""
        layout = self.layout(math.prod(shape))
        scale_dtype_bits = SCALE_DTYPE_BITS[self.scale_dtype]
        bits = layout.padded_numel * self.bits
        if self.double_quant:
            bits += layout.padded_num_blocks * self.scale_bits
            bits += layout.num_scale_blocks * scale_dtype_bits + OFFSET_BITS
        else:
            bits += layout.num_blocks * scale_dtype_bits
        return bits

    def part_specs(self, shape: Shape) -> dict[str, tuple[torch.dtype, int]]:
        """codes: uint8, the b-bit codes of `padded_numel` values, packed.
        scales: double quant: uint8 packed b0-bit scale codes; otherwise the block
        absmaxes in `scale_dtype`. scale_scales (double quant): second-level scales
        (`scale_dtype`). scale_offset (double quant): fp32 offset added back to the
        scales, shape [1]."""
        layout = self.layout(math.prod(shape))
        specs = {"codes": (torch.uint8, packed_numel(layout.padded_numel, self.bits))}
        if self.double_quant:
            specs["scales"] = (torch.uint8, packed_numel(layout.padded_num_blocks, self.scale_bits))
            specs["scale_scales"] = (TORCH_DTYPES[self.scale_dtype], layout.num_scale_blocks)
            specs["scale_offset"] = (torch.float32, 1)
        else:
            specs["scales"] = (TORCH_DTYPES[self.scale_dtype], layout.num_blocks)
        return specs

    def quantize(self, weight: torch.Tensor, chunk: int | None = None, name: str = "tensor") -> QuantizedTensor:
        return quantize(weight, self, chunk, name)

    def dequantize(
        self, qt: QuantizedTensor, dtype: torch.dtype = torch.float32, chunk: int | None = None
    ) -> torch.Tensor:
        return dequantize(qt, dtype, chunk)

    def simulate(self, weight: torch.Tensor) -> torch.Tensor:
        return simulate(weight, self)

    def column_grid(self, weight: torch.Tensor) -> NFColumnGrid:
        return NFColumnGrid(weight, self)

    @property
    def codes_key(self) -> Hashable:
        # configs of one (b, B0) share the blocks and their exact absmaxes, and those
        # that code against the absmax also share the codes (NormalizedBlocks)
        return ("nf", self.bits, self.block_size)

    def shared_levels(self, weight: torch.Tensor) -> NormalizedBlocks:
        return NormalizedBlocks(*normalized_blocks(weight, self.bits, self.block_size))

    @property
    def group_order(self) -> tuple[int, ...]:
        return (self.bits, -self.block_size)

    @property
    def fit_key(self) -> Hashable:
        # configs that differ only in the second-level scale dtype share a fit (costs.py)
        return (self.scale_bits, self.scale_block_size) if self.double_quant else self

    @property
    def fit_order(self) -> int:
        return int(self.scale_dtype != "fp16")


def nf_lqlora_grid() -> list[NFConfig]:
    """LQ-LoRA's grid (§3.2): b ∈ {2,3,4,8}, b0 ∈ {2,3,4,8}, b1 ∈ {bf16, fp16, fp32},
    B0 ∈ {16,32,64}, B1 ∈ {16,64,256}: 432 configs from 2.032 to 8.625 bits/param."""
    return [
        NFConfig(bits, block, scale_bits, scale_block, dtype)
        for bits in (2, 3, 4, 8)
        for scale_bits in (2, 3, 4, 8)
        for dtype in ("bf16", "fp16", "fp32")
        for block in (16, 32, 64)
        for scale_block in (16, 64, 256)
    ]


NFConfig.presets = {f"nf{b}": NFConfig(bits=b, block_size=64, scale_bits=8, scale_block_size=256) for b in CODE_BITS}
NFConfig.grids = {"lqlora": nf_lqlora_grid(), "nf": list(NFConfig.presets.values())}


def _chunks(num_blocks: int, block_size: int, chunk: int) -> Iterator[tuple[int, int]]:
    step = max(1, chunk // block_size)
    for start in range(0, num_blocks, step):
        yield start, min(num_blocks, start + step)


def _byte_range(start_block: int, end_block: int, config: NFConfig) -> slice:
    """Bytes of the packed codes that hold blocks [start, end). Blocks are powers of
    two of at least 8 values, so they always fill whole packing groups."""
    group_codes, group_bytes = group_shape(config.bits)
    lo, hi = start_block * config.block_size, end_block * config.block_size
    return slice(lo // group_codes * group_bytes, hi // group_codes * group_bytes)


def _block_view(flat: torch.Tensor, start_block: int, end_block: int, block_size: int, numel: int) -> torch.Tensor:
    """Blocks [start, end) of the flattened input as fp32 (start, B0), zero-padded."""
    lo, hi = start_block * block_size, end_block * block_size
    piece = flat[lo : min(hi, numel)].to(torch.float32)
    if hi > numel:
        piece = torch.nn.functional.pad(piece, (0, hi - numel))
    return piece.reshape(-1, block_size)


def quantize(weight: torch.Tensor, config: NFConfig, chunk: int | None = None, name: str = "tensor") -> QuantizedTensor:
    """Quantize `weight` (any float dtype, CPU or CUDA) under `config`; `name` is
    what error messages call it."""
    if not weight.is_floating_point():
        raise QpeftError(f"can only quantize floating-point tensors, {name} is {weight.dtype}")
    flat = weight.detach().reshape(-1)
    layout = config.layout(flat.numel())
    device = weight.device
    codebook = nf_codebook(config.bits, device)
    absmax = torch.empty(layout.num_blocks, dtype=torch.float32, device=device)
    codes = torch.empty(packed_numel(layout.padded_numel, config.bits), dtype=torch.uint8, device=device)
    chunks = list(_chunks(layout.num_blocks, config.block_size, chunk_for(weight.device, chunk)))
    for start, end in chunks:
        absmax[start:end] = _block_view(flat, start, end, config.block_size, layout.numel).abs().amax(dim=1)
    # amax propagates NaN, so one check covers every value (one device sync)
    if not torch.isfinite(absmax).all():
        raise QpeftError(f"{name} contains NaN or Inf values")
    divisor = simulated_scales(absmax, config) if config.codes_follow_scales else absmax
    for start, end in chunks:
        blocks = _block_view(flat, start, end, config.block_size, layout.numel)
        # x * (1/absmax), clamped: the exact arithmetic of bitsandbytes' quantizer (b0 = 8)
        scaled = torch.clamp(blocks * (1.0 / divisor[start:end].clamp(min=1e-38)).unsqueeze(1), -1, 1)
        chunk_codes = nearest_level(scaled.reshape(-1), codebook)
        codes[_byte_range(start, end, config)] = pack_codes(chunk_codes, config.bits)
    return _with_scales(config, tuple(weight.shape), codes, absmax)


def _with_scales(
    config: NFConfig, shape: tuple[int, ...], packed_codes: torch.Tensor, absmax: torch.Tensor
) -> QuantizedTensor:
    """The stored form of packed codes and their exact block absmaxes: the scales
    double-quantized, or rounded to `scale_dtype`."""
    if not config.double_quant:
        return QuantizedTensor(
            config, shape, {"codes": packed_codes, "scales": absmax.to(TORCH_DTYPES[config.scale_dtype])}
        )
    layout = config.layout(math.prod(shape))
    scale_codes, scale_scales, offset = _quantize_scales(absmax, config)
    packed_scales = pack_codes(scale_codes[: layout.padded_num_blocks], config.scale_bits)
    parts = {"codes": packed_codes, "scales": packed_scales, "scale_scales": scale_scales, "scale_offset": offset}
    return QuantizedTensor(config, shape, parts)


def pack_quantized(
    codes: torch.Tensor, absmax: torch.Tensor, config: NFConfig, shape: tuple[int, ...]
) -> QuantizedTensor:
    """The stored form of codes chosen elsewhere (e.g. by error-feedback rounding):
    `codes` holds one codebook index per element (`shape`), `absmax` the exact fp32
    absmax of each block, from which the scales are made as `quantize` makes them.
    Padding codes are those of zero, as `quantize` writes them."""
    layout = config.layout(math.prod(shape))
    if codes.numel() != layout.numel or absmax.numel() != layout.num_blocks:
        raise QpeftError(f"{codes.numel()} codes and {absmax.numel()} scales do not fit {config.name} on {shape}")
    zero = nearest_level(codes.new_zeros(1, dtype=torch.float32), nf_codebook(config.bits, codes.device))
    padded = torch.cat([codes.reshape(-1).to(torch.int32), zero.expand(layout.padding)])
    return _with_scales(config, tuple(shape), pack_codes(padded, config.bits), absmax.float())


def _scale_codebook(config: NFConfig, device: torch.device) -> torch.Tensor:
    if config.scale_bits == 8:
        return dynamic_codebook(device)
    return uniform_codebook(config.scale_bits, device)


def _quantize_scales(absmax: torch.Tensor, config: NFConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpacked b0-bit scale codes (int32, one per block, padded to whole scale
    blocks), the second-level scales in `scale_dtype` and the fp32 offset."""
    signed = config.scale_bits == 8
    offset = absmax.mean() if signed else absmax.min()
    num_scale_blocks = -(-absmax.numel() // config.scale_block_size)
    centred = torch.nn.functional.pad(absmax - offset, (0, num_scale_blocks * config.scale_block_size - absmax.numel()))
    blocks = centred.reshape(-1, config.scale_block_size)
    block_max = blocks.abs().amax(dim=1)
    # Round the second-level scale to its storage dtype first, so that the codes are
    # chosen against the value the dequantizer will use (a no-op for fp32).
    block_max = block_max.to(TORCH_DTYPES[config.scale_dtype])
    normed = blocks * (1.0 / block_max.float().clamp(min=1e-38)).unsqueeze(1)
    normed = torch.clamp(normed, -1 if signed else 0, 1).reshape(-1)
    codes = nearest_level(normed, _scale_codebook(config, absmax.device))
    return codes, block_max, offset.reshape(1).to(torch.float32)


def _scale_values(
    codes: torch.Tensor, scale_scales: torch.Tensor, offset: torch.Tensor, config: NFConfig, num_blocks: int
) -> torch.Tensor:
    """fp32 block scales from unpacked scale codes: level · second-level scale + offset."""
    values = _scale_codebook(config, codes.device).index_select(0, codes[:num_blocks].to(torch.int32))
    whole = scale_scales.numel() * config.scale_block_size
    values = torch.nn.functional.pad(values, (0, whole - num_blocks)).view(-1, config.scale_block_size)
    # code · level-2 scale, then + offset: the same two fp32 roundings as bitsandbytes
    values.mul_(scale_scales.to(torch.float32).unsqueeze(1))
    return values.view(-1)[:num_blocks].add_(offset)


def simulated_scales(absmax: torch.Tensor, config: NFConfig) -> torch.Tensor:
    """The fp32 scales the dequantizer would use for blocks with these exact
    absmaxes: double-quantized, or rounded to `scale_dtype`."""
    if not config.double_quant:
        return absmax.to(TORCH_DTYPES[config.scale_dtype]).to(torch.float32)
    codes, scale_scales, offset = _quantize_scales(absmax, config)
    return _scale_values(codes, scale_scales, offset, config, absmax.numel())


def dequantize_scales(qt: QuantizedTensor) -> torch.Tensor:
    """The fp32 block scales that the dequantizer multiplies by (one per block)."""
    config = qt.config
    if not config.double_quant:
        return qt.parts["scales"].to(torch.float32)
    num_blocks, parts = config.layout(qt.numel).num_blocks, qt.parts
    return _scale_values(
        unpack_codes(parts["scales"], config.scale_bits),
        parts["scale_scales"],
        parts["scale_offset"],
        config,
        num_blocks,
    )


def absmax_blocks(weight: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The flattened fp32 input cut into zero-padded blocks (n, B0) and its exact block
    absmaxes (n)."""
    flat = weight.detach().reshape(-1)
    numel = flat.numel()
    blocks = _block_view(flat, 0, -(-numel // block_size), block_size, numel)
    return blocks, blocks.abs().amax(dim=1)


def finite_absmax_blocks(weight: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`absmax_blocks`, with an error if the input holds NaN or Inf values (amax
    propagates them, so the absmaxes cover every value)."""
    blocks, absmax = absmax_blocks(weight, block_size)
    if not torch.isfinite(absmax).all():
        raise QpeftError("cannot quantize a tensor with NaN or Inf values")
    return blocks, absmax


def _block_levels(
    blocks: torch.Tensor, divisor: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None = None
) -> torch.Tensor:
    """codebook[nearest(clamp(x / divisor, -1, 1))] of every value (n, B0), times its
    block's scale where `scales` are given, worked through in `SEARCH_CHUNK`s. The
    divisor is the block's exact absmax, or its stored scale (`codes_follow_scales`)."""
    inverse = 1.0 / divisor.clamp(min=1e-38)
    out = torch.empty_like(blocks)
    for start, end in _chunks(blocks.shape[0], blocks.shape[1], SEARCH_CHUNK):
        scaled = torch.clamp(blocks[start:end] * inverse[start:end].unsqueeze(1), -1, 1)
        levels = out[start:end]
        torch.index_select(codebook, 0, nearest_level(scaled.view(-1), codebook), out=levels.view(-1))
        if scales is not None:
            levels.mul_(scales[start:end].unsqueeze(1))
    return out


def normalized_blocks(
    weight: torch.Tensor, bits: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flattened fp32 input cut into zero-padded blocks (n, B0), its exact block
    absmaxes (n) and the chosen codebook level of every value (n, B0): everything a
    config with these code bits and block size shares, whatever its scale format."""
    blocks, absmax = absmax_blocks(weight, block_size)
    return blocks, absmax, _block_levels(blocks, absmax, nf_codebook(bits, blocks.device))


def simulate(weight: torch.Tensor, config: NFConfig) -> torch.Tensor:
    """dequantize(quantize(weight, config)) in fp32, bit for bit, without packing:
    the fast path for searches that only need the quantized values."""
    blocks, absmax = finite_absmax_blocks(weight, config.block_size)
    codebook = nf_codebook(config.bits, blocks.device)
    scales = simulated_scales(absmax, config)
    divisor = scales if config.codes_follow_scales else absmax
    return _block_levels(blocks, divisor, codebook, scales).view(-1)[: weight.numel()].view(weight.shape)


def scaled_levels(levels: torch.Tensor, absmax: torch.Tensor, config: NFConfig, shape: torch.Size) -> torch.Tensor:
    """The levels that `normalized_blocks` chose against the exact absmaxes, times
    `config`'s scales: `simulate` for a config with those code bits and block size
    that codes against the absmax; `levels` is left unchanged."""
    values = (levels * simulated_scales(absmax, config).unsqueeze(1)).view(-1)
    return values[: shape.numel()].view(shape)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32, chunk: int | None = None) -> torch.Tensor:
    """Dequantize to a tensor of `qt.shape` in `dtype` (computed in fp32, then cast),
    in torch ops. (`qpeft.kernels.dequantize` sends matrices in bitsandbytes' own NF4
    format to its compiled kernels: the same bits, faster.)"""
    config = qt.config
    layout = config.layout(qt.numel)
    device = qt.device
    scales = dequantize_scales(qt)
    codebook = nf_codebook(config.bits, device)
    lut = decode_lut(codebook, config.bits)
    out = torch.empty(layout.numel, dtype=dtype, device=device)
    for start, end in _chunks(layout.num_blocks, config.block_size, chunk_for(device, chunk)):
        lo, hi = start * config.block_size, end * config.block_size
        packed = qt.parts["codes"][_byte_range(start, end, config)]
        # one gather per byte from a 256-entry table; int32 indices avoid an int64 copy
        if lut is not None:
            values = lut.index_select(0, packed.to(torch.int32)).view(torch.float32).view(-1, config.block_size)
        else:
            values = codebook.index_select(0, unpack_codes(packed, config.bits).to(torch.int32))
            values = values.reshape(-1, config.block_size)
        block = values.mul_(scales[start:end].unsqueeze(1)).reshape(-1)
        stop = min(hi, layout.numel)
        out[lo:stop] = block[: stop - lo]
    return out.reshape(qt.shape)


class NormalizedBlocks:
    """`SharedLevels` of the NF configs with one (b, B0): the input's blocks, their
    exact absmaxes and every value's level chosen against them.

    A config that codes against the absmax differs from the others only by its
    scales. With e = x − m·v (m the exact absmax, v the chosen level) and d = m − s,
    its error on block k with scales s is E_k + 2·d_k·G_k + d_k²·C_k, where
    E = Σ w·e², G = Σ w·e·v, C = Σ w·v²: priced in O(blocks). A config whose codes
    follow its scales (`codes_follow_scales`) chooses its own levels against s: one
    pass over the values each."""

    def __init__(self, blocks: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor) -> None:
        self.blocks, self.absmax, self.levels = blocks, absmax, levels

    def _padded(self, weights: torch.Tensor) -> torch.Tensor:
        flat = weights.reshape(-1)
        return torch.nn.functional.pad(flat, (0, self.blocks.numel() - flat.numel())).view_as(self.blocks)

    def _own_levels(self, config: NFConfig) -> torch.Tensor:
        """s·codebook[nearest(x / s)] of every value (n, B0), s the config's scales."""
        scales = simulated_scales(self.absmax, config)
        return _block_levels(self.blocks, scales, nf_codebook(config.bits, self.blocks.device), scales)

    def errors(self, configs: Sequence[NFConfig], weights: torch.Tensor | None) -> list[float]:
        blocks, absmax, levels = self.blocks, self.absmax, self.levels
        w = None if weights is None else self._padded(weights)
        diff = blocks - levels * absmax.unsqueeze(1)
        weighted_levels, weighted_diff = (levels, diff) if w is None else (levels * w, diff * w)
        exact = (weighted_diff * diff).sum(dim=1).double()
        cross = (weighted_diff * levels).sum(dim=1).double()
        level_mass = (weighted_levels * levels).sum(dim=1).double()
        errors = []
        for config in configs:
            if config.codes_follow_scales:
                own = (blocks - self._own_levels(config)).square_()
                errors.append(float((own if w is None else own.mul_(w)).sum(dim=1).double().sum()))
                continue
            gap = (absmax - simulated_scales(absmax, config)).double()
            errors.append(float((exact + gap * (2 * cross + gap * level_mass)).sum()))
        return errors

    def values(self, config: NFConfig, shape: torch.Size) -> torch.Tensor:
        if config.codes_follow_scales:
            return self._own_levels(config).view(-1)[: shape.numel()].view(shape)
        return scaled_levels(self.levels, self.absmax, config, shape)


class NFColumnGrid:
    """The NF grid of one matrix for GPTQ: every element's scale is its block's
    (double-quantized) scale from the input's exact block absmaxes, and a value rounds
    to the nearest level of x / scale, clipped to ±1."""

    def __init__(self, weight: torch.Tensor, config: NFConfig) -> None:
        rows, cols = weight.shape
        self.config, self.shape = config, (rows, cols)
        _, self.absmax = finite_absmax_blocks(weight, config.block_size)  # the scales round-to-nearest would use
        scales = simulated_scales(self.absmax, config).repeat_interleave(config.block_size)[: rows * cols]
        scales = scales.view(rows, cols)
        inverse = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
        # columns as contiguous rows of the transposed copies
        self.scales_t, self.inverse_t = scales.T.contiguous(), inverse.T.contiguous()
        self.codebook = nf_codebook(config.bits, weight.device)
        # bucketize on the midpoints: nearest_level's codes (ties go down) in one op per column
        self.midpoints = (self.codebook[:-1] + self.codebook[1:]) / 2

    def round(self, column: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        code = torch.bucketize(torch.clamp(column * self.inverse_t[j], -1, 1), self.midpoints, out_int32=True)
        return code, self.codebook[code] * self.scales_t[j]

    def pack(self, codes: torch.Tensor) -> QuantizedTensor:
        return pack_quantized(codes, self.absmax, self.config, self.shape)
