"""GGUF's (llama.cpp's) block formats as qpeft formats, stored as the very bytes a GGUF
file holds, so that an allocation over them exports exactly. This module holds what
every GGUF block format shares (`GGUFBlockConfig`) and the 32-value types:

    q4_0  q4_1  q5_0  q5_1  q8_0    (bits of the code, _0: symmetric, _1: with a minimum)
    iq4_nl                          (4-bit codes into a fixed non-uniform table)

The 256-value k-quants (q2_k … q6_k) are `qpeft.quant.formats.kquants`.

Each row of a (d_out × d_in) matrix is cut into blocks of consecutive inputs (d_in must
divide by the block size). A 32-value block stores an fp16 scale d, for the _1 types
an fp16 minimum m, and b-bit codes q:

    _0:  ŵ = d · (q − 2^(b−1))      _1:  ŵ = d · q + m      iq4_nl:  ŵ = d · K[q]

in fp32, with K = (−127, −104, −83, −65, −49, −35, −22, −10, 1, 13, 25, 38, 53, 69, 89,
113), llama.cpp's `kvalues_iq4nl`. Block bytes (ggml's `block_q*` structs,
little-endian): d; m (_1); for 5 bits a 32-bit word whose bit j is the fifth bit of
value j; for 4 and 5 bits 16 bytes whose low nibble is value j and high nibble value
j + 16 (their low four bits); for q8_0 32 signed bytes q − 128. Bits per parameter:
q4_0 and iq4_nl 4.5, q4_1 5, q5_0 5.5, q5_1 6, q8_0 8.5.

Codes and scales are qpeft's own round-to-nearest search, not llama.cpp's: per block,
a few candidate ranges (the block's full range, and shrunk by 5–25% around its
centre, which clips a few outliers to code the rest finer) are each rounded to fp16
and coded against that stored scale, and the candidate of least squared error is
kept; iq4_nl also tries the least-squares scale of the best candidate's codes. GPTQ
(`column_grid`) rounds onto the scales the search chose for the input.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from qpeft.errors import QpeftError
from qpeft.quant.codebooks import nearest_level
from qpeft.quant.config import QuantConfig, Shape, chunk_for, matrix_shape
from qpeft.quant.tensor import QuantizedTensor

BLOCK = 32
KINDS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34}
RANGE_FRACTIONS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # candidate ranges of the scale searches
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

_NOT_FINITE = "cannot quantize a tensor with NaN or Inf values"
_PATTERN = re.compile(r"^q(?P<b>[458])_(?P<m>[01])$")

Params = tuple[torch.Tensor, ...]


def interleave(values: torch.Tensor, groups: int, count: int, width: int) -> torch.Tensor:
    """Bytes (n × groups·W) holding `values` (n × groups·count·W, each < 2^width) as
    ggml packs bit fields: value (g, k, w) in byte (g, w) at bit k·width."""
    n = values.shape[0]
    v = values.to(torch.int32).reshape(n, groups, count, -1) & ((1 << width) - 1)
    shifts = (torch.arange(count, dtype=torch.int32, device=values.device) * width).view(1, 1, count, 1)
    return (v << shifts).sum(dim=2, dtype=torch.int32).reshape(n, -1).to(torch.uint8)


def deinterleave(raw: torch.Tensor, groups: int, count: int, width: int) -> torch.Tensor:
    """The int32 values (n × groups·count·W) that `interleave` packed into `raw`."""
    n = raw.shape[0]
    b = raw.to(torch.int32).reshape(n, groups, 1, -1)
    shifts = (torch.arange(count, dtype=torch.int32, device=raw.device) * width).view(1, 1, count, 1)
    return ((b >> shifts) & ((1 << width) - 1)).reshape(n, -1)


def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """The little-endian bytes (n × 2) of fp16 values (n × 1)."""
    return x.contiguous().view(torch.uint8).reshape(-1, 2)


def fp16_of(raw: torch.Tensor) -> torch.Tensor:
    """fp32 values (n × 1) of little-endian fp16 bytes (n × 2)."""
    return raw.contiguous().view(torch.float16).float()


class GGUFBlockConfig(QuantConfig):
    """A GGUF block format: blocks of `block_size` consecutive inputs, each stored in
    `block_bytes` bytes, the tensor's bytes those of the GGUF file. Within a block,
    every `sub_block` values share one effective fp32 (scale a, offset b), derived from
    the stored scales; codes are chosen against those stored values. A subclass gives
    the search, the effective (a, b), the code rule, the value rule (in gguf-py's
    arithmetic, for bit-exact reads) and the bytes."""

    block_size: ClassVar[int]
    kinds: ClassVar[tuple[str, ...]]

    @property
    @abstractmethod
    def block_bytes(self) -> int: ...

    @property
    @abstractmethod
    def sub_block(self) -> int: ...

    @abstractmethod
    def search(self, x: torch.Tensor) -> Params:
        """The stored scales of blocks x (n × block_size, fp32, finite)."""

    @abstractmethod
    def effective(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (a, b), each (n × block_size / sub_block × 1), of stored scales."""

    @abstractmethod
    def codes(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Nearest codes (float) of values x against effective (a, b) broadcast to x."""

    @abstractmethod
    def values(self, q: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """ŵ of codes q (float) as gguf-py computes it in fp32."""

    @abstractmethod
    def pack(self, q: torch.Tensor, params: Params) -> torch.Tensor:
        """GGUF bytes (n × block_bytes) of codes q (n × block_size) and stored scales."""

    @abstractmethod
    def unpack(self, raw: torch.Tensor) -> tuple[torch.Tensor, Params]:
        """(codes as fp32 n × block_size, stored scales) of GGUF bytes."""

    @classmethod
    def parse(cls, text: str) -> GGUFBlockConfig | None:
        return cls.of_kind(text) if text in cls.kinds else None

    @classmethod
    @abstractmethod
    def of_kind(cls, kind: str) -> GGUFBlockConfig: ...

    @property
    def bits_per_param(self) -> float:
        return self.block_bytes * 8 / self.block_size

    def blocks(self, shape: Shape) -> tuple[int, int]:
        """(rows, blocks per row) of a matrix of `shape`."""
        rows, cols = matrix_shape(shape)
        if rows * cols <= 0:
            raise QpeftError(f"cannot quantize an empty tensor (numel={rows * cols})")
        if cols % self.block_size:
            raise QpeftError(f"{self.name} needs rows whose length divides by {self.block_size}, got {cols}")
        return rows, cols // self.block_size

    def holds(self, shape: Shape) -> bool:
        rows, cols = matrix_shape(shape)
        return rows * cols > 0 and cols % self.block_size == 0

    def part_specs(self, shape: Shape) -> dict[str, tuple[torch.dtype, int]]:
        """blocks: uint8, the GGUF tensor's bytes (row-major blocks)."""
        rows, per_row = self.blocks(shape)
        return {"blocks": (torch.uint8, rows * per_row * self.block_bytes)}

    def storage_bits(self, shape: Shape) -> int:
        rows, per_row = self.blocks(shape)
        return rows * per_row * self.block_bytes * 8

    def _subs(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, self.sub_block)

    def _searched(self, x: torch.Tensor, name: str | None) -> tuple[Params, torch.Tensor]:
        """(stored scales, codes n × block_size) of blocks x (fp32)."""
        if not torch.isfinite(x).all():
            raise QpeftError(f"{name} contains NaN or Inf values" if name else _NOT_FINITE)
        params = self.search(x)
        return params, self.codes(self._subs(x), *self.effective(params)).reshape(x.shape)

    def quantize(self, weight: torch.Tensor, chunk: int | None = None, name: str = "tensor") -> QuantizedTensor:
        if not weight.is_floating_point():
            raise QpeftError(f"can only quantize floating-point tensors, {name} is {weight.dtype}")
        rows, per_row = self.blocks(weight.shape)
        x = weight.detach().reshape(rows * per_row, self.block_size)
        chunk = chunk_for(weight.device, chunk)
        out = torch.empty(rows * per_row, self.block_bytes, dtype=torch.uint8, device=weight.device)
        step = max(1, chunk // self.block_size)
        for start in range(0, x.shape[0], step):
            params, q = self._searched(x[start : start + step].float(), name)
            out[start : start + step] = self.pack(q, params)
        return QuantizedTensor(self, tuple(weight.shape), {"blocks": out.reshape(-1)})

    def dequantize(
        self, qt: QuantizedTensor, dtype: torch.dtype = torch.float32, chunk: int | None = None
    ) -> torch.Tensor:
        rows, per_row = self.blocks(qt.shape)
        raw = qt.parts["blocks"].view(rows * per_row, self.block_bytes)
        chunk = chunk_for(qt.device, chunk)
        out = torch.empty(rows * per_row, self.block_size, dtype=dtype, device=qt.device)
        step = max(1, chunk // self.block_size)
        for start in range(0, raw.shape[0], step):
            q, params = self.unpack(raw[start : start + step])
            out[start : start + step] = self.values(self._subs(q), *self.effective(params)).reshape(q.shape)
        return out.reshape(qt.shape)

    def simulate(self, weight: torch.Tensor) -> torch.Tensor:
        rows, per_row = self.blocks(weight.shape)
        x = weight.detach().float().reshape(rows * per_row, self.block_size)
        params, q = self._searched(x, None)
        return self.values(self._subs(q), *self.effective(params)).reshape(weight.shape)

    def column_grid(self, weight: torch.Tensor) -> BlockColumnGrid:
        return BlockColumnGrid(weight, self)


class BlockColumnGrid:
    """The block scales of one matrix searched from the input before any rounding,
    fixed for GPTQ's column-by-column rounding."""

    def __init__(self, weight: torch.Tensor, config: GGUFBlockConfig) -> None:
        self.config, self.shape = config, tuple(weight.shape)
        rows, per_row = config.blocks(weight.shape)
        x = weight.detach().float().reshape(rows * per_row, config.block_size)
        if not torch.isfinite(x).all():
            raise QpeftError(_NOT_FINITE)
        self.params = config.search(x)
        a, b = config.effective(self.params)
        # per input column j: the (d_out) effective scales of the sub-blocks holding j
        self.a_t, self.b_t = (t.reshape(rows, -1).T.contiguous() for t in (a, b))

    def round(self, column: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = j // self.config.sub_block
        a, b = self.a_t[k].unsqueeze(1), self.b_t[k].unsqueeze(1)
        code = self.config.codes(column.unsqueeze(1), a, b)
        return code.squeeze(1).to(torch.int32), self.config.values(code, a, b).squeeze(1)

    def pack(self, codes: torch.Tensor) -> QuantizedTensor:
        rows, cols = self.shape
        q = codes.reshape(rows * cols // self.config.block_size, self.config.block_size)
        blocks = self.config.pack(q, self.params).reshape(-1)
        return QuantizedTensor(self.config, self.shape, {"blocks": blocks})


def _least_error(candidates, error_of):
    """Per row, the candidate (a tuple of n × 1 tensors) of least error_of(candidate)."""
    best, best_err = None, None
    for candidate in candidates:
        err = error_of(candidate)
        if best is None:
            best, best_err = candidate, err
        else:
            better = err < best_err
            best = tuple(torch.where(better, new, old) for new, old in zip(candidate, best, strict=True))
            best_err = torch.minimum(err, best_err)
    return best


@dataclass(frozen=True)
class GGMLConfig(GGUFBlockConfig):
    """One of GGUF's 32-value uniform block formats."""

    family: ClassVar[str] = "q"
    syntax: ClassVar[str] = "one of " + ", ".join(KINDS)
    block_size: ClassVar[int] = BLOCK
    kinds: ClassVar[tuple[str, ...]] = KINDS

    bits: int = 4
    with_min: bool = False  # the _1 types: a minimum per block, codes unsigned

    def __post_init__(self) -> None:
        if self.name not in KINDS:
            raise QpeftError(f"GGUF has no block format {self.name} (choose from {', '.join(KINDS)})")

    @classmethod
    def of_kind(cls, kind: str) -> GGMLConfig:
        match = _PATTERN.match(kind)
        return cls(int(match["b"]), match["m"] == "1")

    @property
    def name(self) -> str:
        return f"q{self.bits}_{int(self.with_min)}"

    @property
    def block_bytes(self) -> int:
        return BLOCK_BYTES[self.name]

    @property
    def sub_block(self) -> int:
        return BLOCK

    @property
    def top(self) -> int:
        """The largest code."""
        return (1 << self.bits) - 1

    @property
    def offset(self) -> int:
        """What a _0 code is shifted by (its value 0); 0 for the _1 types."""
        return 0 if self.with_min else 1 << (self.bits - 1)

    def codes(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # a block with d = 0 takes the code of 0 (_0) or of m (_1)
        safe = torch.where(a == 0, torch.ones_like(a), a)
        q = torch.round((x - b) / safe) + self.offset
        return torch.where(a == 0, torch.full_like(q, self.offset), q).clamp_(0, self.top)

    def values(self, q: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * q + b if self.with_min else a * (q - self.offset)

    def effective(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        d, m = params
        return d.float().unsqueeze(1), m.float().unsqueeze(1)

    def _candidate(self, x: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(d, m) in fp16 of one candidate range for blocks x (n × 32)."""
        if self.with_min:
            lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
            centre, half = (lo + hi) / 2, (hi - lo) * fraction / 2
            return ((2 * half) / self.top).half(), (centre - half).half()
        # the value of largest magnitude maps to code 0 (−2^(b−1)·d): the wider half
        extreme = torch.gather(x, 1, x.abs().argmax(dim=1, keepdim=True))
        return (extreme * fraction / -self.offset).half(), torch.zeros_like(extreme).half()

    def search(self, x: torch.Tensor) -> Params:
        """The fp16 (d, m) of blocks x (n × 32, fp32): each candidate range's squared
        error with codes chosen against its stored scale, least kept."""

        def error(candidate: Params) -> torch.Tensor:
            d, m = candidate[0].float(), candidate[1].float()
            return (x - self.values(self.codes(x, d, m), d, m)).square().sum(dim=1, keepdim=True)

        return _least_error((self._candidate(x, f) for f in RANGE_FRACTIONS), error)

    def pack(self, q: torch.Tensor, params: Params) -> torch.Tensor:
        d, m = params
        parts = [fp16_bytes(d)]
        if self.with_min:
            parts.append(fp16_bytes(m))
        if self.bits == 8:
            parts.append((q.to(torch.int32) - 128).to(torch.int8).view(torch.uint8))
        else:
            if self.bits == 5:
                parts.append(interleave(q.to(torch.int32) >> 4, 4, 8, 1))  # bit j of a 32-bit word
            parts.append(interleave(q, 1, 2, 4))
        return torch.cat(parts, dim=1)

    def unpack(self, raw: torch.Tensor) -> tuple[torch.Tensor, Params]:
        d = raw[:, :2].contiguous().view(torch.float16)
        at = 2
        m = torch.zeros_like(d)
        if self.with_min:
            m, at = raw[:, 2:4].contiguous().view(torch.float16), 4
        if self.bits == 8:
            return raw[:, at:].contiguous().view(torch.int8).float() + 128, (d, m)
        high = torch.zeros(raw.shape[0], BLOCK, dtype=torch.int32, device=raw.device)
        if self.bits == 5:
            high = deinterleave(raw[:, at : at + 4], 4, 8, 1) << 4
            at += 4
        return (deinterleave(raw[:, at : at + 16], 1, 2, 4) | high).float(), (d, m)


@dataclass(frozen=True)
class IQ4NLConfig(GGUFBlockConfig):
    """iq4_nl: 32-value blocks of an fp16 scale and 4-bit codes into the fixed
    non-uniform table K (llama.cpp's `kvalues_iq4nl`), ŵ = d · K[q]."""

    family: ClassVar[str] = "iq"
    syntax: ClassVar[str] = "iq4_nl"
    block_size: ClassVar[int] = BLOCK
    kinds: ClassVar[tuple[str, ...]] = ("iq4_nl",)

    bits: int = 4

    @classmethod
    def of_kind(cls, kind: str) -> IQ4NLConfig:
        return cls()

    @property
    def name(self) -> str:
        return "iq4_nl"

    @property
    def block_bytes(self) -> int:
        return 18

    @property
    def sub_block(self) -> int:
        return BLOCK

    @staticmethod
    def _table(device: torch.device) -> torch.Tensor:
        return torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32, device=device)

    def codes(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        levels = self._table(x.device)
        safe = torch.where(a == 0, torch.ones_like(a), a)
        q = nearest_level(x / safe, levels).float()
        return torch.where(a == 0, torch.full_like(q, 8.0), q)  # K[8] = 1: 0 · 1 = 0

    def values(self, q: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        levels = self._table(q.device)
        return a * levels[q.long()]

    def effective(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        d = params[0].float().unsqueeze(1)
        return d, torch.zeros_like(d)

    def search(self, x: torch.Tensor) -> Params:
        """fp16 d of blocks x (n × 32): the block's extreme mapped to either end of K,
        over the shrunk ranges, then the least-squares d of the best one's codes; the
        candidate of least squared error with codes chosen against the stored d."""

        def error(candidate: Params) -> torch.Tensor:
            d = candidate[0].float()
            return (x - self.values(self.codes(x, d, d), d, d)).square().sum(dim=1, keepdim=True)

        extreme = torch.gather(x, 1, x.abs().argmax(dim=1, keepdim=True))
        ends = (IQ4_NL_LEVELS[0], IQ4_NL_LEVELS[-1])
        candidates = [((extreme * f / end).half(),) for f in RANGE_FRACTIONS for end in ends]
        (d,) = _least_error(candidates, error)
        levels = self._table(x.device)
        k = levels[self.codes(x, d.float(), d.float()).long()]
        fitted = (x * k).sum(dim=1, keepdim=True) / k.square().sum(dim=1, keepdim=True)
        return _least_error([(d,), (fitted.half(),)], error)

    def pack(self, q: torch.Tensor, params: Params) -> torch.Tensor:
        return torch.cat([fp16_bytes(params[0]), interleave(q, 1, 2, 4)], dim=1)

    def unpack(self, raw: torch.Tensor) -> tuple[torch.Tensor, Params]:
        return deinterleave(raw[:, 2:], 1, 2, 4).float(), (raw[:, :2].contiguous().view(torch.float16),)


GGMLConfig.presets = {}
GGMLConfig.grids = {}
IQ4NLConfig.presets = {}
IQ4NLConfig.grids = {}
