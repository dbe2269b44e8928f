"""GGUF's k-quants, q2_k … q6_k, as qpeft formats stored as the bytes a GGUF file holds.

A super-block of 256 consecutive inputs (d_in must divide by 256) is cut into
sub-blocks of 16 or 32 values. The super-block stores an fp16 scale d (and, for the
types with a minimum, an fp16 dmin); each sub-block stores a small integer scale s
(and minimum m) of `scale_bits`; each value a b-bit code q. In fp32, as gguf-py reads it:

    q2_k, q4_k, q5_k:  ŵ = (d·s)·q − (dmin·m)        s, m unsigned
    q3_k, q6_k:        ŵ = (d·s)·(q − 2^(b−1))       s signed

| type | sub-block | b | scale bits | block bytes | bits/param |
|---|---:|---:|---:|---:|---:|
| q2_k | 16 | 2 | 4 (+4 min) | 84 | 2.625 |
| q3_k | 16 | 3 | 6 | 110 | 3.4375 |
| q4_k | 32 | 4 | 6 (+6 min) | 144 | 4.5 |
| q5_k | 32 | 5 | 6 (+6 min) | 176 | 5.5 |
| q6_k | 16 | 6 | 8 | 210 | 6.5625 |

Bytes are ggml's `block_q*_K` structs (ggml-common.h), little-endian: q2_k scales[16]
(s | m << 4), qs[64], d, dmin; q3_k hmask[32] (bit 2 of the codes), qs[64] (bits 0–1),
scales[12] (6-bit s + 32: low nibbles in bytes 0–7, top bits in bytes 8–11), d; q4_k
and q5_k d, dmin, scales[12] (6-bit s and m, `get_scale_min_k4`), for q5_k qh[32]
(bit 4), qs[128] (nibbles); q6_k ql[128] (nibbles), qh[64] (bits 4–5), int8 scales[16], d.

The search is qpeft's own, not llama.cpp's: each sub-block's float (scale, minimum)
is the best of a few candidate ranges (full, and shrunk by 5–25%, as for the 32-value
types), the super-block's d (dmin) maps the largest of them onto the top sub-block
code, and then each sub-block tries its integer scale (and minimum) rounded and one
step either way, with codes chosen against the stored d·s, keeping the least squared
error. GPTQ (`column_grid`) rounds onto the scales the search chose for the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from qpeft.errors import QpeftError
from qpeft.quant.formats.ggml import (
    RANGE_FRACTIONS,
    GGUFBlockConfig,
    Params,
    deinterleave,
    fp16_bytes,
    interleave,
)

SUPER_BLOCK = 256
KQUANT_KINDS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
# bits → (sub-block, scale bits, with a minimum, block bytes)
_LAYOUTS = {2: (16, 4, True, 84), 3: (16, 6, False, 110), 4: (32, 6, True, 144), 5: (32, 6, True, 176),
            6: (16, 8, False, 210)}  # fmt: skip


def _pack_scale_min_k4(s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The 12 bytes of q4_k/q5_k's eight 6-bit scales and minima (n × 8 each)."""
    s, m = s.to(torch.int32), m.to(torch.int32)
    low = s[:, :4] | ((s[:, 4:] >> 4) << 6)
    mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    high = (s[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return torch.cat([low, mid, high], dim=1).to(torch.uint8)


def _unpack_scale_min_k4(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = raw.to(torch.int32)
    d, m, md = b[:, :4], b[:, 4:8], b[:, 8:12]
    s = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=1)
    mins = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1)
    return s, mins


def _pack_q3_scales(s: torch.Tensor) -> torch.Tensor:
    """The 12 bytes of q3_k's sixteen 6-bit scales (stored s + 32, n × 16)."""
    return torch.cat([interleave(s & 15, 1, 2, 4), interleave(s.to(torch.int32) >> 4, 1, 4, 2)], dim=1)


def _unpack_q3_scales(raw: torch.Tensor) -> torch.Tensor:
    return deinterleave(raw[:, :8], 1, 2, 4) | (deinterleave(raw[:, 8:12], 1, 4, 2) << 4)


@dataclass(frozen=True)
class KQuantConfig(GGUFBlockConfig):
    """One of GGUF's 256-value k-quants."""

    family: ClassVar[str] = "q"
    syntax: ClassVar[str] = "one of " + ", ".join(KQUANT_KINDS)
    block_size: ClassVar[int] = SUPER_BLOCK
    kinds: ClassVar[tuple[str, ...]] = KQUANT_KINDS

    bits: int = 4

    def __post_init__(self) -> None:
        if self.bits not in _LAYOUTS:
            raise QpeftError(f"GGUF has no k-quant of {self.bits} bits (choose from {', '.join(KQUANT_KINDS)})")

    @classmethod
    def of_kind(cls, kind: str) -> KQuantConfig:
        return cls(int(kind[1]))

    @property
    def name(self) -> str:
        return f"q{self.bits}_k"

    @property
    def sub_block(self) -> int:
        return _LAYOUTS[self.bits][0]

    @property
    def scale_bits(self) -> int:
        return _LAYOUTS[self.bits][1]

    @property
    def with_min(self) -> bool:
        return _LAYOUTS[self.bits][2]

    @property
    def block_bytes(self) -> int:
        return _LAYOUTS[self.bits][3]

    @property
    def top(self) -> int:
        return (1 << self.bits) - 1

    @property
    def offset(self) -> int:
        """What a symmetric type's code is shifted by; 0 for those with a minimum."""
        return 0 if self.with_min else 1 << (self.bits - 1)

    # -- values ------------------------------------------------------------------------

    def codes(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # a sub-block of scale 0 takes code 0 (value −dmin·m) or the code of 0
        safe = torch.where(a == 0, torch.ones_like(a), a)
        q = torch.round((x + b) / safe) if self.with_min else torch.round(x / safe) + self.offset
        return torch.where(a == 0, torch.full_like(q, self.offset), q).clamp_(0, self.top)

    def values(self, q: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * q - b if self.with_min else a * (q - self.offset)

    def effective(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        d, dmin, s, m = params
        a = (d.float() * s.float()).unsqueeze(2)
        b = (dmin.float() * m.float()).unsqueeze(2)
        return a, b

    # -- the search --------------------------------------------------------------------

    def _float_scales(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sub-block of xs (n × subs × S) the best candidate float (scale, minimum
        ≥ 0) with codes against it: ŵ = scale·q − minimum (signed scale, minimum 0 for
        the symmetric types)."""
        best = None
        for fraction in RANGE_FRACTIONS:
            if self.with_min:
                lo, hi = xs.amin(dim=2, keepdim=True), xs.amax(dim=2, keepdim=True)
                centre, half = (lo + hi) / 2, (hi - lo) * fraction / 2
                low = torch.clamp(centre - half, max=0.0)  # the stored minimum is −dmin·m ≤ 0
                scale, minimum = (centre + half - low) / self.top, -low
            else:
                extreme = torch.gather(xs, 2, xs.abs().argmax(dim=2, keepdim=True))
                scale, minimum = extreme * fraction / -self.offset, torch.zeros_like(extreme)
            err = (xs - self.values(self.codes(xs, scale, minimum), scale, minimum)).square().sum(dim=2, keepdim=True)
            if best is None:
                best = scale, minimum, err
            else:
                better = err < best[2]
                best = (torch.where(better, scale, best[0]), torch.where(better, minimum, best[1]),
                        torch.minimum(err, best[2]))  # fmt: skip
        return best[0].squeeze(2), best[1].squeeze(2)

    def _integer_range(self) -> tuple[int, int]:
        """The sub-block scale codes' range."""
        if self.with_min:
            return 0, (1 << self.scale_bits) - 1
        return -(1 << (self.scale_bits - 1)), (1 << (self.scale_bits - 1)) - 1

    def search(self, x: torch.Tensor) -> Params:
        """(d, dmin fp16, n × 1; s, m int32, n × subs) of super-blocks x (n × 256)."""
        xs = self._subs(x)
        scale, minimum = self._float_scales(xs)
        low, high = self._integer_range()
        if self.with_min:
            d = (scale.amax(dim=1, keepdim=True) / high).half()
            dmin = (minimum.amax(dim=1, keepdim=True) / high).half()
        else:  # the sub-block scale of largest magnitude maps to the most negative code
            extreme = torch.gather(scale, 1, scale.abs().argmax(dim=1, keepdim=True))
            d, dmin = (extreme / low).half(), torch.zeros_like(extreme).half()

        def rounded(value: torch.Tensor, step: torch.Tensor, lo: int) -> torch.Tensor:
            step = step.float()
            safe = torch.where(step == 0, torch.ones_like(step), step)
            return torch.where(step == 0, torch.zeros_like(value), torch.round(value / safe)).clamp(lo, high)

        s0 = rounded(scale, d, low)
        m0 = rounded(minimum, dmin, 0) if self.with_min else torch.zeros_like(s0)
        steps = [(ds, dm) for ds in (0, -1, 1) for dm in ((0, -1, 1) if self.with_min else (0,))]
        best_s, best_m, best_err = None, None, None
        for ds, dm in steps:
            s, m = (s0 + ds).clamp(low, high), (m0 + dm).clamp(0, high)
            a, b = (d.float() * s).unsqueeze(2), (dmin.float() * m).unsqueeze(2)
            err = (xs - self.values(self.codes(xs, a, b), a, b)).square().sum(dim=2)
            if best_err is None:
                best_s, best_m, best_err = s, m, err
            else:
                better = err < best_err
                best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
                best_err = torch.minimum(err, best_err)
        return d, dmin, best_s.to(torch.int32), best_m.to(torch.int32)

    # -- bytes -------------------------------------------------------------------------

    def pack(self, q: torch.Tensor, params: Params) -> torch.Tensor:
        d, dmin, s, m = params
        q = q.to(torch.int32)
        if self.bits == 2:
            parts = [(s | (m << 4)).to(torch.uint8), interleave(q, 2, 4, 2), fp16_bytes(d), fp16_bytes(dmin)]
        elif self.bits == 3:
            parts = [interleave(q >> 2, 1, 8, 1), interleave(q, 2, 4, 2), _pack_q3_scales(s + 32), fp16_bytes(d)]
        elif self.bits == 6:
            parts = [interleave(q, 2, 2, 4), interleave(q >> 4, 2, 4, 2), s.to(torch.int8).view(torch.uint8),
                     fp16_bytes(d)]  # fmt: skip
        else:
            parts = [fp16_bytes(d), fp16_bytes(dmin), _pack_scale_min_k4(s, m)]
            if self.bits == 5:
                parts.append(interleave(q >> 4, 1, 8, 1))
            parts.append(interleave(q, 4, 2, 4))
        return torch.cat(parts, dim=1)

    def unpack(self, raw: torch.Tensor) -> tuple[torch.Tensor, Params]:
        if self.bits == 2:
            scales = raw[:, :16].to(torch.int32)
            q = deinterleave(raw[:, 16:80], 2, 4, 2)
            params = raw[:, 80:82], raw[:, 82:84], scales & 15, scales >> 4
        elif self.bits == 3:
            q = deinterleave(raw[:, 32:96], 2, 4, 2) | (deinterleave(raw[:, :32], 1, 8, 1) << 2)
            s = _unpack_q3_scales(raw[:, 96:108]) - 32
            params = raw[:, 108:110], None, s, torch.zeros_like(s)
        elif self.bits == 6:
            q = deinterleave(raw[:, :128], 2, 2, 4) | (deinterleave(raw[:, 128:192], 2, 4, 2) << 4)
            s = raw[:, 192:208].contiguous().view(torch.int8).to(torch.int32)
            params = raw[:, 208:210], None, s, torch.zeros_like(s)
        else:
            s, m = _unpack_scale_min_k4(raw[:, 4:16])
            q = deinterleave(raw[:, -128:], 4, 2, 4)
            if self.bits == 5:
                q = q | (deinterleave(raw[:, 16:48], 1, 8, 1) << 4)
            params = raw[:, :2], raw[:, 2:4], s, m
        d = params[0].contiguous().view(torch.float16)
        dmin = torch.zeros_like(d) if params[1] is None else params[1].contiguous().view(torch.float16)
        return q.float(), (d, dmin, params[2], params[3])


KQuantConfig.presets = {}
KQuantConfig.grids = {}
