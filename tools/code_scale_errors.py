"""Squared quantization error of NF codes chosen against the exact block absmax
(bitsandbytes' order, which qpeft used for every config before issue 19) against
codes chosen against the stored scale (what qpeft does for 2–4-bit scales), on
synthetic weights, for every config of LQ-LoRA's grid with 2–4-bit scales.

    python tools/code_scale_errors.py [--rows 1024 --cols 4096]

Both are priced under the same stored scales; the ratio absmax-coded / scale-coded
is what coding against the wrong scale costs (≥ 1: per value the scale-coded level
is the nearest one).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from qpeft.quant import parse_grid, simulate
from qpeft.quant.formats.normalfloat import normalized_blocks, scaled_levels

NAMED = ("nf3-b64-s2x256-fp16", "nf4-b16-s2x256-fp16", "nf3-b64-s4x64-fp16", "nf2-b64-s3x256-fp16")


def weights(kind: str, rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=generator)
    # Student-t with 4 degrees of freedom: heavier tails, as LLM weights have
    normal = torch.randn(rows, cols, generator=generator)
    chi2 = torch.randn(4, rows, cols, generator=generator).square().sum(dim=0)
    return normal / (chi2 / 4).sqrt()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=4096)
    args = parser.parse_args()
    configs = [c for c in parse_grid("lqlora") if c.codes_follow_scales]
    generator = torch.Generator().manual_seed(0)
    print(f"{len(configs)} configs with 2-4-bit scales, {args.rows}x{args.cols} weights")
    print(f"{'weights':<10} {'min':>7} {'median':>7} {'max':>7} {'(config of max)':<22} " + "  ".join(NAMED))
    for kind in ("gaussian", "student-t4"):
        w = weights(kind, args.rows, args.cols, generator)
        ratios = {}
        for config in configs:
            _, absmax, levels = normalized_blocks(w, config.bits, config.block_size)
            by_absmax = scaled_levels(levels, absmax, config, w.shape)
            ratios[config.name] = float((w - by_absmax).square().sum() / (w - simulate(w, config)).square().sum())
        low, mid, high = np.quantile(list(ratios.values()), [0, 0.5, 1])
        named = "  ".join(f"{ratios[n]:>{len(n)}.3f}" for n in NAMED)
        worst = max(ratios, key=ratios.get)
        print(f"{kind:<10} {low:>7.3f} {mid:>7.3f} {high:>7.3f} {worst:<22} {named}")


if __name__ == "__main__":
    main()
