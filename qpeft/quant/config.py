"""What every quantization format provides: `QuantConfig`, the base class of each
format's config, and the format-independent entry points that dispatch to it.

A format is one module under `qpeft.quant.formats` that defines a frozen dataclass
subclassing `QuantConfig` and lists it in `qpeft.quant.formats.FORMATS`. Its config
object is the format: it parses and prints its names, states its stored parts and
their exact bits, quantizes, dequantizes, simulates (deq ∘ quant without packing, for
the searches) and gives GPTQ its per-column rounding (`column_grid`). The cost table
may share work between configs that pick the same codes for the same input
(`codes_key`, `shared_levels`); a format without such sharing returns the config
itself as its key.

Shapes: a matrix is (d_out, d_in); formats that group along the input dimension read
both, blockwise formats only the element count.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from qpeft.quant.tensor import QuantizedTensor

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SCALE_DTYPE_BITS = {"fp16": 16, "bf16": 16, "fp32": 32}

# Elements per chunk of work: 1 Mi values, 4 MiB per fp32 temporary. Measured on
# 2 CPU cores (4096x4096 bf16): faster than 256 Ki or 8 Mi chunks (cache-resident).
DEFAULT_CHUNK = 1 << 20
# On CUDA each torch op costs microseconds of dispatch and launch whatever its size:
# with 1 Mi-value chunks the torch dequantizer ran at 8-58 GB/s on an H200 (host-bound,
# tools/gpu_check.py, 2026-12-04). 16 Mi values: 64 MiB per fp32 temporary.
CUDA_CHUNK = 1 << 24


def chunk_for(device: torch.device, chunk: int | None) -> int:
    """`chunk`, or where None the default chunk of work on `device`'s type."""
    if chunk is not None:
        return chunk
    return CUDA_CHUNK if device.type == "cuda" else DEFAULT_CHUNK


Shape = tuple[int, ...]


def matrix_shape(shape: Shape | torch.Size) -> tuple[int, int]:
    """(rows, columns) of a weight: a matrix as it is, a vector as one row, higher
    ranks with every trailing dimension as columns."""
    shape = tuple(shape)
    if len(shape) < 2:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


