"""LQ-LoRA's split of one matrix (Guo et al. 2024, §3.1, Alg. 1): W ≈ Q + L1·L2.

Alternate (L1, L2) = best rank-r approximation of W − Q and Q = quant(W − L1·L2),
tracking the (weighted) error ‖diag(r)(W − Q − L1·L2)diag(c)‖_F. Unlike the reference
code, which returns the last iterate once the error rises, the best iterate is kept.
Without a warm start the alternation begins at Q = quant(W): its first iterate is
then never worse than quantizing W alone, since L1·L2 is the best rank-r fit to that
residual.

The iterations use `simulate` (the dequantized values, no packing); the returned
iterate is quantized once at the end, which gives exactly the simulated values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qpeft.methods.lowrank import lowrank_factors
from qpeft.quant import QuantConfig, QuantizedTensor, quantize, simulate


@dataclass
class Alternation:
    """Best iterate of the alternation: Q = quant(quant_input), L1·L2 = left @ right."""

    quant_input: torch.Tensor  # the matrix whose quantization is Q (fp32)
    left: torch.Tensor  # L1, d_out × r (fp32)
    right: torch.Tensor  # L2, r × d_in (fp32)
    error: float  # (weighted) Frobenius error of the iterate
    errors: list[float] = field(default_factory=list)  # per step, the first being the starting point


@dataclass
class LQDecomposition:
    quantized: QuantizedTensor
    left: torch.Tensor
    right: torch.Tensor
    error: float
    errors: list[float] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        return len(self.errors) - 1


def weighted_error(diff: torch.Tensor, row_weight: torch.Tensor | None, col_weight: torch.Tensor | None) -> float:
    """‖diag(r) · diff · diag(c)‖_F (plain Frobenius norm without weights)."""
    if row_weight is not None:
        diff = diff * row_weight.unsqueeze(1)
    if col_weight is not None:
        diff = diff * col_weight.unsqueeze(0)
    return float(torch.linalg.norm(diff))


def row_space(right: torch.Tensor, col_weight: torch.Tensor | None) -> torch.Tensor:
    """Columns spanning the row space of L2·diag(c): the right singular subspace the
    weighted SVD found."""
    return (right if col_weight is None else right * col_weight.unsqueeze(0)).T


def alternate(
    weight: torch.Tensor,
    quant: Callable[[torch.Tensor], torch.Tensor],
    rank: int,
    row_weight: torch.Tensor | None = None,
    col_weight: torch.Tensor | None = None,
    max_iters: int = 20,
    rel_tol: float = 1e-3,
    generator: torch.Generator | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    warm_power_iters: int = 2,
) -> Alternation:
    """Run the alternation with `quant` (matrix → its dequantized quantization).

    `init` = (L1, L2) warm-starts it from Q = quant(W − L1·L2). Stops when a step
    improves the best error by less than `rel_tol` (relative) or after `max_iters`.
    After the first step each SVD starts from the previous factors' row space, which
    changes little between steps, with `warm_power_iters` power iterations."""
    w = weight.float()
    if init is None:
        left, right = w.new_zeros(w.shape[0], rank), w.new_zeros(rank, w.shape[1])
        quant_input = w
    else:
        left, right = init
        quant_input = w - left @ right
    residual = w - quant(quant_input)  # W − Q of the current Q
    best = Alternation(quant_input, left, right, weighted_error(residual - left @ right, row_weight, col_weight))
    best.errors.append(best.error)
    if rank == 0:
        return best
    start = None if init is None else row_space(right, col_weight)
    for _ in range(max_iters):
        power_iters = 2 if start is None else warm_power_iters
        left, right = lowrank_factors(residual, rank, row_weight, col_weight, generator, start, power_iters)
        start = row_space(right, col_weight)
        lowrank = left @ right
        # the pair (Q, new L) before re-quantizing is also a valid iterate, and the one
        # guaranteed not to be worse than the starting point
        pair_error = weighted_error(residual - lowrank, row_weight, col_weight)
        next_input = w - lowrank
        next_residual = w - quant(next_input)
        next_error = weighted_error(next_residual - lowrank, row_weight, col_weight)
        step_error, step_input = min((pair_error, quant_input), (next_error, next_input), key=lambda c: c[0])
        best.errors.append(step_error)
        improved = step_error < best.error * (1 - rel_tol)
        if step_error < best.error:
            best.quant_input, best.left, best.right, best.error = step_input, left, right, step_error
        if not improved:
            break
        quant_input, residual = next_input, next_residual
    return best


def lq_decompose(
    weight: torch.Tensor,
    config: QuantConfig,
    rank: int,
    row_weight: torch.Tensor | None = None,
    col_weight: torch.Tensor | None = None,
    max_iters: int = 20,
    rel_tol: float = 1e-3,
    seed: int = 0,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LQDecomposition:
    """Decompose `weight` (any float dtype; worked on in fp32 on its device) under
    `config`; returns the best iterate with Q packed."""
    generator = torch.Generator(device=weight.device).manual_seed(seed)
    best = alternate(
        weight, lambda x: simulate(x, config), rank, row_weight, col_weight, max_iters, rel_tol, generator, init
    )
    return LQDecomposition(quantize(best.quant_input, config), best.left, best.right, best.error, best.errors)
