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
from qpeft.quant import QuantConfig, dequantize, quantize, simulate

if TYPE_CHECKING:
    from qpeft.stages.decompose import DecomposeRequest

ROUNDINGS = ("nearest", "gptq")  # how LQ-LoRA chooses the codes of Q at the split


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

    def split(
        self, name: str, weight: torch.Tensor, config: QuantConfig, rank: int, grid: Sequence[QuantConfig] = ()
    ) -> Split:
        """Q + L1·L2 of `weight` under `config`: the decomposition the cost table priced
        (`grid` its configs) or a cold alternation under `config`, whichever costs
        less; then, with gptq rounding, Q rounded by GPTQ and L1·L2 refit to it. The
        report's `cost` is that of what is stored, in the table's measure."""
        row, col = self._weights(name, weight.device)
        element = None if self.fisher is None else self.fisher.element.get(name)
        _, price = cost_measure(weight, row, col, element)
        chosen = self._decomposition(weight, config, rank, list(grid) or [config], row, col, element, price)
        split = Split(quantize(chosen.quant_input, config), report={"rank": rank, "init": chosen.source})
        if rank:
            rows, cols = weight.shape
            split.adapter = LowRankAdapter(cols, rows, rank, weight.device, ADAPTER_DTYPE)
            split.adapter.load_state_dict({"left": chosen.left, "right": chosen.right})
        if self.rounding == "gptq":
            # round what Q must carry given L1·L2 as stored (bf16)
            target = weight if split.adapter is None else weight - split.adapter.delta_weight()
            split.quantized = self._gptq(name, weight.device).quantize(target, config)
            if split.adapter is not None:
                self._refit(weight, split, row, col)
        diff = weight - dequantize(split.quantized)
        if split.adapter is not None:
            diff -= split.adapter.delta_weight()
        split.report["cost"] = price(diff)
        if row is not None:
            split.report["weighted_rel_error"] = weighted_error(diff, row, col) / (
                weighted_error(weight, row, col) or 1.0
            )
        return split

    def _decomposition(
        self,
        weight: torch.Tensor,
        config: QuantConfig,
        rank: int,
        grid: list[QuantConfig],
        row: torch.Tensor | None,
        col: torch.Tensor | None,
        element: torch.Tensor | None,
        price: Callable[[torch.Tensor], float],
    ) -> Priced:
        """The cheaper of the table's path for `config` and a cold `max_iters`
        alternation under it (the table's anchor is the group's finest scale format,
        which a cold run under a coarse one can beat)."""
        index = grid.index(config) if config in grid else None
        if index is None:
            grid, index = [config], 0
        priced = priced_decomposition(
            weight, grid, index, rank, row, col, self.seed, self.max_iters, self.rel_tol, self.refine_iters, element
        )
        if rank == 0:
            return priced
        generator = torch.Generator(device=weight.device).manual_seed(self.seed)
        cold = alternate(weight, lambda x: simulate(x, config), rank, row, col, self.max_iters, self.rel_tol, generator)
        cost = price(weight - simulate(cold.quant_input, config) - cold.left @ cold.right)
        return min(priced, Priced(cold.quant_input, cold.left, cold.right, cost, "cold"), key=lambda c: c.cost)

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
