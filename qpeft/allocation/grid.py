"""Candidate quantization configs for the budget allocation."""

from __future__ import annotations

from qpeft.quant import QuantConfig


def lqlora_grid() -> list[QuantConfig]:
    """LQ-LoRA's grid (§3.2): b ∈ {2,3,4,8}, b0 ∈ {2,3,4,8}, b1 ∈ {bf16, fp16, fp32},
    B0 ∈ {16,32,64}, B1 ∈ {16,64,256}: 432 configs from 2.032 to 8.625 bits/param."""
    return [
        QuantConfig(bits, block, scale_bits, scale_block, dtype)
        for bits in (2, 3, 4, 8)
        for scale_bits in (2, 3, 4, 8)
        for dtype in ("bf16", "fp16", "fp32")
        for block in (16, 32, 64)
        for scale_block in (16, 64, 256)
    ]
