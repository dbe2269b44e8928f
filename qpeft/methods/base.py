"""What a decomposition method is: the per-matrix interface the pipeline drives
(`Method`: costs and split) and the plugin that registers it (`MethodPlugin`: its
name, options, command-line flags, recipe keys, calibration and rank limit)."""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from qpeft.quant import QuantConfig, QuantizedTensor
from qpeft.quant.gptq import GPTQSolver

if TYPE_CHECKING:
    from qpeft.calibration.activations import InputGrams
    from qpeft.models.selection import Targets
    from qpeft.stages.decompose import DecomposeRequest

ADAPTER_DTYPE = torch.bfloat16  # L1/L2 and WHT values are stored (and trained) in bf16


@dataclass
class Split:
    """One matrix under its config: Q, the adapter module as it will be stored (its
    state dict goes under NAME.adapter., its spec into the manifest), and what the
    method reports about it."""

    quantized: QuantizedTensor
    adapter: nn.Module | None = None
    report: dict[str, Any] = field(default_factory=dict)


class GPTQSolvers:
    """GPTQ's solvers (`qpeft.quant.gptq`) of the layer inputs' XᵀX for the methods
    that round Q by GPTQ, the last one kept: the matrices that read one input come one
    after another (q, k, v; gate, up), so each input's solver is built once."""

    def __init__(self, grams: InputGrams) -> None:
        self.grams = grams
        self._last: tuple[str, GPTQSolver] | None = None

    def __call__(self, name: str, device: torch.device) -> GPTQSolver:
        """The solver of the input that matrix `name` reads."""
        key = self.grams.owner.get(name, name)
        if self._last is None or self._last[0] != key:
            self._last = (key, GPTQSolver(self.grams.gram(name).to(device)))
        return self._last[1]


class Method(Protocol):
    """A configured decomposition: its costs and its split of one matrix at a given
    rank (the adapter's size, 0 for none). Fields named in `split_only` change the
    split but not the costs (a cost table is reusable across them); `calibrations`
    are the calibration results it holds."""

    name: str
    split_only: tuple[str, ...]

    def costs(self, name: str, weight: torch.Tensor, grid: Sequence[QuantConfig], rank: int) -> np.ndarray: ...

    def split(
        self, name: str, weight: torch.Tensor, config: QuantConfig, rank: int, grid: Sequence[QuantConfig] = ()
    ) -> Split:
        """`weight` under `config` at `rank`; `grid` is the cost table's configs, for a
        method whose split reruns the path that priced `config`."""
        ...

    def calibrations(self) -> dict[str, Any]:
        """Calibration results by manifest key (each with a `metadata` dict), None if unused."""
        ...


@dataclass(frozen=True)
class Needs:
    """What a method's options need before the slow stages: the calibration text,
    the layer inputs' XᵀX (and for what, for the memory check's message)."""

    calibration_text: bool = False
    activations: str | None = None  # what the XᵀX is for, e.g. "QWHA's initialisation"
    activations_hint: str = "select fewer layers (--targets)"


class MethodPlugin(ABC):
    """A registered decomposition method. `options` is a dataclass whose fields are
    its own settings; `flags` names each field's command-line flag (the flags
    `add_flags` adds to `qpeft decompose`, all defaulting to None so that a flag
    given to another method is seen)."""

    name: ClassVar[str]  # --method / recipe method.name
    title: ClassVar[str]  # for messages, e.g. "LQ-LoRA"
    options: ClassVar[type]
    flags: ClassVar[dict[str, str]]
    adapter: ClassVar[type[nn.Module] | None]  # its adapter module (`qpeft.modules.adapters`' interface)
    default_rank: ClassVar[int] = 64  # `--rank` when not given

    @abstractmethod
    def add_flags(self, parser: argparse.ArgumentParser) -> None: ...

    def make_options(self, values: dict[str, Any]) -> Any:
        """The options from the given flags (None: not given, the default)."""
        return self.options(**{k: v for k, v in values.items() if v is not None})

    @abstractmethod
    def check(self, request: DecomposeRequest) -> None:
        """One-line errors for options that cannot work, before any slow step."""

    @abstractmethod
    def needs(self, request: DecomposeRequest) -> Needs: ...

    @abstractmethod
    def build(
        self, request: DecomposeRequest, model_dir: Path, targets: Targets | None, names: list[str], device: str
    ) -> Method:
        """Calibrate what the options need and return the configured method."""

    @abstractmethod
    def max_rank(self, shape: tuple[int, int]) -> int:
        """The largest rank a matrix of `shape` (d_out, d_in) can take."""

    @abstractmethod
    def rank_reason(self, rank: int, shape: tuple[int, int], limit: int) -> str:
        """Why `rank` does not fit `shape` (the end of the one-line error)."""

    @abstractmethod
    def adapter_bits(self, rank: int, shape: tuple[int, int]) -> int:
        """The exact bits of the adapter that `split` stores at `rank` for a matrix of
        `shape` (what `--total-budget` counts beside Q); 0 for rank 0."""

    # its own recipe keys (a dataclass: type hints and defaults), written in the
    # recipe's method section beside the common ones (`qpeft.training.recipe`)
    recipe_section: ClassVar[type | None] = None

    @abstractmethod
    def recipe_options(self, section: Any) -> Any:
        """The options that a recipe's own keys give (a `recipe_section`, or None)."""

    def command_flags(self, options: Any) -> list[str]:
        """The flags of `options` as `qpeft decompose` takes them, those a recipe can
        set (the identity of a training run's base)."""
        return []
