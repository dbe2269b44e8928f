"""A linear layer whose frozen weight is stored packed and dequantized on the fly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qpeft.kernels import dequantize, fused_dequant_matmul
from qpeft.quant import QuantConfig, QuantizedTensor, quantize


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in: autocast's when it is on (the weight is then
    dequantized straight to it, not dequantized and cast again), else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _QuantMatmul(torch.autograd.Function):
    """y = x·Wᵀ for W = deq(Q) (+ ΔW when `merge`), keeping neither W nor ΔW for the
    backward (QLoRA §3): the backward dequantizes Q again, and a merged adapter
    rebuilds ΔW from its parameters, takes ∂L/∂ΔW = gᵀx and passes it through its
    own ΔW(θ) to get ∂L/∂θ. Between a layer's forward and backward only the packed
    codes, the adapter's parameters and (when merged) the input are held.
    `params` are the adapter's trainable parameters (so that autograd routes their
    gradients here); Q gets none. Unmerged on CUDA, both products are the fused
    dequantize-matmul kernel (`qpeft.kernels`): deq(Q) is never formed at all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear, merge: bool, *params: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        ctx.layer, ctx.merge, ctx.dtype = layer, merge, dtype
        fused = None if merge else fused_dequant_matmul(x.device, layer.config)
        ctx.fused = fused
        if fused is not None:
            return fused(x.to(dtype), layer.quantized)
        weight = layer.dequantized_weight(dtype)
        if merge:
            weight += layer.adapter.delta_weight(dtype)
            ctx.save_for_backward(x, *params)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        layer, dtype = ctx.layer, ctx.dtype
        grad = grad.to(dtype)
        if ctx.fused is not None:
            grad_x = ctx.fused(grad, layer.quantized, transpose=True) if ctx.needs_input_grad[0] else None
            return grad_x, None, None
        weight = layer.dequantized_weight(dtype)
        param_grads: tuple[torch.Tensor | None, ...] = ()
        if ctx.merge:
            x, *params = ctx.saved_tensors
            with torch.enable_grad():
                delta = layer.adapter.delta_weight(dtype)
            if params:
                grad_delta = grad.reshape(-1, grad.shape[-1]).T @ x.to(dtype).reshape(-1, x.shape[-1])
                param_grads = torch.autograd.grad(delta, params, grad_delta, allow_unused=True)
            weight += delta.detach()
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None, *param_grads


class QuantLinear(nn.Module):
    """y = x · (deq(Q) + ΔW)ᵀ + b, where Q is a `QuantizedTensor` held as buffers and
    ΔW an optional adapter (`qpeft.modules.adapters`: LQ-LoRA's L1·L2, QWHA's F·T).

    The weight is dequantized in each forward (in the input's dtype) and never kept;
    gradients flow to the input and, when enabled, to the adapter, not to the codes.
    The adapter is applied to the activations, or merged into the dequantized weight
    before the one matmul when that is cheaper for the batch (`merge_cheaper`). With
    gradients on (training) the matmul keeps no d_out × d_in matrix for its backward,
    merged or not (`_QuantMatmul`).
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
        self.part_names = tuple(config.part_specs((out_features, in_features)))
        for name, (part_dtype, numel) in config.part_specs((out_features, in_features)).items():
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
        parts = {name: getattr(self, name) for name in self.part_names}
        return QuantizedTensor(self.config, (self.out_features, self.in_features), parts)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.quantized, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter_params = () if self.adapter is None or not torch.is_grad_enabled() else self.adapter.parameters()
        trainable = [p for p in adapter_params if p.requires_grad]
        merge = self.adapter is not None and self.adapter.merge_cheaper(x.numel() // x.shape[-1])
        if torch.is_grad_enabled() and (x.requires_grad or trainable):
            # training: nothing d_out × d_in is kept for the backward
            y = _QuantMatmul.apply(x, self, merge, *(trainable if merge else []))
            if self.adapter is not None and not merge:
                y = y + self.adapter(x)
            return y if self.bias is None else y + self.bias.to(y.dtype)  # an fp32 bias keeps y in autocast's dtype
        dtype = compute_dtype(x)
        fused = None if merge else fused_dequant_matmul(x.device, self.config)
        if fused is not None:
            y = fused(x.to(dtype), self.quantized)
            y = y if self.bias is None else y + self.bias.to(y.dtype)
            return y if self.adapter is None else y + self.adapter(x)
        weight = self.dequantized_weight(dtype)
        if self.adapter is None:
            return F.linear(x, weight, self.bias)
        if merge:
            return F.linear(x, weight + self.adapter.delta_weight(dtype), self.bias)
        return F.linear(x, weight, self.bias) + self.adapter(x)

    def extra_repr(self) -> str:
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, config={self.config.name}"


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The model's QuantLinear layers by module name, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}
