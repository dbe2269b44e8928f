"""LQ-LoRA (Guo et al. 2024): W ≈ Q + L1·L2 by alternating a rank-r SVD and
quantization, Fisher-weighted; its cost table for the ILP (`pricing`), its split,
its options and flags.

The split writes the decomposition the cost table priced (`priced_decomposition`)
unless a cold alternation under the matrix's config does better, so the cost of
what is written is at most the table's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from qpeft.calibration.activations import InputGrams
from qpeft.calibration.fisher import FisherStats
from qpeft.errors import QpeftError
from qpeft.methods.base import ADAPTER_DTYPE, GPTQSolvers, Method, MethodPlugin, Needs, Split
from qpeft.methods.lowrank import lowrank_factors
from qpeft.methods.lqlora.alternation import alternate, row_space, weighted_error
from qpeft.methods.lqlora.pricing import Priced, cost_measure, matrix_costs, priced_decomposition
from qpeft.modules.adapters import LowRankAdapter
from qpeft.quant import QuantConfig, QuantizedTensor, dequantize, quantize, simulate

if TYPE_CHECKING:
    from qpeft.models.selection import Targets
    from qpeft.stages.decompose import DecomposeRequest

ROUNDINGS = ("nearest", "gptq")  # how LQ-LoRA chooses the codes of Q at the split
COSTS = ("fisher", "kfac")  # the cost table's measure (`cost_measure`)


@dataclass
class _Measure:
    """One matrix's weights of the table's measure, and its price of W − Ŵ."""

    row: torch.Tensor | None
    col: torch.Tensor | None
    element: torch.Tensor | None  # the full Fisher diagonal (--fisher-elementwise)
    sigma: torch.Tensor | None  # the input's second moment XᵀX / tokens (kfac)
    price: Callable[[torch.Tensor], float]


def _adapter(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> LowRankAdapter | None:
    """L1·L2 as stored (bf16); None at rank 0."""
    if left.shape[1] == 0:
        return None
    rows, cols = weight.shape
    adapter = LowRankAdapter(cols, rows, left.shape[1], weight.device, ADAPTER_DTYPE)
    adapter.load_state_dict({"left": left, "right": right})
    return adapter


def _stored_diff(weight: torch.Tensor, quantized: QuantizedTensor, adapter: LowRankAdapter | None) -> torch.Tensor:
    """W − Ŵ, Ŵ = deq(Q) + L1·L2 as stored."""
    diff = weight - dequantize(quantized)
    return diff if adapter is None else diff - adapter.delta_weight()


@dataclass
class LQLoRA:
    """W ≈ Q + L1·L2 by alternation, Fisher-weighted when a Fisher is given (LQ-LoRA).

    `rounding` = "gptq" rounds the final Q = quant(W − L1·L2), L1·L2 as stored (bf16),
    with error feedback along the inputs' XᵀX (`qpeft.quant.gptq`, needs `grams`), and
    refits L1·L2 to it. `cost` is the cost table's measure (`cost_measure`): "fisher"
    (Σ F̂·δ², the paper's; the table prices round-to-nearest) or "kfac" (needs
    `grams`; the configs an allocation can pick are priced in the written rounding)."""

    fisher: FisherStats | None = None
    seed: int = 0
    max_iters: int = 20
    rel_tol: float = 1e-3
    refine_iters: int = 5
    refine: str = "hull"  # the configs of each matrix whose costs get refined: hull or front
    rounding: str = "nearest"
    grams: InputGrams | None = None  # XᵀX per layer input, for gptq rounding and kfac costs
    cost: str = "fisher"
    _gptq: GPTQSolvers | None = field(default=None, init=False, repr=False, compare=False)
    name = "lqlora"

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise QpeftError(f"unknown rounding {self.rounding!r}: choose {' or '.join(ROUNDINGS)}")
        if self.cost not in COSTS:
            raise QpeftError(f"unknown cost {self.cost!r}: choose {' or '.join(COSTS)}")
        if self.grams is None and (self.rounding == "gptq" or self.cost == "kfac"):
            need = "gptq rounding" if self.rounding == "gptq" else "kfac costs"
            raise QpeftError(f"{need} needs the calibration activations (XᵀX)")
        if self.grams is not None:
            self._gptq = GPTQSolvers(self.grams)

    @property
    def split_only(self) -> tuple[str, ...]:
        """The settings that change the split but not the costs: kfac costs need the
        XᵀX and price the rounding that is written."""
        return () if self.cost == "kfac" else ("rounding", "grams")

    def _weights(self, name: str, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.fisher is None:
            return None, None
        row, col = self.fisher.weights(name)
        return row.to(device), col.to(device)

    def _measure(self, name: str, weight: torch.Tensor) -> _Measure:
        row, col = self._weights(name, weight.device)
        element = None if self.fisher is None else self.fisher.element.get(name)
        sigma = self.grams.second_moment(name) if self.cost == "kfac" else None
        return _Measure(row, col, element, sigma, cost_measure(weight, row, col, element, sigma)[1])

    def costs(self, name: str, weight: torch.Tensor, grid: Sequence[QuantConfig], rank: int) -> np.ndarray:
        m = self._measure(name, weight)
        written = None
        if self.cost == "kfac" and self.rounding == "gptq":

            def written(left: torch.Tensor, right: torch.Tensor, config: QuantConfig) -> torch.Tensor:
                quantized, adapter, _ = self._gptq_split(name, weight, left, right, config, m)
                return _stored_diff(weight, quantized, adapter)

        return matrix_costs(
            weight,
            grid,
            rank,
            m.row,
            m.col,
            self.seed,
            self.max_iters,
            self.rel_tol,
            self.refine_iters,
            refine=self.refine,
            fisher=m.element,
            second_moment=m.sigma,
            written=written,
        )

    def split(
        self, name: str, weight: torch.Tensor, config: QuantConfig, rank: int, grid: Sequence[QuantConfig] = ()
    ) -> Split:
        """Q + L1·L2 of `weight` under `config`, from the decomposition the cost table
        priced (`grid` its configs, `priced_decomposition`; none without a table) or
        from a cold alternation under `config`, whichever costs less as stored (after
        GPTQ and the refit, with gptq rounding). The report's `cost` is that of what is
        stored, in the table's measure."""
        m = self._measure(name, weight)
        best: tuple[float, Split, torch.Tensor] | None = None
        for candidate in self._candidates(weight, config, rank, list(grid), m):
            report: dict[str, Any] = {"rank": rank, "init": candidate.source}
            if self.rounding == "gptq":
                quantized, adapter, ratio = self._gptq_split(name, weight, candidate.left, candidate.right, config, m)
                if ratio is not None:
                    report["refit_error_ratio"] = ratio
                split = Split(quantized, adapter, report)
            else:
                adapter = _adapter(weight, candidate.left, candidate.right)
                split = Split(quantize(candidate.quant_input, config), adapter, report)
            diff = _stored_diff(weight, split.quantized, split.adapter)
            cost = m.price(diff)
            if best is None or cost < best[0]:
                best = cost, split, diff
        cost, split, diff = best
        split.report["cost"] = cost
        if m.row is not None:
            split.report["weighted_rel_error"] = weighted_error(diff, m.row, m.col) / (
                weighted_error(weight, m.row, m.col) or 1.0
            )
        return split

    def _candidates(
        self, weight: torch.Tensor, config: QuantConfig, rank: int, grid: list[QuantConfig], m: _Measure
    ) -> list[Priced]:
        """The table's path for `config` (when `grid`, the table's configs, holds it) and
        a cold `max_iters` alternation under it (the table's anchor is the group's
        finest scale format, which a cold run under a coarse one can beat); rank 0 has
        one decomposition, Q = quant(W)."""
        candidates = []
        if config in grid or rank == 0:
            grid, index = (grid, grid.index(config)) if config in grid else ([config], 0)
            candidates.append(priced_decomposition(
                weight, grid, index, rank, m.row, m.col, self.seed, self.max_iters, self.rel_tol, self.refine_iters,
                m.element, m.sigma,
            ))  # fmt: skip
        if rank == 0:
            return candidates
        generator = torch.Generator(device=weight.device).manual_seed(self.seed)
        quant = lambda x: simulate(x, config)  # noqa: E731
        cold = alternate(weight, quant, rank, m.row, m.col, self.max_iters, self.rel_tol, generator)
        cost = m.price(weight - simulate(cold.quant_input, config) - cold.left @ cold.right)
        return [*candidates, Priced(cold.quant_input, cold.left, cold.right, cost, "cold")]

    def _gptq_split(
        self, name: str, weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, config: QuantConfig, m: _Measure
    ) -> tuple[QuantizedTensor, LowRankAdapter | None, float | None]:
        """Q rounded by GPTQ to W − L1·L2 as stored (bf16), then L1·L2 refit to it
        (`_refit`). Returns Q, the adapter and the refit's error ratio (None at rank 0)."""
        adapter = _adapter(weight, left, right)
        target = weight if adapter is None else weight - adapter.delta_weight()
        quantized = self._gptq(name, weight.device).quantize(target, config)
        if adapter is None:
            return quantized, None, None
        return quantized, *self._refit(weight, quantized, adapter, m)

    def _refit(
        self, weight: torch.Tensor, quantized: QuantizedTensor, adapter: LowRankAdapter, m: _Measure
    ) -> tuple[LowRankAdapter, float]:
        """L1·L2 refit to what GPTQ's Q left, W − Q (issue 19, cause 4: the factors were
        fitted to a round-to-nearest Q): the best rank-r fit of W − Q under the Fisher
        weights, kept where it lowers the cost as stored. Returns the adapter kept and
        √(cost after / cost before)."""
        residual = weight - dequantize(quantized)
        generator = torch.Generator(device=weight.device).manual_seed(self.seed + 3)
        start = row_space(adapter.right.float(), m.col)
        refit = _adapter(weight, *lowrank_factors(residual, adapter.rank, m.row, m.col, generator, start))
        before = m.price(residual - adapter.delta_weight())
        after = m.price(residual - refit.delta_weight())
        return refit if after < before else adapter, (after / before) ** 0.5 if before else 1.0

    def calibrations(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "grams": self.grams}


