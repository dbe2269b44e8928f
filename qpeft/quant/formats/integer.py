"""Asymmetric integer codes with one fp16 scale and one fp16 zero point per group of
G input channels: the GPTQ / AutoGPTQ layout.

    int<b>-g<G>    b ∈ {2, 3, 4, 8} code bits, groups of G columns along d_in

Each row of a (d_out × d_in) matrix is cut into ⌈d_in / G⌉ groups (the last one
shorter when G does not divide d_in). A group with range [lo, hi], widened to hold 0
as AutoGPTQ does (lo ≤ 0 ≤ hi, so that the zero point lies in [0, 2^b − 1]), has

    s = max(fp16((hi − lo) / (2^b − 1)), 2⁻²⁴),   z = fp16(−lo / s),
    q = clamp(round(w / s + z), 0, 2^b − 1),   ŵ = (q − z) · s.

The zero point is kept as an fp16 value, not rounded to an integer as AutoGPTQ's
packed qzeros are: the same 16 bits, and the group's ends stay on the grid (0 is then
on the grid only where z is an integer; an all-zero group, z = 0, stays zero). Codes
are chosen against the fp16 scale and zero the dequantizer uses.

Storage: b bits per value (the flattened codes packed as `qpeft.quant.packing`,
padded to whole bytes) plus 32 bits per group, so b + 32/G bits per parameter when G
divides d_in (int4-g128: 4.25).

There is no sharing of work between configs in the cost table (the codes depend on
the group's scale) and no compiled fast path: GPTQ rounds onto `IntColumnGrid`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from qpeft.errors import QpeftError
from qpeft.quant.config import QuantConfig, Shape, chunk_for, matrix_shape
from qpeft.quant.packing import group_shape, pack_codes, packed_numel, unpack_codes
from qpeft.quant.tensor import QuantizedTensor

CODE_BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)  # the named grid; any power of two from 8 to 4096 parses
MAX_GROUP = 4096
SMALLEST_SCALE = 2.0**-24  # fp16's smallest subnormal: a scale never rounds to 0

_PATTERN = re.compile(r"^int(?P<b>\d+)-g(?P<G>\d+)$")


@dataclass(frozen=True)
class IntConfig(QuantConfig):
    """b-bit asymmetric integer codes, fp16 scale and zero per group of G columns."""

    family: ClassVar[str] = "int"
    syntax: ClassVar[str] = "int<b>-g<G>, e.g. int4-g128"

    bits: int = 4
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.bits not in CODE_BITS:
            raise QpeftError(f"code bits must be one of {CODE_BITS}, got {self.bits}")
        size = self.group_size
        if size < 8 or size > MAX_GROUP or size & (size - 1):
            raise QpeftError(f"group size must be a power of two from 8 to {MAX_GROUP}, got {size}")

    @classmethod
    def parse(cls, text: str) -> IntConfig | None:
        match = _PATTERN.match(text)
        return cls(int(match["b"]), int(match["G"])) if match else None

    @property
    def name(self) -> str:
        return f"int{self.bits}-g{self.group_size}"

    @property
    def bits_per_param(self) -> float:
        """b + 32/G (exact when G divides d_in)."""
        return self.bits + 32 / self.group_size

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1  # the largest code

    def groups(self, shape: Shape) -> tuple[int, int, int]:
        """(rows, columns, groups per row) of a matrix of `shape`."""
        rows, cols = matrix_shape(shape)
        if rows * cols <= 0:
            raise QpeftError(f"cannot quantize an empty tensor (numel={rows * cols})")
        return rows, cols, math.ceil(cols / self.group_size)

    def _padded_codes(self, numel: int) -> int:
        per_group, _ = group_shape(self.bits)
        return math.ceil(numel / per_group) * per_group

    def part_specs(self, shape: Shape) -> dict[str, tuple[torch.dtype, int]]:
        """codes: uint8, the packed b-bit codes, row-major; scales and zeros: fp16,
        one per (row, group)."""
        rows, cols, groups = self.groups(shape)
        return {
            "codes": (torch.uint8, packed_numel(self._padded_codes(rows * cols), self.bits)),
            "scales": (torch.float16, rows * groups),
            "zeros": (torch.float16, rows * groups),
        }

    def storage_bits(self, shape: Shape) -> int:
        rows, cols, groups = self.groups(shape)
        return self._padded_codes(rows * cols) * self.bits + 32 * rows * groups

    def scales_and_zeros(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fp16 scale and zero point of every (row, group) of `weight` (d_out × d_in)."""
        rows, cols, groups = self.groups(weight.shape)
        w = weight.detach().float().reshape(rows, cols)
        # padding with 0 changes nothing: every range is widened to hold 0 anyway
        padded = torch.nn.functional.pad(w, (0, groups * self.group_size - cols)).view(rows, groups, -1)
        lo, hi = padded.amin(dim=2).clamp(max=0), padded.amax(dim=2).clamp(min=0)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise QpeftError("cannot quantize a tensor with NaN or Inf values")
        scales = ((hi - lo) / self.levels).to(torch.float16).clamp(min=SMALLEST_SCALE)
        zeros = (-lo / scales.float()).to(torch.float16)
        return scales, zeros

    def _columns(self, part: torch.Tensor, cols: int) -> torch.Tensor:
        """A (rows, groups) part as fp32, one value per column (rows, cols)."""
        return part.float().repeat_interleave(self.group_size, dim=1)[:, :cols]

    def _codes(self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(w / scales + zeros), 0, self.levels)

    def _pack(self, shape: Shape, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> QuantizedTensor:
        flat = codes.reshape(-1).to(torch.int32)
        flat = torch.nn.functional.pad(flat, (0, self._padded_codes(flat.numel()) - flat.numel()))
        parts = {"codes": pack_codes(flat, self.bits), "scales": scales.reshape(-1), "zeros": zeros.reshape(-1)}
        return QuantizedTensor(self, tuple(shape), parts)

    def quantize(self, weight: torch.Tensor, chunk: int | None = None, name: str = "tensor") -> QuantizedTensor:
        if not weight.is_floating_point():
            raise QpeftError(f"can only quantize floating-point tensors, {name} is {weight.dtype}")
        rows, cols, groups = self.groups(weight.shape)
        w = weight.detach().reshape(rows, cols)
        codes = torch.empty(rows, cols, dtype=torch.uint8, device=weight.device)
        scales = torch.empty(rows, groups, dtype=torch.float16, device=weight.device)
        zeros = torch.empty_like(scales)
        step = max(1, chunk_for(weight.device, chunk) // cols)  # rows at a time: fp32 temporaries of one chunk only
        for start in range(0, rows, step):
            part = slice(start, min(rows, start + step))
            piece = w[part].float()
            try:
                scales[part], zeros[part] = self.scales_and_zeros(piece)
            except QpeftError:
                raise QpeftError(f"{name} contains NaN or Inf values") from None
            codes[part] = self._codes(piece, self._columns(scales[part], cols), self._columns(zeros[part], cols))
        return self._pack(weight.shape, codes, scales, zeros)

    def dequantize(
        self, qt: QuantizedTensor, dtype: torch.dtype = torch.float32, chunk: int | None = None
    ) -> torch.Tensor:
        rows, cols, groups = self.groups(qt.shape)
        scales, zeros = qt.parts["scales"].view(rows, groups), qt.parts["zeros"].view(rows, groups)
        per_group, group_bytes = group_shape(self.bits)
        # row chunks start on whole packing groups (8 codes of 3 bits fill 3 bytes)
        step = max(1, chunk_for(qt.device, chunk) // cols)
        step = step if (step * cols) % per_group == 0 else math.lcm(step * cols, per_group) // cols
        out = torch.empty(rows, cols, dtype=dtype, device=qt.device)
        for start in range(0, rows, step):
            end = min(rows, start + step)
            lo, hi = start * cols // per_group * group_bytes, math.ceil(end * cols / per_group) * group_bytes
            codes = unpack_codes(qt.parts["codes"][lo:hi], self.bits)[: (end - start) * cols]
            part = slice(start, end)
            values = self._values(codes.view(end - start, cols), scales[part], zeros[part])
            out[part] = values
        return out.reshape(qt.shape)

    def unpacked(self, qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scales, zeros) of `qt`: uint8 codes (rows, cols) and the fp16 parts
        (rows, groups), so that ŵ = (q − z) · s per group (what an exporter rewrites)."""
        rows, cols, groups = self.groups(qt.shape)
        codes = unpack_codes(qt.parts["codes"], self.bits)[: rows * cols].to(torch.uint8).view(rows, cols)
        return codes, qt.parts["scales"].view(rows, groups), qt.parts["zeros"].view(rows, groups)

    def _values(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """(q − z) · s in fp32 for codes (rows, cols) and fp16 parts (rows, groups)."""
        cols = codes.shape[1]
        return (codes.float() - self._columns(zeros, cols)) * self._columns(scales, cols)

    def simulate(self, weight: torch.Tensor) -> torch.Tensor:
        rows, cols, _ = self.groups(weight.shape)
        scales, zeros = self.scales_and_zeros(weight)
        w = weight.detach().float().reshape(rows, cols)
        codes = self._codes(w, self._columns(scales, cols), self._columns(zeros, cols))
        return self._values(codes, scales, zeros).reshape(weight.shape)

    def column_grid(self, weight: torch.Tensor) -> IntColumnGrid:
        return IntColumnGrid(weight, self)


class IntColumnGrid:
    """The integer grid of one matrix for GPTQ: each group's scale and zero from the
    input before any rounding (AutoGPTQ's static groups, which let act-order keep
    one scale per group)."""

    def __init__(self, weight: torch.Tensor, config: IntConfig) -> None:
        self.config, self.shape = config, tuple(weight.shape)
        self.scales, self.zeros = config.scales_and_zeros(weight)
        cols = weight.shape[1]
        self.scales_t = config._columns(self.scales, cols).T.contiguous()
        self.zeros_t = config._columns(self.zeros, cols).T.contiguous()

    def round(self, column: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.config._codes(column, self.scales_t[j], self.zeros_t[j])
        return code.to(torch.int32), (code - self.zeros_t[j]) * self.scales_t[j]

    def pack(self, codes: torch.Tensor) -> QuantizedTensor:
        return self.config._pack(self.shape, codes, self.scales, self.zeros)


IntConfig.presets = {}
IntConfig.grids = {"int": [IntConfig(b, g) for b in CODE_BITS for g in GROUP_SIZES]}