class ColumnGrid(Protocol):
    """One matrix's rounding grid with every scale fixed, for GPTQ (`qpeft.quant.gptq`),
    held column by column (the transposed matrix's rows)."""

    def round(self, column: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(int32 codes, dequantized values) of input column j's values (d_out)."""
        ...

    def pack(self, codes: torch.Tensor) -> QuantizedTensor:
        """The stored matrix of these codes (d_out × d_in, int32)."""
        ...


class SharedLevels(Protocol):
    """What configs of one `codes_key` share for one input: their quantization of it."""

    def errors(self, configs: Sequence[QuantConfig], weights: torch.Tensor | None) -> list[float]:
        """Σ w·(x − deq(quant(x)))² of each config (w: elementwise weights, None = 1)."""
        ...

    def values(self, config: QuantConfig, shape: torch.Size) -> torch.Tensor:
        """deq(quant(x)) under `config`, bit for bit as `simulate` gives it."""
        ...


class QuantConfig(ABC):
    """How one matrix is quantized. Subclasses are frozen dataclasses, one per format."""

    family: ClassVar[str]  # the name's prefix, e.g. "nf", "int"
    syntax: ClassVar[str]  # the name's form, for error messages
    presets: ClassVar[dict[str, QuantConfig]]
    grids: ClassVar[dict[str, list[QuantConfig]]]  # named candidate sets for the ILP
    bits: int  # code bits per value

    @classmethod
    @abstractmethod
    def parse(cls, text: str) -> QuantConfig | None:
        """The config named `text` (lower case, no preset), or None if not this format's form."""

    @property
    @abstractmethod
    def name(self) -> str:
        """The full name, which `parse` reads back."""

    def __str__(self) -> str:
        return self.name

    @property
    @abstractmethod
    def bits_per_param(self) -> float:
        """Asymptotic storage in bits per parameter (see `storage_bits` for exact)."""

    @abstractmethod
    def part_specs(self, shape: Shape) -> dict[str, tuple[torch.dtype, int]]:
        """(dtype, number of values) of every stored part of a matrix of `shape`."""

    @abstractmethod
    def storage_bits(self, shape: Shape) -> int:
        """Exact bits stored for a matrix of `shape`, padding included."""

    def holds(self, shape: Shape) -> bool:
        """Whether a matrix of `shape` can take this config (block formats need rows
        that their blocks divide); the allocation leaves the others out."""
        return True

    @abstractmethod
    def quantize(self, weight: torch.Tensor, chunk: int | None, name: str) -> QuantizedTensor: ...

    @abstractmethod
    def dequantize(self, qt: QuantizedTensor, dtype: torch.dtype, chunk: int | None) -> torch.Tensor: ...

    @abstractmethod
    def simulate(self, weight: torch.Tensor) -> torch.Tensor:
        """dequantize(quantize(weight)) in fp32, bit for bit, without packing."""

    @abstractmethod
    def column_grid(self, weight: torch.Tensor) -> ColumnGrid:
        """The grid round-to-nearest would use for `weight` (d_out × d_in, fp32), every
        scale fixed from it, for error-feedback rounding."""

    @property
    def codes_key(self) -> Hashable:
        """Configs with equal keys pick the same codes for the same input."""
        return self

    def shared_levels(self, weight: torch.Tensor) -> SharedLevels:
        """Everything configs of this `codes_key` share for `weight`."""
        return _Simulated(weight, self)

    @property
    def group_order(self) -> tuple[int, ...]:
        """Where this config's `codes_key` group comes in the cost table's work order."""
        return (self.bits,)

    @property
    def fit_key(self) -> Hashable:
        """Configs with equal keys (within a `codes_key` group) share one low-rank fit
        in the cost table: that of the first of them in `fit_order`."""
        return self

    @property
    def fit_order(self) -> int:
        return 0


class _Simulated:
    """`SharedLevels` of a config that shares nothing: its own simulation."""

    def __init__(self, weight: torch.Tensor, config: QuantConfig) -> None:
        self.weight, self.config = weight.float(), config
        self.simulated = config.simulate(self.weight)

    def errors(self, configs: Sequence[QuantConfig], weights: torch.Tensor | None) -> list[float]:
        if any(c != self.config for c in configs):
            raise ValueError(f"{self.config.name} shares its levels with no other config")
        diff = (self.weight - self.simulated).square()
        return [float((diff if weights is None else diff * weights.reshape(diff.shape)).double().sum())]

    def values(self, config: QuantConfig, shape: torch.Size) -> torch.Tensor:
        return self.simulated.reshape(shape)


def quantize(
    weight: torch.Tensor, config: QuantConfig, chunk: int | None = None, name: str = "tensor"
) -> QuantizedTensor:
    """Quantize `weight` (any float dtype, CPU or CUDA) under `config`; `name` is what
    error messages call it."""
    return config.quantize(weight, chunk, name)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32, chunk: int | None = None) -> torch.Tensor:
    """Dequantize to a tensor of `qt.shape` in `dtype` (computed in fp32, then cast),
    in torch ops (`qpeft.kernels.dequantize` adds the compiled fast paths)."""
    return qt.config.dequantize(qt, dtype, chunk)


def simulate(weight: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """dequantize(quantize(weight, config)) in fp32, bit for bit, without packing."""
    return config.simulate(weight)


def storage_bits(config: QuantConfig, shape: Shape | torch.Size) -> int:
    """Exact bits stored for a matrix of `shape` under `config`."""
    return config.storage_bits(tuple(shape))


def bits_per_param(config: QuantConfig) -> float:
    return config.bits_per_param
