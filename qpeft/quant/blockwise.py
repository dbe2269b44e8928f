"""Blockwise absmax NormalFloat quantization with double-quantized scales.

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
offset (mean or minimum) in fp32. Codes are chosen against the exact fp32 block
absmax, as bitsandbytes does; the dequantized scale is what the forward uses.

Everything is torch ops (CPU or CUDA) working through the matrix in chunks of
blocks, so a 28672×8192 matrix never needs more than a chunk of fp32 temporaries
beside its input and output.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from qpeft.errors import QpeftError
from qpeft.quant.codebooks import dynamic_codebook, nearest_level, nf_codebook, uniform_codebook
from qpeft.quant.config import QuantConfig, storage_layout
from qpeft.quant.packing import decode_lut, group_shape, pack_codes, packed_numel, unpack_codes

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Elements per chunk of work: 1 Mi values, 4 MiB per fp32 temporary. Measured on
# 2 CPU cores (4096x4096 bf16): faster than 256 Ki or 8 Mi chunks (cache-resident).
DEFAULT_CHUNK = 1 << 20
# Elements per chunk of `simulate` and `normalized_blocks`, the quantizer of the
# LQ-LoRA searches: its ~10 passes then stay in a core's L2 cache (1 MiB here). Alone
# on a 1536x576 matrix up to 2.2x faster than whole-matrix passes (16 Ki and 128 Ki
# chunks were slower); within the SmolLM2 cost table 0.96-0.97x its time (1 thread,
# 2-core EPYC VM, interleaved A/B, together with nearest_level's dense-part change).
SEARCH_CHUNK = 1 << 16


PART_NAMES = ("codes", "scales", "scale_scales", "scale_offset")


def part_specs(config: QuantConfig, numel: int) -> dict[str, tuple[torch.dtype, int]]:
    """(dtype, number of values) of every stored part of a matrix of `numel` values."""
    layout = storage_layout(config, numel)
    specs = {"codes": (torch.uint8, packed_numel(layout.padded_numel, config.bits))}
    if config.double_quant:
        specs["scales"] = (torch.uint8, packed_numel(layout.padded_num_blocks, config.scale_bits))
        specs["scale_scales"] = (TORCH_DTYPES[config.scale_dtype], layout.num_scale_blocks)
        specs["scale_offset"] = (torch.float32, 1)
    else:
        specs["scales"] = (TORCH_DTYPES[config.scale_dtype], layout.num_blocks)
    return specs


@dataclass
class QuantizedTensor:
    """Packed storage of one quantized matrix.

    codes:        uint8, the b-bit codes of `padded_numel` values, packed.
    scales:       double quant: uint8 packed b0-bit scale codes;
                  otherwise the block absmaxes in `scale_dtype`.
    scale_scales: double quant only: second-level scales (`scale_dtype`).
    scale_offset: double quant only: fp32 offset added back to the scales, shape [1].
    """

    config: QuantConfig
    shape: tuple[int, ...]
    codes: torch.Tensor
    scales: torch.Tensor
    scale_scales: torch.Tensor | None = None
    scale_offset: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by suffix (for checkpoints)."""
        out = {"codes": self.codes, "scales": self.scales}
        if self.config.double_quant:
            out["scale_scales"] = self.scale_scales
            out["scale_offset"] = self.scale_offset
        return out

    @classmethod
    def from_tensors(
        cls, config: QuantConfig, shape: tuple[int, ...], tensors: dict[str, torch.Tensor]
    ) -> QuantizedTensor:
        """Rebuild from `tensors()` output, checking every part's dtype and size."""
        qt = cls(config, tuple(shape), *(tensors.get(name) for name in PART_NAMES))
        qt.validate()
        return qt

    def validate(self) -> None:
        """Check that every stored tensor has the size the config and shape imply."""
        stored = self.tensors()
        for key, (dtype, numel) in part_specs(self.config, self.numel).items():
            tensor = stored.get(key)
            if tensor is None or tensor.dtype != dtype or tensor.numel() != numel:
                got = "missing" if tensor is None else f"{tensor.dtype} with {tensor.numel()} values"
                raise QpeftError(f"quantized tensor part {key!r} should be {dtype} with {numel} values, got {got}")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return QuantizedTensor.from_tensors(
            self.config, self.shape, {k: v.to(device) for k, v in self.tensors().items()}
        )


