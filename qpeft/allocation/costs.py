"""The cost of every (matrix, config) pair for the bit allocation (LQ-LoRA §3.2).

cost(W, config) = Σ_ij F̂_ij · (W − Q − L1·L2)_ij², the squared error of the
decomposition under that config, weighted by F̂ = (r²)(c²)ᵀ / mean(F): the
row × column (rank-one) reduction of the Fisher diagonal F, scaled so that
ΣF̂ = ΣF, which keeps costs of different matrices comparable. Without a Fisher
F̂ = 1 and the cost is the squared Frobenius error. Given the full diagonal F (a
Fisher calibrated elementwise), the costs are Σ F·δ² with F itself; the low-rank
steps still use the row/column weights.

Running the full alternation for each of the 432 configs is what makes the
reference code need a GPU cluster. The work is shared instead:

* configs that share a `codes_key` (a group; NormalFloat: code bits b and block
  size B0) choose the same codes for a given input (NF codes are picked against the
  exact block absmax), so they differ only in the block scales. One
  `shared_levels` pass per group gives every config's quantization of the same
  input; a format that shares nothing (integer) makes one-config groups;
* the alternation runs once per group, cold, under the group's finest scale format
  (its anchor), its warm SVDs with one power iteration instead of two: 0.92–0.94×
  the table's time, optimal allocations 0.03–0.15% costlier (42 SmolLM2 matrices,
  budgets 2.5–6, interleaved A/B);
* every config of the group then takes one step from the anchor: Q = quant(W − L1·L2)
  with its own scales, and the best rank-r fit of W − Q (a sketch started from the
  anchor's row space, no power iteration: 0.89× the time of one, optimal allocations
  within ±0.1%). Pricing configs on the anchor's factors alone is not enough: with
  coarse (2–3 bit, 256-block) scales the configs' own low-rank part absorbs the
  blocks that set the scale range and their error drops up to 3×;
* configs with one `fit_key` (NF: that differ only in the dtype of the second-level
  scales) share one fit, the fp16 member's (the first in `fit_order`), and each
  is priced with its own Q: 0.85× the table's time, optimal allocations within
  0.03% (42 SmolLM2 matrices, budgets 2.5–6). bf16 costs the
  bits of fp16 with a coarser mantissa and fp32 costs more bits, so the siblings'
  fits matter only where they would beat fp16's, and fp16 itself is fitted exactly;
* the configs on the lower convex hull of the matrix's (bits, cost) front, where
  the allocation's choices lie (`hull_configs`), run a short alternation from
  their step, until the hull holds refined configs only. Refining the whole front
  instead (`refine="front"`; SmolLM2: ~77 front configs per matrix, ~20 on the
  hull) takes 1.48× the time for allocations 0.02–0.14% cheaper
  (`tools/bench_costs.py --refine-sets`, docs/RESULTS.md).

With rank 0 the group pass prices every scale format exactly (NF in O(blocks),
`NormalizedBlocks`).

`tools/bench_costs.py` measures the time, and the distance to running every
config's own full alternation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from qpeft.allocation.ilp import REFINED_SETS
from qpeft.decompose.lowrank import lowrank_factors
from qpeft.decompose.lqlora import alternate, row_space, weighted_error
from qpeft.decompose.qwha import QWHASolver
from qpeft.quant import QuantConfig, simulate


def element_weights(
    shape: tuple[int, int], row_weight: torch.Tensor | None, col_weight: torch.Tensor | None
) -> torch.Tensor | None:
    """F̂ = (r²)(c²)ᵀ / mean(F) for row/column weights r = √(row means of F),
    c = √(column means of F); None (all ones) without weights."""
    if row_weight is None or col_weight is None:
        return None
    row_mean, col_mean = row_weight.float().square(), col_weight.float().square()
    fisher_mean = row_mean.mean().clamp(min=1e-30)  # = mean(F) = mean(col_mean)
    return torch.outer(row_mean, col_mean).div_(fisher_mean).reshape(shape)


def scale_format_errors(
    residual: torch.Tensor, configs: Sequence[QuantConfig], weights: torch.Tensor | None = None
) -> list[float]:
    """Σ F̂·(x − deq(quant(x)))² for each config, all sharing one `codes_key`."""
    if any(c.codes_key != configs[0].codes_key for c in configs):
        raise ValueError("scale_format_errors needs configs that share one codes_key")
    return configs[0].shared_levels(residual).errors(configs, weights)


def group_configs(configs: Sequence[QuantConfig]) -> list[list[int]]:
    """Indices of `configs` grouped by `codes_key`; within a group the finest scale
    format (most bits) comes first; groups in `group_order` (NF: rising code bits,
    falling block size), then in order of first appearance."""
    groups: dict[object, list[int]] = {}
    for index, config in enumerate(configs):
        groups.setdefault(config.codes_key, []).append(index)
    ordered = [sorted(members, key=lambda j: -configs[j].bits_per_param) for members in groups.values()]
    return sorted(ordered, key=lambda members: configs[members[0]].group_order)


def matrix_costs(
    weight: torch.Tensor,
    configs: Sequence[QuantConfig],
    rank: int,
    row_weight: torch.Tensor | None = None,
    col_weight: torch.Tensor | None = None,
    seed: int = 0,
    max_iters: int = 20,
    rel_tol: float = 1e-3,
    refine_iters: int = 5,
    refine: str = "hull",
    fisher: torch.Tensor | None = None,
) -> np.ndarray:
    """Cost of `weight` (fp32 on its device) under each config, in the order given.

    Each cost is that of a valid decomposition under its config, so an upper bound of
    the best one: the lowest of the config priced on its group anchor's factors, its
    one-step fit, and (for configs on the lower convex hull of the (bits, cost) front,
    or with `refine` "front" / "all" on the front or every config) a
    `refine_iters`-step alternation from that fit.
    `refine_iters=0` stops after the one-step fits. `fisher` (the full Fisher
    diagonal, shaped like `weight`) prices every decomposition by Σ F·δ² instead
    of F̂."""
    w = weight.float()
    if fisher is None:
        weights = element_weights(tuple(w.shape), row_weight, col_weight)
        fisher_mean = 1.0 if weights is None else float(row_weight.float().square().mean())

        def price(diff: torch.Tensor) -> float:
            return weighted_error(diff, row_weight, col_weight) ** 2 / fisher_mean
    else:
        weights = fisher.to(device=w.device, dtype=torch.float32)

        def price(diff: torch.Tensor) -> float:
            return float((weights * diff.square()).sum())

    costs = np.empty(len(configs))
    fits: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # config index → its one-step (L1, L2)
    step_generator = torch.Generator(device=w.device).manual_seed(seed + 2)
    for group in group_configs(configs):
        members = [configs[j] for j in group]
        generator = torch.Generator(device=w.device).manual_seed(seed)
        anchor = alternate(
            w,
            lambda x, c=members[0]: simulate(x, c),
            rank,
            row_weight,
            col_weight,
            max_iters,
            rel_tol,
            generator,
            warm_power_iters=1,
        )
        residual = w - anchor.left @ anchor.right if rank else w
        levels = members[0].shared_levels(residual)
        costs[group] = levels.errors(members, weights)
        if rank == 0:
            continue
        start = row_space(anchor.right, col_weight)
        shared: dict[object, tuple[torch.Tensor, torch.Tensor]] = {}
        for j, config in sorted(zip(group, members, strict=True), key=lambda item: item[1].fit_order):
            target = w - levels.values(config, w.shape)
            if config.fit_key not in shared:
                shared[config.fit_key] = lowrank_factors(
                    target, rank, row_weight, col_weight, step_generator, start, power_iters=0
                )
            left, right = fits[j] = shared[config.fit_key]
            costs[j] = min(costs[j], price(target - left @ right))
    if rank == 0 or refine_iters == 0:
        return costs
    bits = np.array([c.bits_per_param for c in configs])
    refined: set[int] = set()
    while True:
        todo = set(REFINED_SETS[refine](costs, bits)) - refined
        if not todo:
            return costs
        for j in sorted(todo):
            generator = torch.Generator(device=w.device).manual_seed(seed + 1)
            result = alternate(
                w,
                lambda x, c=configs[j]: simulate(x, c),
                rank,
                row_weight,
                col_weight,
                refine_iters,
                rel_tol,
                generator,
                init=fits[j],
                warm_power_iters=1,
            )
            if fisher is None:
                cost = result.error**2 / fisher_mean
            else:  # the best iterate under the row/column weights, priced with F
                cost = price(w - simulate(result.quant_input, configs[j]) - result.left @ result.right)
            costs[j] = min(costs[j], cost)
            refined.add(j)


def qwha_matrix_costs(
    weight: torch.Tensor,
    configs: Sequence[QuantConfig],
    solver: QWHASolver,
    count: int,
    alpha: float = 1.0,
    refine: str = "hull",
) -> np.ndarray:
    """Cost of `weight` under each config for QWHA: the output error (ê − f)G_Z(ê − f)ᵀ
    summed over rows after the QWHA init on E = W − deq(quant(W)), with G the solver's
    input second moment (per token). Only configs the allocation could pick get an
    init of their own:

    * every config is priced by its quantization error weighted by diag(G), in one
      O(numel) pass per (bits, block) group (as for LQ-LoRA's rank 0);
    * the configs on the lower convex hull of the (bits, cost) front (`hull_configs`,
      or the whole front with `refine="front"`) get their init and exact cost; the
      others' estimates are rescaled by the median exact/estimate ratio of the inits
      done so far at the same code bits (the init removes a similar share of the error
      of configs that quantize alike); repeat until the hull holds exact costs only.

    Every cost on the hull is the exact residual of a valid init."""
    w = weight.float()
    diag = solver.gram.diagonal().to(device=w.device, dtype=torch.float32)
    weights = diag.unsqueeze(0).expand(w.shape).contiguous()
    estimate = np.empty(len(configs))
    for group in group_configs(configs):
        members = [configs[j] for j in group]
        estimate[group] = scale_format_errors(w, members, weights)
    bits = np.array([c.bits_per_param for c in configs])
    code_bits = np.array([c.bits for c in configs])
    exact: dict[int, float] = {}
    while True:
        costs = estimate.copy()
        for b in np.unique(code_bits):
            done = [j for j in exact if code_bits[j] == b] or list(exact)
            if done:
                ratio = float(np.median([exact[j] / max(estimate[j], 1e-300) for j in done]))
                costs[code_bits == b] = estimate[code_bits == b] * ratio
        for j, value in exact.items():
            costs[j] = value
        todo = [j for j in REFINED_SETS[refine](costs, bits) if j not in exact]
        if not todo:
            return costs
        for j in todo:
            error = w - simulate(w, configs[j])
            exact[j] = float(solver.init(error, count, alpha).error_after.sum())
