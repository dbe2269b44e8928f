"""LQ-LoRA's cost table: the price of each candidate config of one matrix, and the
decomposition behind a price.

Costs (§3.2): cost(W, config) = Σ_ij F̂_ij · (W − Q − L1·L2)_ij², the squared error of the
decomposition under that config, weighted by F̂ = (r²)(c²)ᵀ / mean(F): the
row × column (rank-one) reduction of the Fisher diagonal F, scaled so that
ΣF̂ = ΣF, which keeps costs of different matrices comparable. Without a Fisher
F̂ = 1 and the cost is the squared Frobenius error. Given the full diagonal F (a
Fisher calibrated elementwise), the costs are Σ F·δ² with F itself; the low-rank
steps still use the row/column weights.

Running the full alternation for each of the 432 configs is what makes the
reference code need a GPU cluster. The work is shared instead:

* configs that share a `codes_key` (a group; NormalFloat: code bits b and block
  size B0) share the blocks and their exact absmaxes, and differ in how the block
  scales are stored. One `shared_levels` pass per group gives every config's
  quantization of the same input; a format that shares nothing (integer) makes
  one-config groups;
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

Every random sketch is seeded per step (anchor, fit, refinement), so one config's
price can be recomputed alone: `priced_decomposition` reruns its path and returns
the decomposition behind the price, which the split writes (issue 19, cause 3).

`tools/bench_costs.py` measures the time, and the distance to running every
config's own full alternation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qpeft.allocation.costs import element_weights, group_configs
from qpeft.allocation.ilp import REFINED_SETS
from qpeft.methods.lowrank import lowrank_factors
from qpeft.methods.lqlora.alternation import Alternation, alternate, row_space, weighted_error
from qpeft.quant import QuantConfig, simulate

Price = Callable[[torch.Tensor], float]  # δ = W − Q − L1·L2 → its cost


def cost_measure(
    weight: torch.Tensor,
    row_weight: torch.Tensor | None,
    col_weight: torch.Tensor | None,
    fisher: torch.Tensor | None = None,
    second_moment: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, Price]:
    """The elementwise weights of the costs (None: all ones, or not elementwise) and
    the price of a difference δ:

    * Σ F̂·δ² = ‖diag(r)·δ·diag(c)‖²_F / mean(F), the row × column Fisher (§3.2);
    * Σ F·δ² given the full Fisher diagonal `fisher`;
    * K-FAC given the layer input's second moment Σ = XᵀX / tokens: Σ_i a_i·δ_i Σ δ_iᵀ
      with a_i = r_i² / mean(diag Σ), the output-gradient energy of row i times the
      full input covariance (without a Fisher a_i = 1 / mean(diag Σ)). For a diagonal
      Σ proportional to the Fisher's column means it equals Σ F̂·δ², so costs of
      different matrices stay on the Fisher's scale; unlike F̂ it sees correlated
      input errors, which GPTQ rounding trades on."""
    if second_moment is not None:
        sigma = second_moment.to(device=weight.device, dtype=torch.float32)
        row_mean = torch.ones(weight.shape[0], device=weight.device) if row_weight is None else row_weight.square()
        energy = row_mean.float() / sigma.diagonal().mean().clamp(min=1e-30)

        def price_kfac(diff: torch.Tensor) -> float:
            return float(((diff @ sigma) * diff).sum(dim=1) @ energy)

        return None, price_kfac
    if fisher is None:
        weights = element_weights(tuple(weight.shape), row_weight, col_weight)
        fisher_mean = 1.0 if weights is None else float(row_weight.float().square().mean())

        def price(diff: torch.Tensor) -> float:
            return weighted_error(diff, row_weight, col_weight) ** 2 / fisher_mean

        return weights, price
    weights = fisher.to(device=weight.device, dtype=torch.float32)

    def price_elementwise(diff: torch.Tensor) -> float:
        return float((weights * diff.square()).sum())

    return weights, price_elementwise


# (L1, L2, config) → W − Ŵ as the split stores it: Q in the rounding that is written
Written = Callable[[torch.Tensor, torch.Tensor, QuantConfig], torch.Tensor]


@dataclass
class Priced:
    """A decomposition Q = quant(quant_input), L1·L2 = left @ right, its cost, and the
    step of the table's path it came from (anchor, fit or refined)."""

    quant_input: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    cost: float
    source: str


