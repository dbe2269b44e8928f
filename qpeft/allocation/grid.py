"""Candidate quantization configs for the budget allocation."""

from __future__ import annotations

from qpeft.errors import QpeftError
from qpeft.quant import QuantConfig, parse_config


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


GRIDS = {"lqlora": lqlora_grid}


def parse_grid(text: str) -> list[QuantConfig]:
    """A named grid ('lqlora') or a comma-separated list of configs/presets."""
    key = text.strip().lower()
    if key in GRIDS:
        return GRIDS[key]()
    configs = [parse_config(part) for part in key.split(",") if part.strip()]
    if not configs:
        raise QpeftError(f"empty config grid {text!r}: name a grid ({', '.join(GRIDS)}) or list configs")
    names = [c.name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise QpeftError(f"the config grid lists {duplicates[0]} twice")
    return configs
