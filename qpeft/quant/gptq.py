"""Error-feedback rounding onto the blockwise NF grid (GPTQ, Frantar et al. 2023, Alg. 1).

Round-to-nearest picks each code alone. GPTQ rounds the columns (input channels) one
at a time and moves each column's rounding error onto the columns not yet rounded,
along the inverse of the input second moment H = XᵀX, so that the output error
‖(W − Ŵ)X‖² rather than ‖W − Ŵ‖² is what the rounding minimises:

    e_j = (w_j − q_j) / U_jj,   w_k ← w_k − e_j · U_jk  for k > j,

with U the upper Cholesky factor of H⁻¹ (H damped by `damping` × its mean diagonal).
Rows are independent, so any row weighting (e.g. a Fisher row mean) leaves the
solution unchanged.

The grid is the one `quantize` would use for the same matrix: the block absmaxes of
the input give the scales (double-quantized as usual) before any rounding, and every
code is chosen against the scale the dequantizer will multiply by. Values pushed
beyond a block's scale by the feedback are clipped to its outermost level. With
`act_order` the columns are rounded in order of decreasing H_jj (GPTQ's "act-order"),
which is free here because the scales are fixed in advance. The result is an
ordinary `QuantizedTensor`: the storage format does not change.
"""

from __future__ import annotations

import torch

from qpeft.errors import QpeftError
from qpeft.quant.blockwise import QuantizedTensor, finite_absmax_blocks, pack_quantized, simulated_scales
from qpeft.quant.codebooks import nf_codebook
from qpeft.quant.config import QuantConfig

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
        _, absmax = finite_absmax_blocks(w, config.block_size)  # the scales round-to-nearest would use
        scales = simulated_scales(absmax, config).repeat_interleave(config.block_size)[: rows * cols].view(rows, cols)
        inverse_scales = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
        order, factor = self.order.to(w.device), self.factor.to(w.device)
        # columns as contiguous rows of the transposed copies (the caller's weight is not written to)
        w_t, scales_t, inverse_t = (m.T[order].contiguous() for m in (w, scales, inverse_scales))
        codebook = nf_codebook(config.bits, w.device)
        # bucketize on the midpoints: nearest_level's codes (ties go down) in one op per column
        midpoints = (codebook[:-1] + codebook[1:]) / 2
        codes_t = torch.empty(cols, rows, dtype=torch.int32, device=w.device)
        for start in range(0, cols, block_columns):
            end = min(start + block_columns, cols)
            errors = w_t.new_empty(end - start, rows)
            for j in range(start, end):
                column = w_t[j]
                code = torch.bucketize(torch.clamp(column * inverse_t[j], -1, 1), midpoints, out_int32=True)
                codes_t[j] = code
                error = errors[j - start]
                torch.sub(column, codebook[code] * scales_t[j], out=error)
                error.div_(factor[j, j])
                w_t[j + 1 : end].addr_(factor[j, j + 1 : end], error, alpha=-1)
            w_t[end:].addmm_(factor[start:end, end:].T, errors, alpha=-1)
        return pack_quantized(codes_t[torch.argsort(order)].T, absmax, config, (rows, cols))


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
