"""Cost-measure A/B (issue 19, item 3): LQ-LoRA's cost table in the Fisher measure
(Σ F̂·δ², round-to-nearest prices) against the K-FAC measure (`--cost kfac`, the
pickable configs priced with the GPTQ split), on the same SmolLM2 matrices.

The rank-R tables of the matrices of some decoder layers (the default calibration's
Fisher and XᵀX, cached; the full grid) are computed matrix by matrix, the two
measures in alternating order, one thread, so that a drift in the machine's speed
falls on both alike. At each Q-only budget the ILP picks a config per matrix on each
table, and each pick is split as `qpeft decompose` writes it (GPTQ rounding, L1·L2
refit). Prints, per budget and measure, the ILP optimum, what was written against
it in the same measure, and the written model in three common measures: Fisher
Σ F̂·δ², K-FAC Σ_i a_i·δ_i Σ δ_iᵀ, and the output error Σ_i δ_i Σ δ_iᵀ (Σ = XᵀX /
tokens); then each table's seconds.

    OMP_NUM_THREADS=1 python tools/ab_measures.py
    OMP_NUM_THREADS=1 python tools/ab_measures.py --layers 0,10,20 --budgets 2.75,3.25
"""

from __future__ import annotations

import time

import numpy as np
from ab_split import matrices_of_layers  # tools/ab_split.py, beside this script

from qpeft.allocation.cost_table import storage_bits_table
from qpeft.allocation.ilp import ilp_allocate
from qpeft.methods.lqlora import LQLoRA
from qpeft.methods.lqlora.pricing import cost_measure
from qpeft.quant import dequantize, parse_grid

MEASURES = ("fisher", "kfac")
COMMON = ("Fisher", "K-FAC", "output")


def main() -> None:
    args, fisher, grams, tensors = matrices_of_layers(__doc__, "decoder layers whose matrices to price")
    names = list(tensors)
    methods = {m: LQLoRA(fisher, rounding="gptq", grams=grams, cost=m) for m in MEASURES}
    grid = parse_grid("lqlora")
    costs = {m: np.empty((len(names), len(grid))) for m in MEASURES}
    seconds = dict.fromkeys(MEASURES, 0.0)
    for i, name in enumerate(names):
        for m in MEASURES if i % 2 == 0 else MEASURES[::-1]:
            start = time.perf_counter()
            costs[m][i] = methods[m].costs(name, tensors[name], grid, args.rank)
            seconds[m] += time.perf_counter() - start
    shapes = [tuple(tensors[n].shape) for n in names]
    numel = [r * c for r, c in shapes]
    bits = storage_bits_table(grid, shapes)
    budgets = [float(b) for b in args.budgets.split(",")]
    written: dict[tuple[str, int, int], dict[str, float]] = {}

    def measure_split(m: str, i: int, j: int) -> dict[str, float]:
        """The split `decompose` writes of matrix i under config j with measure m, in
        each measure (and in m's own)."""
        if (m, i, j) not in written:
            name, w = names[i], tensors[names[i]]
            split = methods[m].split(name, w, grid[j], args.rank, grid)
            diff = w - dequantize(split.quantized)
            if split.adapter is not None:
                diff -= split.adapter.delta_weight()
            row, col = fisher.weights(name)
            sigma = grams.second_moment(name).float()
            written[(m, i, j)] = {
                "own": split.report["cost"],
                "Fisher": cost_measure(w, row, col)[1](diff),
                "K-FAC": cost_measure(w, row, col, second_moment=sigma)[1](diff),
                "output": float(((diff @ sigma) * diff).sum()),
            }
        return written[(m, i, j)]

    print(f"LQ-LoRA rank {args.rank}, layers {args.layers} ({len(names)} matrices), GPTQ split as written")
    print("| Q budget | table measure | ILP optimum | written / optimum | Fisher | K-FAC | output error |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for b in budgets:
        totals = {}
        for m in MEASURES:
            choice = ilp_allocate(costs[m], bits, numel, b).choice
            optimum = float(sum(costs[m][i, j] for i, j in enumerate(choice)))
            rows = [measure_split(m, i, j) for i, j in enumerate(choice)]
            totals[m] = {k: sum(r[k] for r in rows) for k in ("own", *COMMON)}
            t = totals[m]
            print(
                f"| {b:g} | {m} | {optimum:.5g} | {t['own'] / optimum:.4f} | {t['Fisher']:.5g} | {t['K-FAC']:.5g} "
                f"| {t['output']:.5g} |"
            )
        ratios = " | ".join(f"{totals['kfac'][k] / totals['fisher'][k]:.4f}" for k in COMMON)
        print(f"| {b:g} | kfac / fisher | | | {ratios} |")
    print(
        f"\ntable seconds ({len(names)} matrices, {len(grid)} configs): fisher {seconds['fisher']:.0f}, "
        f"kfac {seconds['kfac']:.0f} ({seconds['kfac'] / seconds['fisher']:.2f}x)"
    )


if __name__ == "__main__":
    main()
