"""LQ-LoRA's split of one matrix (Guo et al. 2024, §3.1, Alg. 1): W ≈ Q + L1·L2.

Alternate (L1, L2) = best rank-r approximation of W − Q and Q = quant(W − L1·L2),
tracking the (weighted) error ‖diag(r)(W − Q − L1·L2)diag(c)‖_F. Unlike the reference
code, which returns the last iterate once the error rises, the best iterate is kept,
and the alternation starts from Q = quant(W): its first iterate is then never worse
than quantizing W alone, since L1·L2 is the best rank-r fit to that residual.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qpeft.decompose.lowrank import lowrank_factors
from qpeft.quant import QuantConfig, QuantizedTensor, dequantize, quantize


@dataclass
class LQDecomposition:
    quantized: QuantizedTensor
    left: torch.Tensor  # L1, d_out × r (fp32)
    right: torch.Tensor  # L2, r × d_in (fp32)
    error: float  # (weighted) Frobenius error of the returned iterate
    errors: list[float] = field(default_factory=list)  # per iteration, the first being quantization alone

    @property
    def iterations(self) -> int:
        return len(self.errors) - 1


def weighted_error(diff: torch.Tensor, row_weight: torch.Tensor | None, col_weight: torch.Tensor | None) -> float:
    if row_weight is not None:
        diff = diff * row_weight.unsqueeze(1)
    if col_weight is not None:
        diff = diff * col_weight.unsqueeze(0)
    return float(torch.linalg.norm(diff))


def lq_decompose(
    weight: torch.Tensor,
    config: QuantConfig,
    rank: int,
    row_weight: torch.Tensor | None = None,
    col_weight: torch.Tensor | None = None,
    max_iters: int = 20,
    rel_tol: float = 1e-3,
    seed: int = 0,
) -> LQDecomposition:
    """Decompose `weight` (any float dtype; worked on in fp32 on its device).

    Stops when an iteration improves the best error by less than `rel_tol` (relative)
    or after `max_iters`; returns the best iterate seen."""
    w = weight.float()
    generator = torch.Generator(device=w.device).manual_seed(seed)
    qt = quantize(w, config)
    residual = w - dequantize(qt)  # W − deq(Q) of the current Q
    empty_left = w.new_zeros(w.shape[0], rank)
    empty_right = w.new_zeros(rank, w.shape[1])
    best = LQDecomposition(qt, empty_left, empty_right, weighted_error(residual, row_weight, col_weight))
    best.errors.append(best.error)
    if rank == 0:
        return best
    for _ in range(max_iters):
        left, right = lowrank_factors(residual, rank, row_weight, col_weight, generator)
        lowrank = left @ right
        qt_next = quantize(w - lowrank, config)
        residual_next = w - dequantize(qt_next)
        error = weighted_error(residual_next - lowrank, row_weight, col_weight)
        # the pair (Q, L) before re-quantizing is also a valid iterate, and it is the
        # one guaranteed not to be worse than quantization alone
        error_pair = weighted_error(residual - lowrank, row_weight, col_weight)
        candidates = [(error_pair, qt), (error, qt_next)]
        step_error, step_q = min(candidates, key=lambda c: c[0])
        best.errors.append(step_error)
        improved = step_error < best.error * (1 - rel_tol)
        if step_error < best.error:
            best.quantized, best.left, best.right, best.error = step_q, left, right, step_error
        if not improved:
            break
        qt, residual = qt_next, residual_next
    return best
