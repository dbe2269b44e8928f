"""Decomposition methods of `qpeft decompose`: how one matrix is priced under every
candidate config (the cost table) and split under its chosen config (W ≈ Q + ΔW).

A method is a class with `costs(name, weight, grid)` and `split(name, weight,
config)`, registered in METHODS; the pipeline (`qpeft.pipeline.decompose`) streams
the matrices, runs the ILP and writes the checkpoint for all of them alike. Fields
named in its `split_only` change the split but not the costs, so a cost table can be
reused across them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from qpeft.allocation.costs import matrix_costs, qwha_matrix_costs
from qpeft.calibration.activations import InputGrams
from qpeft.calibration.fisher import FisherStats
from qpeft.decompose.lqlora import lq_decompose, weighted_error
from qpeft.decompose.qwha import QWHASolver, parameter_count
from qpeft.errors import QpeftError
from qpeft.modules.adapters import LowRankAdapter, WHTAdapter
from qpeft.quant import QuantConfig, QuantizedTensor, dequantize, quantize
from qpeft.quant.gptq import GPTQSolver
from qpeft.transforms.hadamard import walsh_hadamard

ADAPTER_DTYPE = torch.bfloat16  # L1/L2 and WHT values are stored (and trained) in bf16
ROUNDINGS = ("nearest", "gptq")  # how LQ-LoRA chooses the codes of Q at the split


@dataclass
class Split:
    """One matrix under its config: Q, the adapter module as it will be stored (its
    state dict goes under NAME.adapter., its spec into the manifest), and what the
    method reports about it."""

    quantized: QuantizedTensor
    adapter: LowRankAdapter | WHTAdapter | None = None
    report: dict[str, Any] = field(default_factory=dict)


class Method(Protocol):
    """A decomposition method: a registered name, its costs and its split."""

    name: str
    rank: int
    split_only: ClassVar[tuple[str, ...]]

    def costs(self, name: str, weight: torch.Tensor, grid: Sequence[QuantConfig]) -> np.ndarray: ...

    def split(self, name: str, weight: torch.Tensor, config: QuantConfig) -> Split: ...


@dataclass
class LQLoRA:
    """W ≈ Q + L1·L2 by alternation, Fisher-weighted when a Fisher is given (LQ-LoRA).

    `rounding` = "gptq" rounds the final Q = quant(W − L1·L2), L1·L2 the alternation's
    best iterate as stored (bf16), with error feedback along the inputs' XᵀX
    (`qpeft.quant.gptq`, needs `grams`); the costs stay those of round-to-nearest."""

    rank: int
    fisher: FisherStats | None = None
    seed: int = 0
    max_iters: int = 20
    rel_tol: float = 1e-3
    refine_iters: int = 5
    refine: str = "hull"  # the configs of each matrix whose costs get refined: hull or front
    rounding: str = "nearest"
    grams: InputGrams | None = None  # XᵀX per layer input, for gptq rounding
    _gptq_cache: tuple[str, GPTQSolver] | None = field(default=None, init=False, repr=False, compare=False)
    name = "lqlora"
    split_only: ClassVar[tuple[str, ...]] = ("rounding", "grams")

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise QpeftError(f"unknown rounding {self.rounding!r}: choose {' or '.join(ROUNDINGS)}")
        if self.rounding == "gptq" and self.grams is None:
            raise QpeftError("gptq rounding needs the calibration activations (XᵀX)")

    def _weights(self, name: str, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.fisher is None:
            return None, None
        row, col = self.fisher.weights(name)
        return row.to(device), col.to(device)

    def _gptq_solver(self, name: str, device: torch.device) -> GPTQSolver:
        """The solver of the input `name` reads, kept for the next matrix that reads
        it too (they come one after another: q, k, v; gate, up)."""
        key = self.grams.owner.get(name, name)
        if self._gptq_cache is None or self._gptq_cache[0] != key:
            self._gptq_cache = (key, GPTQSolver(self.grams.gram(name).to(device)))
        return self._gptq_cache[1]

    def costs(self, name: str, weight: torch.Tensor, grid: Sequence[QuantConfig]) -> np.ndarray:
        row, col = self._weights(name, weight.device)
        element = None if self.fisher is None else self.fisher.element.get(name)
        return matrix_costs(
            weight,
            grid,
            self.rank,
            row,
            col,
            self.seed,
            self.max_iters,
            self.rel_tol,
            self.refine_iters,
            refine=self.refine,
            fisher=element,
        )

    def split(self, name: str, weight: torch.Tensor, config: QuantConfig) -> Split:
        row, col = self._weights(name, weight.device)
        result = lq_decompose(weight, config, self.rank, row, col, self.max_iters, self.rel_tol, self.seed)
        split = Split(result.quantized, report={"rank": self.rank, "iterations": result.iterations})
        if self.rank:
            rows, cols = weight.shape
            split.adapter = LowRankAdapter(cols, rows, self.rank, weight.device, ADAPTER_DTYPE)
            split.adapter.load_state_dict({"left": result.left, "right": result.right})
        if self.rounding == "gptq":
            # round what Q must carry given L1·L2 as stored (bf16)
            target = weight if split.adapter is None else weight - split.adapter.delta_weight()
            split.quantized = self._gptq_solver(name, weight.device).quantize(target, config)
        if row is not None:
            diff = weight - dequantize(split.quantized)
            if split.adapter is not None:
                diff -= split.adapter.delta_weight()
            split.report["weighted_rel_error"] = weighted_error(diff, row, col) / (
                weighted_error(weight, row, col) or 1.0
            )
        return split


@dataclass
class QWHA:
    """W ≈ Q + F·T: Q = quant(W), F the sparse Walsh–Hadamard spectrum initialised to
    cancel W − deq(Q) on the calibration activations (QWHA), n = rank·(d_in + d_out)."""

    rank: int
    grams: InputGrams
    alpha: float = 1.0
    refine: str = "hull"  # the configs of each matrix given an exact init: hull or front
    name = "qwha"
    split_only: ClassVar[tuple[str, ...]] = ()

    def _solver(self, name: str, device: torch.device) -> QWHASolver:
        moment = self.grams.second_moment(name).to(device)
        return QWHASolver(moment, transform=walsh_hadamard(moment.shape[0]))

    def costs(self, name: str, weight: torch.Tensor, grid: Sequence[QuantConfig]) -> np.ndarray:
        count = parameter_count(self.rank, tuple(weight.shape))
        return qwha_matrix_costs(weight, grid, self._solver(name, weight.device), count, self.alpha, self.refine)

    def split(self, name: str, weight: torch.Tensor, config: QuantConfig) -> Split:
        quantized = quantize(weight, config)
        report: dict[str, Any] = {"rank": self.rank}
        if self.rank == 0:
            return Split(quantized, report=report)
        solver = self._solver(name, weight.device)
        init = solver.init(weight - dequantize(quantized), parameter_count(self.rank, tuple(weight.shape)), self.alpha)
        spectrum = init.spectrum
        rows, cols = weight.shape
        adapter = WHTAdapter(cols, rows, spectrum.values.numel(), weight.device, ADAPTER_DTYPE)
        adapter.set_positions(spectrum.values, spectrum.rows, spectrum.cols)
        report |= {
            "values": spectrum.values.numel(),
            "max_per_row": int(init.counts.max()),
            "rows_reset": init.rows_reset,
        }
        return Split(quantized, adapter, report)


METHODS = {"lqlora": LQLoRA, "qwha": QWHA}


def max_rank(method: str, shape: tuple[int, int]) -> int:
    """The largest rank a matrix of `shape` (d_out, d_in) can take: min(d_out, d_in)
    for a low-rank L1·L2 (qlora, lqlora); for QWHA, whose rank r stands for
    r·(d_in + d_out) values, as many as the matrix has entries."""
    rows, cols = shape
    return rows * cols // (rows + cols) if method == "qwha" else min(rows, cols)


def check_rank(method: str, rank: int, shapes: dict[str, tuple[int, int]], what: str) -> None:
    """Error (before any slow work) naming the matrix that cannot take `rank`; `what`
    names the flag or recipe key."""
    if not shapes:
        return
    name = min(shapes, key=lambda n: max_rank(method, shapes[n]))
    rows, cols = shapes[name]
    limit = max_rank(method, shapes[name])
    if rank <= limit:
        return
    if method == "qwha":
        why = f"QWHA's {rank * (rows + cols):,} values would exceed its {rows * cols:,} entries (rank at most {limit})"
    else:
        why = f"a low-rank L1·L2 has rank at most {limit}"
    raise QpeftError(f"{what} {rank} is too large for {name} ({rows}×{cols}): {why}")