@dataclass
class _Path:
    """What the table's path of one config needs besides the config."""

    weight: torch.Tensor
    rank: int
    row_weight: torch.Tensor | None
    col_weight: torch.Tensor | None
    seed: int
    max_iters: int
    rel_tol: float
    refine_iters: int

    def anchor(self, config: QuantConfig) -> Alternation:
        """The group's cold alternation under its anchor (finest scale format)."""
        generator = torch.Generator(device=self.weight.device).manual_seed(self.seed)
        return alternate(
            self.weight,
            lambda x: simulate(x, config),
            self.rank,
            self.row_weight,
            self.col_weight,
            self.max_iters,
            self.rel_tol,
            generator,
            warm_power_iters=1,
        )

    def fit(self, target: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The one-step rank-r fit to W − Q, sketched from the anchor's row space."""
        generator = torch.Generator(device=self.weight.device).manual_seed(self.seed + 2)
        return lowrank_factors(target, self.rank, self.row_weight, self.col_weight, generator, start, power_iters=0)

    def refine(self, config: QuantConfig, init: tuple[torch.Tensor, torch.Tensor]) -> Alternation:
        """A `refine_iters`-step alternation from a config's fit."""
        generator = torch.Generator(device=self.weight.device).manual_seed(self.seed + 1)
        return alternate(
            self.weight,
            lambda x: simulate(x, config),
            self.rank,
            self.row_weight,
            self.col_weight,
            self.refine_iters,
            self.rel_tol,
            generator,
            init=init,
            warm_power_iters=1,
        )


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
    second_moment: torch.Tensor | None = None,
    written: Written | None = None,
) -> np.ndarray:
    """Cost of `weight` (fp32 on its device) under each config, in the order given.

    Each cost is that of a valid decomposition under its config, so an upper bound of
    the best one: the lowest of the config priced on its group anchor's factors, its
    one-step fit, and (for configs on the lower convex hull of the (bits, cost) front,
    or with `refine` "front" / "all" on the front or every config) a
    `refine_iters`-step alternation from that fit.
    `refine_iters=0` stops after the one-step fits. `fisher` (the full Fisher
    diagonal, shaped like `weight`) or `second_moment` (K-FAC) set the measure, as in
    `cost_measure`. With `written` the configs of that set are then priced as the
    split writes them (their best factors, Q in the written rounding), until the set
    holds such prices only: the costs of the configs an allocation picks are those of
    what would be written (issue 19, cause 2)."""
    w = weight.float()
    weights, price = cost_measure(w, row_weight, col_weight, fisher, second_moment)
    path = _Path(w, rank, row_weight, col_weight, seed, max_iters, rel_tol, refine_iters)
    costs = np.empty(len(configs))
    fits: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # config index → its one-step (L1, L2)
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # config index → the (L1, L2) of its price
    for group in group_configs(configs):
        members = [configs[j] for j in group]
        if rank == 0:
            levels = members[0].shared_levels(w)
            if weights is None and second_moment is not None:
                costs[group] = [price(w - levels.values(c, w.shape)) for c in members]
            else:
                costs[group] = levels.errors(members, weights)
            continue
        anchor = path.anchor(members[0])
        residual = w - anchor.left @ anchor.right
        levels = members[0].shared_levels(residual)
        start = row_space(anchor.right, col_weight)
        shared: dict[object, tuple[torch.Tensor, torch.Tensor]] = {}
        for j, config in sorted(zip(group, members, strict=True), key=lambda item: item[1].fit_order):
            quantized = levels.values(config, w.shape)
            target = w - quantized
            if config.fit_key not in shared:
                shared[config.fit_key] = path.fit(target, start)
            left, right = fits[j] = shared[config.fit_key]
            # priced from the values the fit needs anyway: Q(W − L1·L2) on the anchor's
            # factors, then on this config's one-step fit
            on_anchor, on_fit = price(residual - quantized), price(target - left @ right)
            costs[j] = min(on_anchor, on_fit)
            factors[j] = (anchor.left, anchor.right) if on_anchor <= on_fit else fits[j]
    bits = np.array([c.bits_per_param for c in configs])
    refined: set[int] = set()

    # the alternation tracks ‖diag(r)·δ·diag(c)‖, the F̂ price up to mean(F): no re-pricing needed
    fisher_mean = None
    if fisher is None and second_moment is None:
        fisher_mean = 1.0 if row_weight is None or col_weight is None else float(row_weight.float().square().mean())

    def refine_config(j: int) -> None:
        result = path.refine(configs[j], fits[j])
        if fisher_mean is not None:
            cost = result.error**2 / fisher_mean
        else:
            cost = price(w - simulate(result.quant_input, configs[j]) - result.left @ result.right)
        if cost < costs[j]:
            costs[j], factors[j] = cost, (result.left, result.right)
        refined.add(j)

    if rank and refine_iters:
        while todo := set(REFINED_SETS[refine](costs, bits)) - refined:
            for j in sorted(todo):
                refine_config(j)
    if written is None:
        return costs
    none = w.new_zeros(w.shape[0], 0), w.new_zeros(0, w.shape[1])
    as_written: set[int] = set()
    while todo := set(REFINED_SETS[refine](costs, bits)) - as_written:
        for j in sorted(todo):
            if rank and refine_iters and j not in refined:
                refine_config(j)
            costs[j] = price(written(*factors.get(j, none), configs[j]))
            as_written.add(j)
    return costs


