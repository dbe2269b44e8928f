"""Packing of b-bit codes (b ∈ {2, 3, 4, 8}) into bytes, and back.

Codes form one MSB-first bit stream: the first code takes the highest bits of the
first byte. For 4-bit codes this is exactly bitsandbytes' layout (element 2i in the
high nibble, 2i+1 in the low nibble). Codes are grouped so that each group fills
whole bytes: 4 codes/byte (2-bit), 8 codes/3 bytes (3-bit), 2/byte (4-bit), 1/byte.
"""

from __future__ import annotations

import functools

import torch


def group_shape(bits: int) -> tuple[int, int]:
    """(codes, bytes) per packing group."""
    codes = {2: 4, 3: 8, 4: 2, 8: 1}[bits]
    return codes, codes * bits // 8


def packed_numel(numel: int, bits: int) -> int:
    codes, nbytes = group_shape(bits)
    if numel % codes:
        raise ValueError(f"{numel} codes of {bits} bits do not fill whole bytes")
    return numel // codes * nbytes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D integer tensor of codes in [0, 2^bits) into uint8."""
    if bits == 8:
        return codes.to(torch.uint8)
    if bits in (2, 4):  # whole codes per byte: cheap uint8 shifts
        columns = codes.to(torch.uint8).reshape(-1, 8 // bits)
        packed = columns[:, 0] << (8 - bits)
        for j in range(1, 8 // bits):
            packed |= columns[:, j] << (8 - bits * (j + 1))
        return packed
    per_group, nbytes = group_shape(bits)
    groups = codes.to(torch.int32).reshape(-1, per_group)
    shifts = torch.arange(per_group - 1, -1, -1, device=codes.device, dtype=torch.int32) * bits
    word = (groups << shifts).sum(dim=1, dtype=torch.int32)
    byte_shifts = torch.arange(nbytes - 1, -1, -1, device=codes.device, dtype=torch.int32) * 8
    return ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


@functools.cache
def _byte_lut_on(bits: int, device: str) -> torch.Tensor:
    """`_byte_lut_cpu` on `device`, copied there once (not once per dequantize)."""
    return _byte_lut_cpu(bits).to(device)


@functools.cache
def _byte_lut_cpu(bits: int) -> torch.Tensor:
    """For 2/4/8-bit codes: table[byte] = the codes held in that byte."""
    per_byte = 8 // bits
    byte = torch.arange(256, dtype=torch.int32).unsqueeze(1)
    shifts = torch.arange(per_byte - 1, -1, -1, dtype=torch.int32) * bits
    return ((byte >> shifts) & (2**bits - 1)).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 codes, one per element."""
    if bits == 8:
        return packed
    if bits == 3:
        trio = packed.reshape(-1, 3).to(torch.int32)
        word = (trio[:, 0] << 16) | (trio[:, 1] << 8) | trio[:, 2]
        shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.int32) * 3
        return ((word.unsqueeze(1) >> shifts) & 7).to(torch.uint8).reshape(-1)
    lut = _byte_lut_on(bits, str(packed.device))
    return lut[packed.to(torch.int64)].reshape(-1)


# The element type that holds one byte's decoded fp32 values (8-, 4-, 2-bit codes):
# integers where one is wide enough, since the entries are bit patterns, not numbers
# (as fast as a float64 table: tools/bench_dequant.py); complex128 for four values.
_BYTE_UNIT_DTYPE = {8: torch.int32, 4: torch.int64, 2: torch.complex128}


def decode_lut(codebook: torch.Tensor, bits: int) -> torch.Tensor | None:
    """For 2/4/8-bit codes, a 256-entry 1-D table: entry `byte` holds, bit for bit, the
    fp32 codebook values of the codes in that byte (1, 2 or 4 of them) as one int32,
    int64 or complex128 element. Gather with the packed bytes (int32), then
    `.view(torch.float32)`. None for 3-bit codes. One 1-D gather of whole bytes is 3-5x
    the speed of gathering (256, k) rows, which index_select copies a row at a time
    (tools/bench_dequant.py)."""
    if bits == 3:
        return None
    values = codebook.to(torch.float32)[_byte_lut_on(bits, str(codebook.device)).to(torch.int64)]
    return values.view(_BYTE_UNIT_DTYPE[bits]).reshape(256)