def _chunks(num_blocks: int, block_size: int, chunk: int) -> Iterator[tuple[int, int]]:
    step = max(1, chunk // block_size)
    for start in range(0, num_blocks, step):
        yield start, min(num_blocks, start + step)


def _byte_range(start_block: int, end_block: int, config: QuantConfig) -> slice:
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


def quantize(
    weight: torch.Tensor, config: QuantConfig, chunk: int = DEFAULT_CHUNK, name: str = "tensor"
) -> QuantizedTensor:
    """Quantize `weight` (any float dtype, CPU or CUDA) under `config`; `name` is
    what error messages call it."""
    if not weight.is_floating_point():
        raise QpeftError(f"can only quantize floating-point tensors, {name} is {weight.dtype}")
    flat = weight.detach().reshape(-1)
    layout = storage_layout(config, flat.numel())
    device = weight.device
    codebook = nf_codebook(config.bits, device)
    absmax = torch.empty(layout.num_blocks, dtype=torch.float32, device=device)
    codes = torch.empty(packed_numel(layout.padded_numel, config.bits), dtype=torch.uint8, device=device)
    for start, end in _chunks(layout.num_blocks, config.block_size, chunk):
        blocks = _block_view(flat, start, end, config.block_size, layout.numel)
        block_absmax = blocks.abs().amax(dim=1)
        absmax[start:end] = block_absmax
        # x * (1/absmax), clamped: the exact arithmetic of bitsandbytes' quantizer.
        scaled = torch.clamp(blocks * (1.0 / block_absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1)
        chunk_codes = nearest_level(scaled.reshape(-1), codebook)
        codes[_byte_range(start, end, config)] = pack_codes(chunk_codes, config.bits)
    # amax propagates NaN, so one check at the end covers every value (one device sync)
    if not torch.isfinite(absmax).all():
        raise QpeftError(f"{name} contains NaN or Inf values")
    return _with_scales(config, tuple(weight.shape), codes, absmax)


def _with_scales(
    config: QuantConfig, shape: tuple[int, ...], packed_codes: torch.Tensor, absmax: torch.Tensor
) -> QuantizedTensor:
    """The stored form of packed codes and their exact block absmaxes: the scales
    double-quantized, or rounded to `scale_dtype`."""
    if not config.double_quant:
        return QuantizedTensor(config, shape, packed_codes, absmax.to(TORCH_DTYPES[config.scale_dtype]))
    layout = storage_layout(config, math.prod(shape))
    scale_codes, scale_scales, offset = _quantize_scales(absmax, config)
    packed_scales = pack_codes(scale_codes[: layout.padded_num_blocks], config.scale_bits)
    return QuantizedTensor(config, shape, packed_codes, packed_scales, scale_scales, offset)


def pack_quantized(
    codes: torch.Tensor, absmax: torch.Tensor, config: QuantConfig, shape: tuple[int, ...]
) -> QuantizedTensor:
    """The stored form of codes chosen elsewhere (e.g. by error-feedback rounding):
    `codes` holds one codebook index per element (`shape`), `absmax` the exact fp32
    absmax of each block, from which the scales are made as `quantize` makes them.
    Padding codes are those of zero, as `quantize` writes them."""
    layout = storage_layout(config, math.prod(shape))
    if codes.numel() != layout.numel or absmax.numel() != layout.num_blocks:
        raise QpeftError(f"{codes.numel()} codes and {absmax.numel()} scales do not fit {config.name} on {shape}")
    zero = nearest_level(codes.new_zeros(1, dtype=torch.float32), nf_codebook(config.bits, codes.device))
    padded = torch.cat([codes.reshape(-1).to(torch.int32), zero.expand(layout.padding)])
    return _with_scales(config, tuple(shape), pack_codes(padded, config.bits), absmax.float())


def _scale_codebook(config: QuantConfig, device: torch.device) -> torch.Tensor:
    if config.scale_bits == 8:
        return dynamic_codebook(device)
    return uniform_codebook(config.scale_bits, device)


def _quantize_scales(absmax: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    codes: torch.Tensor, scale_scales: torch.Tensor, offset: torch.Tensor, config: QuantConfig, num_blocks: int
) -> torch.Tensor:
    """fp32 block scales from unpacked scale codes: level · second-level scale + offset."""
    values = _scale_codebook(config, codes.device).index_select(0, codes[:num_blocks].to(torch.int32))
    whole = scale_scales.numel() * config.scale_block_size
    values = torch.nn.functional.pad(values, (0, whole - num_blocks)).view(-1, config.scale_block_size)
    # code · level-2 scale, then + offset: the same two fp32 roundings as bitsandbytes
    values.mul_(scale_scales.to(torch.float32).unsqueeze(1))
    return values.view(-1)[:num_blocks].add_(offset)


def simulated_scales(absmax: torch.Tensor, config: QuantConfig) -> torch.Tensor:
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
        return qt.scales.to(torch.float32)
    num_blocks = storage_layout(config, qt.numel).num_blocks
    return _scale_values(
        unpack_codes(qt.scales, config.scale_bits), qt.scale_scales, qt.scale_offset, config, num_blocks
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
    blocks: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None = None
) -> torch.Tensor:
    """codebook[nearest(clamp(x / absmax, -1, 1))] of every value (n, B0), times its
    block's scale where `scales` are given, worked through in `SEARCH_CHUNK`s."""
    inverse = 1.0 / absmax.clamp(min=1e-38)
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


def simulate(weight: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """dequantize(quantize(weight, config)) in fp32, bit for bit, without packing:
    the fast path for searches that only need the quantized values."""
    blocks, absmax = finite_absmax_blocks(weight, config.block_size)
    codebook = nf_codebook(config.bits, blocks.device)
    values = _block_levels(blocks, absmax, codebook, simulated_scales(absmax, config)).view(-1)
    return values[: weight.numel()].view(weight.shape)


def scaled_levels(levels: torch.Tensor, absmax: torch.Tensor, config: QuantConfig, shape: torch.Size) -> torch.Tensor:
    """`simulate` of the input that `normalized_blocks` cut into (levels, absmax), for
    any config with those code bits and block size; `levels` is left unchanged."""
    values = (levels * simulated_scales(absmax, config).unsqueeze(1)).view(-1)
    return values[: shape.numel()].view(shape)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Dequantize to a tensor of `qt.shape` in `dtype` (computed in fp32, then cast),
    in torch ops. (`qpeft.kernels.dequantize` sends matrices in bitsandbytes' own NF4
    format to its compiled kernels: the same bits, faster.)"""
    config = qt.config
    layout = storage_layout(config, qt.numel)
    device = qt.codes.device
    scales = dequantize_scales(qt)
    codebook = nf_codebook(config.bits, device)
    lut = decode_lut(codebook, config.bits)
    out = torch.empty(layout.numel, dtype=dtype, device=device)
    for start, end in _chunks(layout.num_blocks, config.block_size, chunk):
        lo, hi = start * config.block_size, end * config.block_size
        packed = qt.codes[_byte_range(start, end, config)]
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
