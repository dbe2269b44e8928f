"""QWHA: W ≈ Q + F·T, Q = quant(W) and F a sparse Walsh–Hadamard-domain adapter
initialised to cancel the quantization error on the calibration activations; its
cost table for the ILP, its split, its options and flags."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from qpeft.allocation.costs import group_configs, scale_format_errors
from qpeft.allocation.ilp import REFINED_SETS
from qpeft.calibration.activations import InputGrams
from qpeft.errors import QpeftError
from qpeft.methods.base import ADAPTER_DTYPE, Method, MethodPlugin, Needs, Split
from qpeft.methods.qwha.adapter import WHTAdapter
from qpeft.methods.qwha.solver import QWHASolver, parameter_count
from qpeft.quant import QuantConfig, dequantize, quantize, simulate
from qpeft.transforms.hadamard import walsh_hadamard

if TYPE_CHECKING:
    from qpeft.models.selection import Targets
    from qpeft.stages.decompose import DecomposeRequest


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


@dataclass
class QWHA:
    """W ≈ Q + F·T: Q = quant(W), F the sparse Walsh–Hadamard spectrum initialised to
    cancel W − deq(Q) on the calibration activations (QWHA), n = rank·(d_in + d_out)."""

    grams: InputGrams
    alpha: float = 1.0
    refine: str = "hull"  # the configs of each matrix given an exact init: hull or front
    name = "qwha"
    split_only: ClassVar[tuple[str, ...]] = ()

    def _solver(self, name: str, device: torch.device) -> QWHASolver:
        moment = self.grams.second_moment(name).to(device)
        return QWHASolver(moment, transform=walsh_hadamard(moment.shape[0]))

    def costs(self, name: str, weight: torch.Tensor, grid: Sequence[QuantConfig], rank: int) -> np.ndarray:
        count = parameter_count(rank, tuple(weight.shape))
        return qwha_matrix_costs(weight, grid, self._solver(name, weight.device), count, self.alpha, self.refine)

    def split(
        self, name: str, weight: torch.Tensor, config: QuantConfig, rank: int, grid: Sequence[QuantConfig] = ()
    ) -> Split:
        quantized = quantize(weight, config)
        report: dict[str, Any] = {"rank": rank}
        if rank == 0:
            return Split(quantized, report=report)
        solver = self._solver(name, weight.device)
        init = solver.init(weight - dequantize(quantized), parameter_count(rank, tuple(weight.shape)), self.alpha)
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

    def calibrations(self) -> dict[str, Any]:
        return {"fisher": None, "grams": self.grams}


@dataclass
class QWHAOptions:
    """QWHA's own settings of `qpeft decompose`."""

    alpha: float = 1.0  # positions per row ∝ (transformed error norm)^alpha


class QWHAPlugin(MethodPlugin):
    name = "qwha"
    title = "QWHA"
    options = QWHAOptions
    adapter = WHTAdapter
    flags: ClassVar[dict[str, str]] = {"alpha": "--alpha"}

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--alpha",
            type=float,
            default=None,
            help="QWHA: positions per row ∝ (transformed error norm)^alpha (default: 1)",
        )

    def check(self, request: DecomposeRequest) -> None:
        if request.options.alpha < 0:
            raise QpeftError(f"--alpha must be 0 or more, got {request.options.alpha}")

    def needs(self, request: DecomposeRequest) -> Needs:
        return Needs(calibration_text=True, activations="QWHA's initialisation")

    def build(
        self, request: DecomposeRequest, model_dir: Path, targets: Targets | None, names: list[str], device: str
    ) -> Method:
        from qpeft.calibration.cache import calibrate_activations

        calib = request.calib
        grams = calibrate_activations(model_dir, targets, *calib.sampling(), device, calib.dtype)[0]
        return QWHA(grams, request.options.alpha, request.refine)

    def max_rank(self, shape: tuple[int, int]) -> int:
        rows, cols = shape  # rank r stands for r·(d_in + d_out) values
        return rows * cols // (rows + cols)

    def rank_reason(self, rank: int, shape: tuple[int, int], limit: int) -> str:
        rows, cols = shape
        return f"QWHA's {rank * (rows + cols):,} values would exceed its {rows * cols:,} entries (rank at most {limit})"

    def adapter_bits(self, rank: int, shape: tuple[int, int]) -> int:
        if rank == 0:
            return 0
        return WHTAdapter.stored_bits(parameter_count(rank, shape), shape, ADAPTER_DTYPE)

    def recipe_options(self, section: None) -> QWHAOptions:
        return QWHAOptions()
