"""Time the bit-allocation ILP at LLaMA-2-70B size: 560 matrices × the 432-config grid.

    python tools/bench_ilp.py [--matrices 560] [--budget 2.75] [--seed 0]

Costs are synthetic but shaped like real ones: each matrix's error falls roughly
4× per extra code bit, scales with a per-matrix sensitivity, and the scale-storage
choices add noise. Matrix sizes follow LLaMA-2-70B's 80 layers of q, k, v, o, gate,
up, down.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qpeft.allocation import ilp_allocate
from qpeft.quant import parse_grid


def llama70b_numel(matrices: int) -> np.ndarray:
    hidden, kv, inter = 8192, 1024, 28672
    layer = [hidden * hidden, hidden * kv, hidden * kv, hidden * hidden, hidden * inter, hidden * inter, inter * hidden]
    return np.array([layer[i % 7] for i in range(matrices)], dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrices", type=int, default=560)
    parser.add_argument("--budget", type=float, default=2.75)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    grid = parse_grid("lqlora")
    bits = np.array([c.bits_per_param for c in grid])
    code_bits = np.array([c.bits for c in grid], dtype=np.float64)
    numel = llama70b_numel(args.matrices)
    sensitivity = rng.lognormal(0.0, 1.0, size=(args.matrices, 1))
    costs = sensitivity * numel[:, None] * 4.0 ** (-code_bits) * (1 + 0.3 * (bits - code_bits)) ** -1
    costs *= rng.uniform(0.95, 1.05, size=costs.shape)
    start = time.perf_counter()
    allocation = ilp_allocate(costs, bits, numel, args.budget)
    seconds = time.perf_counter() - start
    print(
        f"{args.matrices} matrices × {len(grid)} configs = {costs.size} binaries, "
        f"{allocation.kept_variables} after Pareto pruning; budget {args.budget}: "
        f"average {allocation.average_bits:.4f} bits, status {allocation.status}, solved in {seconds:.2f} s"
    )


if __name__ == "__main__":
    main()
