"""`QuantizedTensor`: one matrix's stored parts under its format's config."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qpeft.errors import QpeftError
from qpeft.quant.config import QuantConfig


@dataclass
class QuantizedTensor:
    """Packed storage of one quantized matrix: its config (which is its format), its
    shape, and its parts by name (the format's `part_specs`; e.g. NormalFloat's
    codes / scales / scale_scales / scale_offset, the integer format's codes / scales /
    zeros). Checkpoints store each part as `<matrix>.<part>`."""

    config: QuantConfig
    shape: tuple[int, ...]
    parts: dict[str, torch.Tensor]

    @property
    def format(self) -> str:
        return self.config.family

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by suffix (for checkpoints), in the format's part order."""
        return {name: self.parts[name] for name in self.config.part_specs(self.shape)}

    @classmethod
    def from_tensors(
        cls, config: QuantConfig, shape: tuple[int, ...], tensors: dict[str, torch.Tensor]
    ) -> QuantizedTensor:
        """Rebuild from `tensors()` output, checking every part's dtype and size."""
        names = config.part_specs(tuple(shape))
        qt = cls(config, tuple(shape), {name: tensors[name] for name in names if name in tensors})
        qt.validate()
        return qt

    def validate(self) -> None:
        """Check that every stored tensor has the size the config and shape imply."""
        for key, (dtype, numel) in self.config.part_specs(self.shape).items():
            tensor = self.parts.get(key)
            if tensor is None or tensor.dtype != dtype or tensor.numel() != numel:
                got = "missing" if tensor is None else f"{tensor.dtype} with {tensor.numel()} values"
                raise QpeftError(f"quantized tensor part {key!r} should be {dtype} with {numel} values, got {got}")

    @property
    def device(self) -> torch.device:
        return next(iter(self.parts.values())).device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return QuantizedTensor.from_tensors(
            self.config, self.shape, {k: v.to(device) for k, v in self.tensors().items()}
        )