def priced_decomposition(
    weight: torch.Tensor,
    configs: Sequence[QuantConfig],
    index: int,
    rank: int,
    row_weight: torch.Tensor | None = None,
    col_weight: torch.Tensor | None = None,
    seed: int = 0,
    max_iters: int = 20,
    rel_tol: float = 1e-3,
    refine_iters: int = 5,
    fisher: torch.Tensor | None = None,
    second_moment: torch.Tensor | None = None,
) -> Priced:
    """The decomposition behind `matrix_costs`' price of `configs[index]` (same
    arguments): its table path rerun alone, refined whether or not the table refined
    it, so that its cost is at most the table's (equal where the table refined it).
    Its factors are those the table priced the written rounding with."""
    w = weight.float()
    config = configs[index]
    _, price = cost_measure(w, row_weight, col_weight, fisher, second_moment)
    if rank == 0:
        none = w.new_zeros(w.shape[0], 0), w.new_zeros(0, w.shape[1])
        return Priced(w, *none, price(w - simulate(w, config)), "anchor")
    path = _Path(w, rank, row_weight, col_weight, seed, max_iters, rel_tol, refine_iters)
    members = [configs[j] for j in next(g for g in group_configs(configs) if index in g)]
    anchor = path.anchor(members[0])
    quant_input = w - anchor.left @ anchor.right
    # the fit is shared with the first config of this fit_key in fit order, as in the table
    sibling = min((c for c in members if c.fit_key == config.fit_key), key=lambda c: c.fit_order)
    start = row_space(anchor.right, col_weight)
    fit = path.fit(w - simulate(quant_input, sibling), start)
    quantized = simulate(quant_input, config)
    candidates = [
        Priced(quant_input, anchor.left, anchor.right, price(w - quantized - anchor.left @ anchor.right), "anchor"),
        Priced(quant_input, *fit, price(w - quantized - fit[0] @ fit[1]), "fit"),
    ]
    if refine_iters:
        result = path.refine(config, fit)
        cost = price(w - simulate(result.quant_input, config) - result.left @ result.right)
        candidates.append(Priced(result.quant_input, result.left, result.right, cost, "refined"))
    return min(candidates, key=lambda c: c.cost)
