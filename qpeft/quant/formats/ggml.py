"""GGUF's (llama.cpp's) 32-value block formats as qpeft formats, stored as the very
bytes a GGUF file holds, so that an allocation over them exports exactly.

    q4_0  q4_1  q5_0  q5_1  q8_0    (bits of the code, _0: symmetric, _1: with a minimum)

Each row of a (d_out × d_in) matrix is cut into blocks of 32 consecutive inputs (d_in
must divide by 32). A block stores an fp16 scale d, for the _1 types an fp16 minimum
m, and b-bit codes q:

    _0:  ŵ = d · (q − 2^(b−1))          _1:  ŵ = d · q + m          (fp32 arithmetic)

Block bytes (ggml's `block_q*` structs, little-endian): d; m (_1); for 5 bits a
32-bit word whose bit j is the fifth bit of value j; for 4 and 5 bits 16 bytes whose
low nibble is value j and high nibble value j + 16 (their low four bits); for q8_0
32 signed bytes q − 128. Bits per parameter: q4_0 4.5, q4_1 5, q5_0 5.5, q5_1 6,
q8_0 8.5.

Codes and scales are qpeft's own round-to-nearest search, not llama.cpp's: per block,
a few candidate ranges (the block's full range, and shrunk by 5–25% around its
centre, which clips a few outliers to code the rest finer) are each rounded to fp16
and coded against that stored scale, and the candidate of least squared error is
kept. GPTQ (`column_grid`) rounds onto the scales the search chose for the input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from qpeft.errors import QpeftError
from qpeft.quant.config import DEFAULT_CHUNK, QuantConfig, Shape, matrix_shape
from qpeft.quant.tensor import QuantizedTensor

BLOCK = 32
KINDS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34}
RANGE_FRACTIONS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # candidate ranges of the scale search

_PATTERN = re.compile(r"^q(?P<b>[458])_(?P<m>[01])$")


@dataclass(frozen=True)
class GGMLConfig(QuantConfig):
    """One of GGUF's 32-value block formats."""

    family: ClassVar[str] = "q"
    syntax: ClassVar[str] = "one of " + ", ".join(KINDS)

    bits: int = 4
    with_min: bool = False  # the _1 types: a minimum per block, codes unsigned

    def __post_init__(self) -> None:
        if self.name not in KINDS:
            raise QpeftError(f"GGUF has no block format {self.name} (choose from {', '.join(KINDS)})")

    @classmethod
    def parse(cls, text: str) -> GGMLConfig | None:
        match = _PATTERN.match(text)
        if not match or f"q{match['b']}_{match['m']}" not in KINDS:
            return None
        return cls(int(match["b"]), match["m"] == "1")

    @property
    def name(self) -> str:
        return f"q{self.bits}_{int(self.with_min)}"

    @property
    def block_bytes(self) -> int:
        return BLOCK_BYTES[self.name]

    @property
    def bits_per_param(self) -> float:
        return self.block_bytes * 8 / BLOCK

    @property
    def top(self) -> int:
        """The largest code."""
        return (1 << self.bits) - 1

    @property
    def offset(self) -> int:
        """What a _0 code is shifted by (its value 0); 0 for the _1 types."""
        return 0 if self.with_min else 1 << (self.bits - 1)

    def blocks(self, shape: Shape) -> tuple[int, int]:
        """(rows, blocks per row) of a matrix of `shape`."""
        rows, cols = matrix_shape(shape)
        if rows * cols <= 0:
            raise QpeftError(f"cannot quantize an empty tensor (numel={rows * cols})")
        if cols % BLOCK:
            raise QpeftError(f"{self.name} needs rows whose length divides by {BLOCK}, got {cols}")
        return rows, cols // BLOCK

    def part_specs(self, shape: Shape) -> dict[str, tuple[torch.dtype, int]]:
        """blocks: uint8, the GGUF tensor's bytes (row-major blocks)."""
        rows, per_row = self.blocks(shape)
        return {"blocks": (torch.uint8, rows * per_row * self.block_bytes)}

    def storage_bits(self, shape: Shape) -> int:
        rows, per_row = self.blocks(shape)
        return rows * per_row * self.block_bytes * 8

    # -- the search ---------------------------------------------------------------------

    def _codes(self, x: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Codes of blocks x (n × 32) against fp32 copies of the stored d and m (n × 1);
        a block with d = 0 takes the code of 0 (_0) or of m (_1)."""
        safe = torch.where(d == 0, torch.ones_like(d), d)
        q = torch.round((x - m) / safe) + self.offset
        return torch.where(d == 0, torch.full_like(q, self.offset), q).clamp_(0, self.top)

    def _values(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """ŵ of codes q (float) as gguf computes it in fp32."""
        return d * q + m if self.with_min else d * (q - self.offset)

    def _candidate(self, x: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(d, m) in fp16 of one candidate range for blocks x (n × 32)."""
        if self.with_min:
            lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
            centre, half = (lo + hi) / 2, (hi - lo) * fraction / 2
            return ((2 * half) / self.top).half(), (centre - half).half()
        # the value of largest magnitude maps to code 0 (−2^(b−1)·d): the wider half
        extreme = torch.gather(x, 1, x.abs().argmax(dim=1, keepdim=True))
        return (extreme * fraction / -self.offset).half(), torch.zeros_like(extreme).half()

    def scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The searched fp16 (d, m) of blocks x (n × 32, fp32): each candidate range's
        squared error with codes chosen against its stored scale, least kept."""
        if not torch.isfinite(x).all():
            raise QpeftError("cannot quantize a tensor with NaN or Inf values")
        best_d = best_m = best_err = None
        for fraction in RANGE_FRACTIONS:
            d, m = self._candidate(x, fraction)
            df, mf = d.float(), m.float()
            err = (x - self._values(self._codes(x, df, mf), df, mf)).square().sum(dim=1, keepdim=True)
            if best_err is None:
                best_d, best_m, best_err = d, m, err
            else:
                better = err < best_err
                best_d, best_m = torch.where(better, d, best_d), torch.where(better, m, best_m)
                best_err = torch.minimum(err, best_err)
        return best_d, best_m

    # -- bytes --------------------------------------------------------------------------

    def pack_blocks(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """GGUF bytes (n × block_bytes) of codes q (n × 32, 0…top) and fp16 d, m (n × 1)."""
        q = q.to(torch.int32)
        parts = [d.contiguous().view(torch.uint8).reshape(-1, 2)]
        if self.with_min:
            parts.append(m.contiguous().view(torch.uint8).reshape(-1, 2))
        if self.bits == 8:
            parts.append((q - 128).to(torch.int8).view(torch.uint8))
        else:
            if self.bits == 5:
                high = (q >> 4) & 1
                word = (high << torch.arange(BLOCK, dtype=torch.int32, device=q.device)).sum(dim=1, dtype=torch.int64)
                parts.append(torch.stack([(word >> (8 * k)) & 0xFF for k in range(4)], dim=1).to(torch.uint8))
            low = q & 15
            parts.append((low[:, :16] | (low[:, 16:] << 4)).to(torch.uint8))
        return torch.cat(parts, dim=1)

    def unpack_blocks(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes as fp32 n × 32, d, m as fp32 n × 1) of GGUF bytes (n × block_bytes)."""
        d = raw[:, :2].contiguous().view(torch.float16).float()
        at = 2
        m = torch.zeros_like(d)
        if self.with_min:
            m, at = raw[:, 2:4].contiguous().view(torch.float16).float(), 4
        if self.bits == 8:
            return raw[:, at:].contiguous().view(torch.int8).float() + 128, d, m
        high = torch.zeros(raw.shape[0], BLOCK, dtype=torch.int32, device=raw.device)
        if self.bits == 5:
            word = sum(raw[:, at + k].to(torch.int64) << (8 * k) for k in range(4))
            shifts = torch.arange(BLOCK, dtype=torch.int64, device=raw.device)
            high = (((word.unsqueeze(1) >> shifts) & 1) << 4).to(torch.int32)
            at += 4
        nibbles = raw[:, at : at + 16].to(torch.int32)
        low = torch.cat([nibbles & 15, nibbles >> 4], dim=1)
        return (low | high).float(), d, m

    # -- the QuantConfig interface -------------------------------------------------------

    def quantize(self, weight: torch.Tensor, chunk: int = DEFAULT_CHUNK, name: str = "tensor") -> QuantizedTensor:
        if not weight.is_floating_point():
            raise QpeftError(f"can only quantize floating-point tensors, {name} is {weight.dtype}")
        rows, per_row = self.blocks(weight.shape)
        x = weight.detach().reshape(rows * per_row, BLOCK)
        out = torch.empty(rows * per_row, self.block_bytes, dtype=torch.uint8, device=weight.device)
        step = max(1, chunk // BLOCK)
        for start in range(0, x.shape[0], step):
            piece = x[start : start + step].float()
            try:
                d, m = self.scales(piece)
            except QpeftError:
                raise QpeftError(f"{name} contains NaN or Inf values") from None
            q = self._codes(piece, d.float(), m.float())
            out[start : start + step] = self.pack_blocks(q, d, m)
        return QuantizedTensor(self, tuple(weight.shape), {"blocks": out.reshape(-1)})

    def dequantize(
        self, qt: QuantizedTensor, dtype: torch.dtype = torch.float32, chunk: int = DEFAULT_CHUNK
    ) -> torch.Tensor:
        rows, per_row = self.blocks(qt.shape)
        raw = qt.parts["blocks"].view(rows * per_row, self.block_bytes)
        out = torch.empty(rows * per_row, BLOCK, dtype=dtype, device=qt.device)
        step = max(1, chunk // BLOCK)
        for start in range(0, raw.shape[0], step):
            q, d, m = self.unpack_blocks(raw[start : start + step])
            out[start : start + step] = self._values(q, d, m)
        return out.reshape(qt.shape)

    def simulate(self, weight: torch.Tensor) -> torch.Tensor:
        rows, per_row = self.blocks(weight.shape)
        x = weight.detach().float().reshape(rows * per_row, BLOCK)
        d, m = self.scales(x)
        df, mf = d.float(), m.float()
        return self._values(self._codes(x, df, mf), df, mf).reshape(weight.shape)

    def column_grid(self, weight: torch.Tensor) -> GGMLColumnGrid:
        return GGMLColumnGrid(weight, self)


class GGMLColumnGrid:
    """The block scales (and minima) of one matrix searched from the input before any
    rounding, fixed for GPTQ's column-by-column rounding."""

    def __init__(self, weight: torch.Tensor, config: GGMLConfig) -> None:
        self.config, self.shape = config, tuple(weight.shape)
        rows, per_row = config.blocks(weight.shape)
        self.d, self.m = config.scales(weight.detach().float().reshape(rows * per_row, BLOCK))
        # per input column j: the (d_out) scales of the blocks holding column j
        self.d_t = self.d.float().view(rows, per_row).T.contiguous()
        self.m_t = self.m.float().view(rows, per_row).T.contiguous()

    def round(self, column: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        d, m = self.d_t[j // BLOCK].unsqueeze(1), self.m_t[j // BLOCK].unsqueeze(1)
        code = self.config._codes(column.unsqueeze(1), d, m)
        return code.squeeze(1).to(torch.int32), self.config._values(code, d, m).squeeze(1)

    def pack(self, codes: torch.Tensor) -> QuantizedTensor:
        rows, cols = self.shape
        q = codes.reshape(rows * cols // BLOCK, BLOCK)
        blocks = self.config.pack_blocks(q, self.d, self.m).reshape(-1)
        return QuantizedTensor(self.config, self.shape, {"blocks": blocks})


GGMLConfig.presets = {}
GGMLConfig.grids = {"gguf": [GGMLConfig.parse(kind) for kind in KINDS]}
