"""Split A/B (issue 19, causes 2 and 3): what LQ-LoRA writes, against what the cost
table priced, on the same SmolLM2 matrices.

The rank-R cost table of the matrices of some decoder layers (Fisher row/column
weights and XᵀX from the default calibration, cached; the full grid) is computed
once; the ILP then picks a config per matrix at each Q-only budget. Each chosen
(matrix, config) is split three ways, one after the other per matrix so that a drift
in the machine's speed falls on all alike:

* `cold`: the split before the change, a cold 20-step alternation under the config;
* `table`: the current split, the cheaper of the table's path rerun alone
  (`priced_decomposition`) and the cold alternation;
* `gptq`: the current split with GPTQ rounding (what `qpeft decompose` writes by
  default), L1·L2 refit to GPTQ's Q.

Costs are in the table's measure (Σ F̂·δ², L1/L2 as stored, bf16); the output error
is Σ_i δ_i·XᵀX·δ_iᵀ / tokens, what GPTQ minimises. Prints, per budget, the ILP
optimum (the table's Σ cost) and each split's Σ cost and output error as ratios, and
each split's seconds.

    OMP_NUM_THREADS=1 python tools/ab_split.py
    OMP_NUM_THREADS=1 python tools/ab_split.py --layers 0,10,20 --budgets 2.75,3.25
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from qpeft.allocation.cost_table import storage_bits_table
from qpeft.allocation.costs import element_weights
from qpeft.allocation.ilp import ilp_allocate
from qpeft.calibration.activations import InputGrams
from qpeft.calibration.cache import calibrate, calibrate_activations
from qpeft.calibration.fisher import FisherStats
from qpeft.methods.lqlora import LQLoRA
from qpeft.methods.lqlora.alternation import lq_decompose
from qpeft.models.resolve import resolve_model
from qpeft.models.selection import DEFAULT_TARGETS
from qpeft.models.weights import SafetensorsWeights
from qpeft.modules.adapters import LowRankAdapter
from qpeft.quant import dequantize, parse_grid


def stored_delta(quantized, adapter) -> torch.Tensor:
    recon = dequantize(quantized)
    return recon if adapter is None else recon + adapter.delta_weight()


def matrices_of_layers(description: str, layers_help: str) -> tuple[argparse.Namespace, FisherStats, InputGrams, dict]:
    """The A/B tools' command line (--layers, --rank, --budgets), one thread, and the
    default calibration's Fisher and XᵀX (cached) with the chosen layers' SmolLM2
    matrices by name (fp32), sorted."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="0,15,29", help=layers_help)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--budgets", default="2.5,2.75,3.25,4")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = resolve_model(None)
    fisher = calibrate(model_dir, DEFAULT_TARGETS)[0]
    grams = calibrate_activations(model_dir, DEFAULT_TARGETS)[0]
    layers = {int(x) for x in args.layers.split(",")}
    weights = SafetensorsWeights(model_dir)
    names = sorted(n for n in fisher.row_mean if int(n.split(".layers.")[1].split(".")[0]) in layers)
    return args, fisher, grams, {n: weights.tensor(f"{n}.weight").float() for n in names}


def main() -> None:
    args, fisher, grams, tensors = matrices_of_layers(__doc__, "decoder layers whose matrices to split")
    names = list(tensors)
    nearest = LQLoRA(fisher, rounding="nearest")
    gptq = LQLoRA(fisher, rounding="gptq", grams=grams)
    grid = parse_grid("lqlora")
    start = time.perf_counter()
    costs = np.array([nearest.costs(n, tensors[n], grid, args.rank) for n in names])
    seconds = time.perf_counter() - start
    print(f"cost table: {len(names)} matrices × {len(grid)} configs, rank {args.rank}, {seconds:.0f} s")
    shapes = [tuple(tensors[n].shape) for n in names]
    numel = [r * c for r, c in shapes]
    bits = storage_bits_table(grid, shapes)
    budgets = [float(b) for b in args.budgets.split(",")]
    choices = {b: ilp_allocate(costs, bits, numel, b).choice for b in budgets}
    pairs = sorted({(i, j) for choice in choices.values() for i, j in enumerate(choice)})
    results: dict[tuple[int, int], dict[str, tuple[float, float, float]]] = {}
    for i, j in pairs:
        name, w, config = names[i], tensors[names[i]], grid[j]
        row, col = nearest._weights(name, w.device)
        weights_f = element_weights(tuple(w.shape), row, col)
        gram = grams.gram(name).float()

        def measure(recon: torch.Tensor, w=w, weights_f=weights_f, gram=gram) -> tuple[float, float]:
            diff = w - recon
            return float((weights_f * diff.square()).sum()), float(((diff @ gram) * diff).sum()) / grams.tokens

        row_results = {}
        t0 = time.perf_counter()
        old = lq_decompose(w, config, args.rank, row, col)
        adapter = LowRankAdapter(w.shape[1], w.shape[0], args.rank, w.device, torch.bfloat16)
        adapter.load_state_dict({"left": old.left, "right": old.right})
        row_results["cold"] = (*measure(stored_delta(old.quantized, adapter)), time.perf_counter() - t0)
        for key, method in (("table", nearest), ("gptq", gptq)):
            t0 = time.perf_counter()
            split = method.split(name, w, config, args.rank, grid)
            seconds = time.perf_counter() - t0
            row_results[key] = (*measure(stored_delta(split.quantized, split.adapter)), seconds)
        results[(i, j)] = row_results
    print(f"\nLQ-LoRA rank {args.rank}, layers {args.layers} ({len(names)} matrices); costs in the table's measure")
    print("| Q budget | ILP optimum | cold / opt | table / opt | gptq / opt |", end="")
    print(" out err cold | table / cold | gptq / cold |")
    print("|" + "---:|" * 8)
    for b in budgets:
        pick = list(enumerate(choices[b]))
        optimum = float(sum(costs[i, j] for i, j in pick))
        total = {k: np.sum([results[p][k] for p in pick], axis=0) for k in ("cold", "table", "gptq")}
        print(
            f"| {b:g} | {optimum:.5g} | {total['cold'][0] / optimum:.4f} | {total['table'][0] / optimum:.4f} "
            f"| {total['gptq'][0] / optimum:.4f} | {total['cold'][1]:.5g} | {total['table'][1] / total['cold'][1]:.4f} "
            f"| {total['gptq'][1] / total['cold'][1]:.4f} |"
        )
    seconds = {k: sum(r[k][2] for r in results.values()) for k in ("cold", "table", "gptq")}
    print(
        f"\nsplit seconds over {len(pairs)} (matrix, config) pairs: cold {seconds['cold']:.1f}, "
        f"table {seconds['table']:.1f} ({seconds['table'] / seconds['cold']:.2f}x), "
        f"gptq {seconds['gptq']:.1f} ({seconds['gptq'] / seconds['cold']:.2f}x)"
    )


if __name__ == "__main__":
    main()
