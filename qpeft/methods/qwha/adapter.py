"""QWHA's adapter (methods.md §3): ΔW = F·T, F sparse in the Walsh–Hadamard domain.
It implements the adapter interface of `qpeft.modules.adapters`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qpeft.transforms.hadamard import walsh_hadamard

# Above this many rows per output channel the WHT adapter is merged into the weight:
# transforming the d_out coefficient rows once is then cheaper than transforming every
# token's activations and gathering (tools/bench_wht_adapter.py, docs/RESULTS.md).
WHT_MERGE_TOKENS_PER_ROW = 0.08


def index_dtype(shape: tuple[int, int]) -> torch.dtype:
    """The narrowest integer type that holds every row and column index of `shape`."""
    return torch.int16 if max(shape) <= torch.iinfo(torch.int16).max else torch.int32


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

    @staticmethod
    def stored_bits(count: int, shape: tuple[int, int], dtype: torch.dtype) -> int:
        """Bits of `count` values in `dtype`, their columns and the d_out + 1 row offsets."""
        rows, cols = shape
        index_bits = torch.iinfo(index_dtype((1, cols))).bits
        return count * (torch.finfo(dtype).bits + index_bits) + (rows + 1) * torch.iinfo(torch.int32).bits

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
