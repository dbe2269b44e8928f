"""Trainable high-precision residuals over a frozen quantized base: ΔW of W ≈ Q + ΔW.

Each adapter kind is an nn.Module with
* `forward(x)`: its contribution x·ΔWᵀ, computed without forming ΔW when cheaper;
* `delta_weight(dtype)`: ΔW itself (d_out × d_in);
* `merge_cheaper(tokens)`: whether adding ΔW to the dequantized base before the one
  matmul is cheaper than `forward` for a batch of `tokens` rows;
* `spec()`: the JSON the checkpoint manifest stores to rebuild it;
* `from_spec(spec, in_features, out_features, device, dtype)`: the empty adapter
  of a spec (`qpeft.methods.build_adapter`).
The low-rank adapter is here because QLoRA's fresh LoRA and LQ-LoRA share it; a
method's own kind lives in its package (QWHA's WHTAdapter) and is registered through
its plugin's `adapter`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class LowRankAdapter(nn.Module):
    """ΔW = s·L1·L2 with L1 (d_out × r) = `left`, L2 (r × d_in) = `right` and s =
    `scale` (LoRA's alpha / r; 1 for LQ-LoRA, whose L1·L2 is the decomposition's)."""

    kind = "lowrank"

    def __init__(
        self, in_features: int, out_features: int, rank: int, device=None, dtype=None, scale: float = 1.0
    ) -> None:
        super().__init__()
        self.rank, self.scale = rank, scale
        self.left = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype), False)
        self.right = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype), False)

    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """LoRA's initialisation (Hu et al. 2021; peft's): L2 Kaiming-uniform, L1 = 0, so ΔW = 0.
        Drawn on the generator's device (the CPU's by default) and copied: the same
        values on every device, and a CPU generator never meets a CUDA tensor."""
        bound = 1.0 / math.sqrt(self.right.shape[1])  # kaiming_uniform_(a=√5) on a fan-in of d_in
        where = generator.device if generator is not None else "cpu"
        with torch.no_grad():
            draw = torch.empty(self.right.shape, dtype=torch.float32, device=where)
            self.right.copy_(draw.uniform_(-bound, bound, generator=generator))
            self.left.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(F.linear(x, self.right.to(x.dtype)), self.left.to(x.dtype))
        return out if self.scale == 1.0 else out * self.scale

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        delta = self.left.to(dtype) @ self.right.to(dtype)
        return delta if self.scale == 1.0 else delta * self.scale

    @staticmethod
    def max_rank(shape: tuple[int, int]) -> int:
        """The largest rank of L1·L2 for a (d_out, d_in) matrix."""
        return min(shape)

    @staticmethod
    def rank_reason(rank: int, shape: tuple[int, int], limit: int) -> str:
        return f"a low-rank L1·L2 has rank at most {limit}"

    @staticmethod
    def stored_bits(rank: int, shape: tuple[int, int], dtype: torch.dtype) -> int:
        """Bits of L1 (d_out × r) and L2 (r × d_in) stored in `dtype`: r·(d_out + d_in)·bits(dtype)."""
        rows, cols = shape
        return rank * (rows + cols) * torch.finfo(dtype).bits

    def merge_cheaper(self, tokens: int) -> bool:
        return False  # r·(d_in + d_out) per token: never worth a d_out × d_in product here

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank} | ({} if self.scale == 1.0 else {"scale": self.scale})

    @classmethod
    def from_spec(cls, spec: dict[str, Any], in_features: int, out_features: int, device, dtype) -> LowRankAdapter:
        return cls(in_features, out_features, int(spec["rank"]), device, dtype, float(spec.get("scale", 1.0)))
