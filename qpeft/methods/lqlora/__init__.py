"""LQ-LoRA (Guo et al. 2024): W ≈ Q + L1·L2 by alternating a rank-r SVD and
quantization, Fisher-weighted; its cost table for the ILP, its split, its options
and flags.

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

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from qpeft.allocation.costs import element_weights, group_configs
from qpeft.allocation.ilp import REFINED_SETS
from qpeft.calibration.activations import InputGrams
from qpeft.calibration.fisher import FisherStats
from qpeft.errors import QpeftError
from qpeft.methods.base import ADAPTER_DTYPE, GPTQSolvers, Method, MethodPlugin, Needs, Split
from qpeft.methods.lowrank import lowrank_factors
from qpeft.methods.lqlora.alternation import alternate, lq_decompose, row_space, weighted_error
from qpeft.modules.adapters import LowRankAdapter
from qpeft.quant import QuantConfig, dequantize, simulate

if TYPE_CHECKING:
    from qpeft.stages.decompose import DecomposeRequest

ROUNDINGS = ("nearest", "gptq")  # how LQ-LoRA chooses the codes of Q at the split


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
        if rank == 0:
            costs[group] = levels.errors(members, weights)
            continue
        start = row_space(anchor.right, col_weight)
        shared: dict[object, tuple[torch.Tensor, torch.Tensor]] = {}
        for j, config in sorted(zip(group, members, strict=True), key=lambda item: item[1].fit_order):
            quantized = levels.values(config, w.shape)
            target = w - quantized
            if config.fit_key not in shared:
                shared[config.fit_key] = lowrank_factors(
                    target, rank, row_weight, col_weight, step_generator, start, power_iters=0
                )
            left, right = fits[j] = shared[config.fit_key]
            # priced from the values the fit needs anyway: Q(W − L1·L2) on the anchor's
            # factors, then on this config's one-step fit
            costs[j] = min(price(residual - quantized), price(target - left @ right))
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


@dataclass
class LQLoRA:
    """W ≈ Q + L1·L2 by alternation, Fisher-weighted when a Fisher is given (LQ-LoRA).

    `rounding` = "gptq" rounds the final Q = quant(W − L1·L2), L1·L2 the alternation's
    best iterate as stored (bf16), with error feedback along the inputs' XᵀX
    (`qpeft.quant.gptq`, needs `grams`); the costs stay those of round-to-nearest."""

    fisher: FisherStats | None = None
    seed: int = 0
    max_iters: int = 20
    rel_tol: float = 1e-3
    refine_iters: int = 5
    refine: str = "hull"  # the configs of each matrix whose costs get refined: hull or front
    rounding: str = "nearest"
    grams: InputGrams | None = None  # XᵀX per layer input, for gptq rounding
    _gptq: GPTQSolvers | None = field(default=None, init=False, repr=False, compare=False)
    name = "lqlora"
    split_only: ClassVar[tuple[str, ...]] = ("rounding", "grams")

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise QpeftError(f"unknown rounding {self.rounding!r}: choose {' or '.join(ROUNDINGS)}")
        if self.rounding == "gptq" and self.grams is None:
            raise QpeftError("gptq rounding needs the calibration activations (XᵀX)")
        if self.grams is not None:
            self._gptq = GPTQSolvers(self.grams)

    def _weights(self, name: str, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.fisher is None:
            return None, None
        row, col = self.fisher.weights(name)
        return row.to(device), col.to(device)

    def costs(self, name: str, weight: torch.Tensor, grid: Sequence[QuantConfig], rank: int) -> np.ndarray:
        row, col = self._weights(name, weight.device)
        element = None if self.fisher is None else self.fisher.element.get(name)
        return matrix_costs(
            weight,
            grid,
            rank,
            row,
            col,
            self.seed,
            self.max_iters,
            self.rel_tol,
            self.refine_iters,
            refine=self.refine,
            fisher=element,
        )

    def split(self, name: str, weight: torch.Tensor, config: QuantConfig, rank: int) -> Split:
        row, col = self._weights(name, weight.device)
        result = lq_decompose(weight, config, rank, row, col, self.max_iters, self.rel_tol, self.seed)
        split = Split(result.quantized, report={"rank": rank, "iterations": result.iterations})
        if rank:
            rows, cols = weight.shape
            split.adapter = LowRankAdapter(cols, rows, rank, weight.device, ADAPTER_DTYPE)
            split.adapter.load_state_dict({"left": result.left, "right": result.right})
        if self.rounding == "gptq":
            # round what Q must carry given L1·L2 as stored (bf16)
            target = weight if split.adapter is None else weight - split.adapter.delta_weight()
            split.quantized = self._gptq(name, weight.device).quantize(target, config)
            if split.adapter is not None:
                self._refit(weight, split, row, col)
        if row is not None:
            diff = weight - dequantize(split.quantized)
            if split.adapter is not None:
                diff -= split.adapter.delta_weight()
            split.report["weighted_rel_error"] = weighted_error(diff, row, col) / (
                weighted_error(weight, row, col) or 1.0
            )
        return split

    def _refit(self, weight: torch.Tensor, split: Split, row: torch.Tensor | None, col: torch.Tensor | None) -> None:
        """L1·L2 refit to what GPTQ's Q left, W − Q (issue 19, cause 4): the
        alternation's factors were fitted to the round-to-nearest Q. The refit
        replaces them where it lowers the (Fisher-weighted) error as stored (bf16)."""
        residual = weight - dequantize(split.quantized)
        generator = torch.Generator(device=weight.device).manual_seed(self.seed + 3)
        start = row_space(split.adapter.right.float(), col)
        rank = split.adapter.rank
        left, right = lowrank_factors(residual, rank, row, col, generator, start)
        refit = LowRankAdapter(weight.shape[1], weight.shape[0], rank, weight.device, ADAPTER_DTYPE)
        refit.load_state_dict({"left": left, "right": right})
        before = weighted_error(residual - split.adapter.delta_weight(), row, col)
        after = weighted_error(residual - refit.delta_weight(), row, col)
        split.report["refit_error_ratio"] = after / (before or 1.0)
        if after < before:
            split.adapter = refit

    def calibrations(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "grams": self.grams}


@dataclass
class LQLoRAOptions:
    """LQ-LoRA's own settings of `qpeft decompose`."""

    fisher: Path | None = None  # a Fisher file (qpeft calibrate) instead of calibrating
    no_fisher: bool = False  # unweighted decomposition and costs
    fisher_elementwise: bool = False  # price the cost table with the full Fisher diagonal
    rounding: str = "gptq"  # how the codes of Q are chosen at the split
    refine_iters: int = 5  # alternation steps of each refined config of the cost table


