"""A linear layer whose frozen weight is stored packed and dequantized on the fly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qpeft.quant import QuantConfig, QuantizedTensor, dequantize, quantize
from qpeft.quant.blockwise import PART_NAMES, part_specs


class QuantLinear(nn.Module):
    """y = x · (deq(Q) + ΔW)ᵀ + b, where Q is a `QuantizedTensor` held as buffers and
    ΔW an optional adapter (`qpeft.modules.adapters`: LQ-LoRA's L1·L2, QWHA's F·T).

    The weight is dequantized in each forward (in the input's dtype) and never kept;
    gradients flow to the input and, when enabled, to the adapter, not to the codes.
    The adapter is applied to the activations, or merged into the dequantized weight
    before the one matmul when that is cheaper for the batch (`merge_cheaper`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: QuantConfig,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        adapter: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        for name, (part_dtype, numel) in part_specs(config, in_features * out_features).items():
            self.register_buffer(name, torch.empty(numel, dtype=part_dtype, device=device))
        self.adapter = adapter
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
        weight = self.dequantized_weight(x.dtype)
        if self.adapter is None:
            return F.linear(x, weight, self.bias)
        if self.adapter.merge_cheaper(x.numel() // x.shape[-1]):
            return F.linear(x, weight + self.adapter.delta_weight(x.dtype), self.bias)
        return F.linear(x, weight, self.bias) + self.adapter(x)

    def extra_repr(self) -> str:
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, config={self.config.name}"
