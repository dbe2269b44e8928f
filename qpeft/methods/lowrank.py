"""Randomized truncated SVD (Halko, Martinsson, Tropp 2011, Alg. 4.4), optionally
row/column weighted.

The weighted form minimises ‖diag(r) (A − L1·L2) diag(c)‖_F over rank-k L1·L2: take
the SVD of diag(r) A diag(c) and unscale the factors (LQ-LoRA §3.3, where r and c are
square roots of the Fisher's row and column means).
"""

from __future__ import annotations

import torch


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m×k), S (k), Vh (k×n) of a rank-k approximation, in fp32.

    `start` (n × j, j ≤ k + oversample): columns spanning a guess of the dominant right
    singular subspace, e.g. the previous solution when the matrix changed a little;
    the sketch starts from them (topped up with random columns)."""
    a = matrix.float()
    rows, cols = a.shape
    sketch = min(rank + oversample, rows, cols)
    if sketch == min(rows, cols):  # the sketch would be the whole space: exact SVD is cheaper
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    omega = torch.randn(cols, sketch, device=a.device, generator=generator)
    if start is not None:
        omega[:, : start.shape[1]] = start
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):  # re-orthonormalise each pass: plain powers lose the small singular values
        q, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ q)
    u_small, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ u_small)[:, :rank], s[:rank], vh[:rank]


def lowrank_factors(
    residual: torch.Tensor,
    rank: int,
    row_weight: torch.Tensor | None = None,
    col_weight: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
    power_iters: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 (m×k), L2 (k×n) minimising the (weighted) Frobenius error to `residual`;
    the singular values are split as √S between the two factors. `start` as in
    `randomized_svd`, for the column-weighted matrix."""
    scaled = residual.float()
    if row_weight is not None:
        scaled = scaled * row_weight.unsqueeze(1)
    if col_weight is not None:
        scaled = scaled * col_weight.unsqueeze(0)
    u, s, vh = randomized_svd(scaled, rank, power_iters=power_iters, generator=generator, start=start)
    root = s.sqrt()
    left, right = u * root, root.unsqueeze(1) * vh
    if row_weight is not None:
        left = left / row_weight.unsqueeze(1)
    if col_weight is not None:
        right = right / col_weight.unsqueeze(0)
    return left, right
