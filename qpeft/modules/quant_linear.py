"""A linear layer whose frozen weight is stored packed and dequantized on the fly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qpeft.quant import QuantConfig, QuantizedTensor, dequantize, quantize
from qpeft.quant.blockwise import PART_NAMES, part_specs


class QuantLinear(nn.Module):
    """y = x · deq(Q)ᵀ + (x · L2ᵀ) · L1ᵀ + b, where Q is a `QuantizedTensor` held as
    buffers and L1 (d_out × r), L2 (r × d_in) an optional low-rank part (LQ-LoRA).

    The weight is dequantized in each forward (in the input's dtype) and never kept;
    gradients flow to the input and, when enabled, to L1 and L2, not to the codes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: QuantConfig,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        rank: int = 0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.config, self.rank = in_features, out_features, config, rank
        for name, (part_dtype, numel) in part_specs(config, in_features * out_features).items():
            self.register_buffer(name, torch.empty(numel, dtype=part_dtype, device=device))
        if rank:
            self.lowrank_left = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype), False)
            self.lowrank_right = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype), False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> QuantLinear:
        module = cls(linear.in_features, linear.out_features, config, linear.bias is not None, linear.weight.device)
        module.load_quantized(quantize(linear.weight, config))
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def load_quantized(self, qt: QuantizedTensor) -> None:
        for key, tensor in qt.tensors().items():
            setattr(self, key, tensor)

    @property
    def quantized(self) -> QuantizedTensor:
        parts = {name: getattr(self, name) for name in PART_NAMES if hasattr(self, name)}
        return QuantizedTensor(self.config, (self.out_features, self.in_features), **parts)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.quantized, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        if self.rank:
            out = out + F.linear(F.linear(x, self.lowrank_right.to(x.dtype)), self.lowrank_left.to(x.dtype))
        return out

    def extra_repr(self) -> str:
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, config={self.config.name}, rank={self.rank}"