@dataclass
class LQLoRAOptions:
    """LQ-LoRA's own settings of `qpeft decompose`."""

    fisher: Path | None = None  # a Fisher file (qpeft calibrate) instead of calibrating
    no_fisher: bool = False  # unweighted decomposition and costs
    fisher_elementwise: bool = False  # price the cost table with the full Fisher diagonal
    rounding: str = "gptq"  # how the codes of Q are chosen at the split
    cost: str = "fisher"  # the cost table's measure: fisher or kfac
    refine_iters: int = 5  # alternation steps of each refined config of the cost table


@dataclass
class LQLoRARecipe:
    """LQ-LoRA's own keys of a recipe's method section."""

    fisher: bool = True  # Fisher-weighted decomposition (false: --no-fisher)
    cost: str = "fisher"  # the cost table's measure (--cost)


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
        "cost": "--cost",
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
        parser.add_argument(
            "--cost",
            choices=list(COSTS),
            default=None,
            help="LQ-LoRA: the cost table's measure: fisher (Σ F̂·δ², the paper's, priced with round-to-nearest; the "
            "default) or kfac (each row's Fisher times the full input covariance XᵀX, which sees correlated input "
            "errors; the configs the allocation can pick are priced with the written rounding)",
        )

    def check(self, request: DecomposeRequest) -> None:
        o = request.options
        if o.cost not in COSTS:
            raise QpeftError(f"unknown --cost {o.cost!r}: choose {' or '.join(COSTS)}")
        if o.cost == "kfac" and o.fisher_elementwise:
            raise QpeftError("--fisher-elementwise prices with the diagonal Fisher: drop it, or --cost kfac")
        if o.refine_iters < 0:
            raise QpeftError(f"--refine-iters must be 0 or more, got {o.refine_iters}")
        if o.no_fisher and o.fisher_elementwise:
            raise QpeftError("--fisher-elementwise needs a Fisher: drop --no-fisher")
        if o.rounding not in ROUNDINGS:
            raise QpeftError(f"unknown rounding {o.rounding!r}: choose {' or '.join(ROUNDINGS)}")

    def needs(self, request: DecomposeRequest) -> Needs:
        o = request.options
        gptq, kfac = o.rounding == "gptq", o.cost == "kfac"
        return Needs(
            calibration_text=gptq or kfac or (not o.no_fisher and o.fisher is None),
            activations="kfac costs" if kfac else "gptq rounding" if gptq else None,
            activations_hint="use --cost fisher" if kfac else "use --rounding nearest (the paper's rounding, no XᵀX)",
        )

    def build(
        self, request: DecomposeRequest, model_dir: Path, targets: Targets | None, names: list[str], device: str
    ) -> Method:
        from qpeft.calibration.cache import calibrate, calibrate_activations, fisher_for

        r, o = request, request.options
        calib = r.calib.with_elementwise(o.fisher_elementwise)
        statistics = None
        if o.fisher is not None:
            statistics = fisher_for(o.fisher, names, o.fisher_elementwise)
        elif not o.no_fisher:
            # gptq rounding and kfac costs also need the inputs' XᵀX: collected in the Fisher's pass
            grams_too = o.rounding == "gptq" or o.cost == "kfac"
            sampling, elementwise = calib.sampling(), o.fisher_elementwise
            statistics = calibrate(model_dir, targets, *sampling, device, calib.dtype, None, elementwise, grams_too)[0]
        grams = None
        if o.rounding == "gptq" or o.cost == "kfac":
            grams = calibrate_activations(model_dir, targets, *calib.sampling(), device, calib.dtype)[0]
        return LQLoRA(
            statistics, r.seed, refine_iters=o.refine_iters, refine=r.refine, rounding=o.rounding, grams=grams,
            cost=o.cost,
        )  # fmt: skip

    def max_rank(self, shape: tuple[int, int]) -> int:
        return LowRankAdapter.max_rank(shape)

    def rank_reason(self, rank: int, shape: tuple[int, int], limit: int) -> str:
        return LowRankAdapter.rank_reason(rank, shape, limit)

    def adapter_bits(self, rank: int, shape: tuple[int, int]) -> int:
        return LowRankAdapter.stored_bits(rank, shape, ADAPTER_DTYPE)

    def recipe_options(self, section: LQLoRARecipe) -> LQLoRAOptions:
        return LQLoRAOptions(no_fisher=not section.fisher, cost=section.cost)

    def command_flags(self, options: LQLoRAOptions) -> list[str]:
        flags = ["--no-fisher"] if options.no_fisher else []
        return flags + (["--cost", options.cost] if options.cost != "fisher" else [])