@dataclass
class LQLoRARecipe:
    """LQ-LoRA's own keys of a recipe's method section."""

    fisher: bool = True  # Fisher-weighted decomposition (false: --no-fisher)


class LQLoRAPlugin(MethodPlugin):
    name = "lqlora"
    title = "LQ-LoRA"
    options = LQLoRAOptions
    adapter = LowRankAdapter
    recipe_section = LQLoRARecipe
    flags: ClassVar[dict[str, str]] = {
        "fisher": "--fisher",
        "no_fisher": "--no-fisher",
        "fisher_elementwise": "--fisher-elementwise",
        "rounding": "--rounding",
        "refine_iters": "--refine-iters",
    }

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        fisher = parser.add_mutually_exclusive_group()
        fisher.add_argument("--fisher", type=Path, default=None, help="LQ-LoRA: use this Fisher file (qpeft calibrate)")
        fisher.add_argument(
            "--no-fisher", action="store_true", default=None, help="LQ-LoRA: unweighted decomposition and costs"
        )
        parser.add_argument(
            "--fisher-elementwise",
            action="store_true",
            default=None,
            help="LQ-LoRA: keep the full Fisher diagonal (4 bytes per weight) and price the cost table with it "
            "instead of its row/column reduction",
        )
        parser.add_argument(
            "--rounding",
            choices=list(ROUNDINGS)[::-1],
            default=None,
            help="LQ-LoRA: how the codes of Q are chosen once its config is: gptq (error feedback along the "
            "calibration inputs' XᵀX, the default; the storage format is the same) or nearest (round to nearest, "
            "the paper's)",
        )
        parser.add_argument(
            "--refine-iters",
            type=int,
            default=None,
            help="LQ-LoRA: alternation steps given to each refined config of the cost table (default: 5; 0 = none)",
        )

    def check(self, request: DecomposeRequest) -> None:
        o = request.options
        if o.refine_iters < 0:
            raise QpeftError(f"--refine-iters must be 0 or more, got {o.refine_iters}")
        if o.no_fisher and o.fisher_elementwise:
            raise QpeftError("--fisher-elementwise needs a Fisher: drop --no-fisher")
        if o.rounding not in ROUNDINGS:
            raise QpeftError(f"unknown rounding {o.rounding!r}: choose {' or '.join(ROUNDINGS)}")

    def needs(self, request: DecomposeRequest) -> Needs:
        o = request.options
        gptq = o.rounding == "gptq"
        return Needs(
            calibration_text=gptq or (not o.no_fisher and o.fisher is None),
            activations="gptq rounding" if gptq else None,
            activations_hint="use --rounding nearest (the paper's rounding, no XᵀX)",
        )

    def build(
        self, request: DecomposeRequest, model_dir: Path, targets: tuple[str, ...], names: list[str], device: str
    ) -> Method:
        from qpeft.calibration.cache import calibrate, calibrate_activations, fisher_for

        r, o = request, request.options
        calib = r.calib.with_elementwise(o.fisher_elementwise)
        statistics = None
        if o.fisher is not None:
            statistics = fisher_for(o.fisher, names, o.fisher_elementwise)
        elif not o.no_fisher:
            # gptq rounding also needs the inputs' XᵀX: collected in the Fisher's pass
            sampling, elementwise, gptq = calib.sampling(), o.fisher_elementwise, o.rounding == "gptq"
            statistics = calibrate(model_dir, targets, *sampling, device, calib.dtype, None, elementwise, gptq)[0]
        grams = None
        if o.rounding == "gptq":
            grams = calibrate_activations(model_dir, targets, *calib.sampling(), device, calib.dtype)[0]
        return LQLoRA(
            statistics, r.seed, refine_iters=o.refine_iters, refine=r.refine, rounding=o.rounding, grams=grams
        )

    def max_rank(self, shape: tuple[int, int]) -> int:
        return LowRankAdapter.max_rank(shape)

    def rank_reason(self, rank: int, shape: tuple[int, int], limit: int) -> str:
        return LowRankAdapter.rank_reason(rank, shape, limit)

    def adapter_bits(self, rank: int, shape: tuple[int, int]) -> int:
        return LowRankAdapter.stored_bits(rank, shape, ADAPTER_DTYPE)

    def recipe_options(self, section: LQLoRARecipe) -> LQLoRAOptions:
        return LQLoRAOptions(no_fisher=not section.fisher)

    def command_flags(self, options: LQLoRAOptions) -> list[str]:
        return ["--no-fisher"] if options.no_fisher else []
