"""Error-feedback rounding onto a format's grid (GPTQ, Frantar et al. 2023, Alg. 1).

Round-to-nearest picks each code alone. GPTQ rounds the columns (input channels) one
at a time and moves each column's rounding error onto the columns not yet rounded,
along the inverse of the input second moment H = XᵀX, so that the output error
‖(W − Ŵ)X‖² rather than ‖W − Ŵ‖² is what the rounding minimises:

    e_j = (w_j − q_j) / U_jj,   w_k ← w_k − e_j · U_jk  for k > j,

with U the upper Cholesky factor of H⁻¹ (H damped by `damping` × its mean diagonal).
Rows are independent, so any row weighting (e.g. a Fisher row mean) leaves the
solution unchanged.

The grid is the one `quantize` would use for the same matrix (the format's
`column_grid`): the input's blocks or groups give the scales (and zero points) before
any rounding, as AutoGPTQ's `static_groups`, and every code is chosen against the
values the dequantizer will produce. Values pushed beyond a group's range by the
feedback are clipped to its outermost level. With
`act_order` the columns are rounded in order of decreasing H_jj (GPTQ's "act-order"),
which is free here because the scales are fixed in advance. The result is an
ordinary `QuantizedTensor`: the storage format does not change.
"""

from __future__ import annotations

import torch

from qpeft.errors import QpeftError
from qpeft.quant.config import QuantConfig
from qpeft.quant.tensor import QuantizedTensor

GPTQ_DAMPING = 0.01  # × mean diag(H), GPTQ's default
BLOCK_COLUMNS = 128  # columns whose feedback is applied lazily as one matmul (GPTQ §4, step 2)


def inverse_hessian_factor(gram: torch.Tensor, damping: float = GPTQ_DAMPING) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + λI)⁻¹ with λ = damping · mean diag H, in
    fp32. Dead input channels (H_jj = 0) get H_jj = 1, so they are rounded to nearest
    and pass no error on."""
    h = gram.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * float(h.diagonal().mean()))
    try:
        lower = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError as exc:
        raise QpeftError(f"the input second moment is not positive definite even with damping {damping}") from exc
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True).float()


class GPTQSolver:
    """What GPTQ needs of one layer input, computed once for every matrix that reads it
    (q/k/v, gate/up): the column order and U, the upper Cholesky factor of the
    inverse of the damped XᵀX in that order."""

    def __init__(self, gram: torch.Tensor, damping: float = GPTQ_DAMPING, act_order: bool = True) -> None:
        self.columns = gram.shape[0]
        diagonal = gram.diagonal()
        self.order = (
            torch.argsort(diagonal, descending=True) if act_order else torch.arange(self.columns, device=gram.device)
        )
        self.factor = inverse_hessian_factor(gram[self.order][:, self.order], damping)

    def quantize(
        self, weight: torch.Tensor, config: QuantConfig, block_columns: int = BLOCK_COLUMNS
    ) -> QuantizedTensor:
        """Quantize `weight` (d_out × d_in, on the solver's device) under `config`."""
        if weight.dim() != 2 or weight.shape[1] != self.columns:
            raise QpeftError(
                f"a ({self.columns}, {self.columns}) input second moment does not fit a {tuple(weight.shape)} matrix"
            )
        rows, cols = weight.shape
        w = weight.detach().float()
        grid = config.column_grid(w)  # the scales round-to-nearest would use, fixed before any rounding
        order, factor = self.order.to(w.device), self.factor.to(w.device)
        # columns as contiguous rows of a transposed copy (the caller's weight is not written to)
        w_t = w.T[order].contiguous()
        codes_t = torch.empty(cols, rows, dtype=torch.int32, device=w.device)
        source = self.order.tolist()  # the input column each rounded row came from
        for start in range(0, cols, block_columns):
            end = min(start + block_columns, cols)
            errors = w_t.new_empty(end - start, rows)
            for j in range(start, end):
                column = w_t[j]
                codes_t[j], values = grid.round(column, source[j])
                error = errors[j - start]
                torch.sub(column, values, out=error)
                error.div_(factor[j, j])
                w_t[j + 1 : end].addr_(factor[j, j + 1 : end], error, alpha=-1)
            w_t[end:].addmm_(factor[start:end, end:].T, errors, alpha=-1)
        return grid.pack(codes_t[torch.argsort(order)].T)


def gptq_quantize(
    weight: torch.Tensor,
    config: QuantConfig,
    gram: torch.Tensor,
    damping: float = GPTQ_DAMPING,
    act_order: bool = True,
    block_columns: int = BLOCK_COLUMNS,
) -> QuantizedTensor:
    """Quantize `weight` (d_out × d_in) under `config`, rounding with error feedback
    along `gram` (d_in × d_in, XᵀX of the layer's inputs; any positive multiple)."""
    if weight.dim() != 2 or gram.shape != (weight.shape[1], weight.shape[1]):
        raise QpeftError(f"a {tuple(gram.shape)} input second moment does not fit a {tuple(weight.shape)} matrix")
    return GPTQSolver(gram.to(weight.device), damping, act_order).quantize(weight, config, block_columns)
