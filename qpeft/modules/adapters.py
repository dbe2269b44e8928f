"""Trainable high-precision residuals over a frozen quantized base: ΔW of W ≈ Q + ΔW.

Each adapter kind is an nn.Module with
* `forward(x)`: its contribution x·ΔWᵀ, computed without forming ΔW when cheaper;
* `delta_weight(dtype)`: ΔW itself (d_out × d_in);
* `merge_cheaper(tokens)`: whether adding ΔW to the dequantized base before the one
  matmul is cheaper than `forward` for a batch of `tokens` rows;
* `spec()`: the JSON the checkpoint manifest stores to rebuild it (`build_adapter`).
A new kind is one class here registered in ADAPTERS.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qpeft.errors import QpeftError
from qpeft.transforms.hadamard import walsh_hadamard

# Above this many rows per output channel the WHT adapter is merged into the weight:
# transforming the d_out coefficient rows once is then cheaper than transforming every
# token's activations and gathering (tools/bench_wht_adapter.py, docs/RESULTS.md).
WHT_MERGE_TOKENS_PER_ROW = 0.08


def index_dtype(shape: tuple[int, int]) -> torch.dtype:
    """The narrowest integer type that holds every row and column index of `shape`."""
    return torch.int16 if max(shape) <= torch.iinfo(torch.int16).max else torch.int32


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
        """LoRA's initialisation (Hu et al. 2021; peft's): L2 Kaiming-uniform, L1 = 0, so ΔW = 0."""
        bound = 1.0 / math.sqrt(self.right.shape[1])  # kaiming_uniform_(a=√5) on a fan-in of d_in
        with torch.no_grad():
            self.right.copy_(
                torch.empty_like(self.right, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            )
            self.left.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(F.linear(x, self.right.to(x.dtype)), self.left.to(x.dtype))
        return out if self.scale == 1.0 else out * self.scale

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        delta = self.left.to(dtype) @ self.right.to(dtype)
        return delta if self.scale == 1.0 else delta * self.scale

    def merge_cheaper(self, tokens: int) -> bool:
        return False  # r·(d_in + d_out) per token: never worth a d_out × d_in product here

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank} | ({} if self.scale == 1.0 else {"scale": self.scale})

    @classmethod
    def from_spec(cls, spec: dict[str, Any], in_features: int, out_features: int, device, dtype) -> LowRankAdapter:
        return cls(in_features, out_features, int(spec["rank"]), device, dtype, float(spec.get("scale", 1.0)))


class WHTAdapter(nn.Module):
    """ΔW = F·T (QWHA): F sparse, `values` at (`rows`, `cols`), T the orthonormal
    Walsh–Hadamard transform of width d_in.

    Positions are stored row-major in compressed-row form: `cols` (int16 up to 32767
    columns) and `row_offsets` (d_out + 1, int32), 16 bits per value beside the value
    itself instead of 32 for explicit (row, column) pairs; `rows` is rebuilt on load.

    Two ways to apply it: activations first, x·ΔWᵀ = (x·Tᵀ)·Fᵀ, a transform of each
    token and a gathered product (tokens·(d_in·Σfactors + n) work); or merged, ΔW =
    F·T added to the dequantized base before its matmul (d_out·d_in·Σfactors work,
    independent of the tokens). `merge_cheaper` picks by the measured crossover."""

    kind = "wht"

    def __init__(self, in_features: int, out_features: int, count: int, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.count = in_features, out_features, count
        self.values = nn.Parameter(torch.empty(count, device=device, dtype=dtype), False)
        self.register_buffer("cols", torch.empty(count, dtype=index_dtype((1, in_features)), device=device))
        self.register_buffer("row_offsets", torch.empty(out_features + 1, dtype=torch.int32, device=device))
        self.register_buffer("rows", torch.empty(count, dtype=torch.int64, device=device), persistent=False)
        self.register_load_state_dict_pre_hook(lambda module, state, prefix, *_: module._explicit_rows(state, prefix))
        self.register_load_state_dict_post_hook(lambda module, _: module._rebuild_rows())
        self.transform = walsh_hadamard(in_features)

    def set_positions(self, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Take `values` at (`rows`, `cols`) in any order (stored row-major)."""
        self.load_state_dict({"values": values, "rows": rows, "cols": cols})

    def _explicit_rows(self, state: dict, prefix: str) -> None:
        """Accept explicit (row, column) pairs (`rows`, as the first QWHA checkpoints
        stored them) and turn them into the compressed-row form."""
        rows = state.pop(f"{prefix}rows", None)
        if rows is None:
            return
        order = torch.argsort(rows.long() * self.in_features + state[f"{prefix}cols"].long())
        for key in ("values", "cols"):
            state[f"{prefix}{key}"] = state[f"{prefix}{key}"][order]
        counts = torch.bincount(rows.long(), minlength=self.out_features)
        state[f"{prefix}row_offsets"] = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)

    def _rebuild_rows(self) -> None:
        if self.row_offsets.is_meta:
            return
        counts = (self.row_offsets[1:] - self.row_offsets[:-1]).long()
        self.rows = torch.repeat_interleave(torch.arange(self.out_features, device=counts.device), counts)

    def coefficients(self, dtype: torch.dtype) -> torch.Tensor:
        """F as a dense d_out × d_in matrix (differentiable in `values`)."""
        f = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.values.device)
        return f.index_put((self.rows, self.cols.long()), self.values.to(dtype), accumulate=True)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.transform.inverse(self.coefficients(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = self.transform.forward(x)  # x·Tᵀ
        gathered = spectrum.index_select(-1, self.cols.long()) * self.values.to(x.dtype)
        out = x.new_zeros(*x.shape[:-1], self.out_features)
        return out.index_add(-1, self.rows, gathered)

    def merge_cheaper(self, tokens: int) -> bool:
        return tokens >= WHT_MERGE_TOKENS_PER_ROW * self.out_features

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "count": self.count, "transform": self.transform.note or "hadamard"}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], in_features: int, out_features: int, device, dtype) -> WHTAdapter:
        return cls(in_features, out_features, int(spec["count"]), device, dtype)


ADAPTERS: dict[str, type[nn.Module]] = {LowRankAdapter.kind: LowRankAdapter, WHTAdapter.kind: WHTAdapter}


def build_adapter(spec: dict[str, Any] | None, in_features: int, out_features: int, device=None, dtype=None):
    """The (empty) adapter a manifest's spec describes, or None for no adapter."""
    if not spec:
        return None
    kind = spec.get("kind")
    if kind not in ADAPTERS:
        raise QpeftError(f"unknown adapter kind {kind!r} (this qpeft knows {', '.join(ADAPTERS)})")
    return ADAPTERS[kind].from_spec(spec, in_features, out_features, device, dtype)
