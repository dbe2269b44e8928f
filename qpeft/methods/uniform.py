"""Uniform quantization as a decomposition method: W ≈ Q, no adapter. With
`--config` every matrix takes one config; with `--budget` the ILP picks each
matrix's config (mixed precision without an adapter: the peer that shows what an
adapter's bits buy).

Costs: cost(W, config) = ‖W − quant(W)‖²_F, round-to-nearest, priced exactly per
scale format from one `shared_levels` pass per group of configs with one
`codes_key`. Split: Q rounded by GPTQ (Frantar et al. 2023, §3) along the layer
inputs' XᵀX, so that it compares with LQ-LoRA's default rounding; round-to-nearest
uniform quantization is `qpeft quantize`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from qpeft.allocation.costs import group_configs, scale_format_errors
from qpeft.calibration.activations import InputGrams
from qpeft.methods.base import GPTQSolvers, Method, MethodPlugin, Needs, Split
from qpeft.quant import QuantConfig

if TYPE_CHECKING:
    from qpeft.models.selection import Targets
    from qpeft.stages.decompose import DecomposeRequest


def uniform_costs(weight: torch.Tensor, grid: Sequence[QuantConfig]) -> np.ndarray:
    """‖W − quant(W)‖²_F under each config of `grid`, in its order."""
    w = weight.float()
    costs = np.empty(len(grid))
    for group in group_configs(grid):
        costs[group] = scale_format_errors(w, [grid[j] for j in group])
    return costs


@dataclass
class Uniform:
    """Q = GPTQ(W) under each matrix's config; no adapter."""

    grams: InputGrams
    _gptq: GPTQSolvers = field(init=False, repr=False, compare=False)
    name = "uniform"
    split_only: ClassVar[tuple[str, ...]] = ("grams",)

    def __post_init__(self) -> None:
        self._gptq = GPTQSolvers(self.grams)

    def costs(self, name: str, weight: torch.Tensor, grid: Sequence[QuantConfig], rank: int) -> np.ndarray:
        return uniform_costs(weight, grid)

    def split(
        self, name: str, weight: torch.Tensor, config: QuantConfig, rank: int, grid: Sequence[QuantConfig] = ()
    ) -> Split:
        return Split(self._gptq(name, weight.device).quantize(weight.float(), config), report={"rank": 0})

    def calibrations(self) -> dict[str, Any]:
        return {"fisher": None, "grams": self.grams}


@dataclass
class UniformOptions:
    """Uniform quantization has no settings of its own."""


class UniformPlugin(MethodPlugin):
    name = "uniform"
    title = "uniform"
    options = UniformOptions
    adapter = None
    flags: ClassVar[dict[str, str]] = {}
    default_rank = 0

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        pass

    def check(self, request: DecomposeRequest) -> None:
        pass

    def needs(self, request: DecomposeRequest) -> Needs:
        return Needs(
            calibration_text=True,
            activations="gptq rounding",
            activations_hint="select fewer layers (--targets), or use qpeft quantize (round-to-nearest)",
        )

    def build(
        self, request: DecomposeRequest, model_dir: Path, targets: Targets | None, names: list[str], device: str
    ) -> Method:
        from qpeft.calibration.cache import calibrate_activations

        calib = request.calib
        return Uniform(calibrate_activations(model_dir, targets, *calib.sampling(), device, calib.dtype)[0])

    def max_rank(self, shape: tuple[int, int]) -> int:
        return 0

    def rank_reason(self, rank: int, shape: tuple[int, int], limit: int) -> str:
        return "uniform quantization has no adapter (--rank 0)"

    def adapter_bits(self, rank: int, shape: tuple[int, int]) -> int:
        return 0

    def recipe_options(self, section: None) -> UniformOptions:
        return UniformOptions()
