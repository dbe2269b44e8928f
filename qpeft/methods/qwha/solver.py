"""QWHA's adapter initialisation (methods.md §3): a sparse Walsh–Hadamard-domain
update that cancels the quantization error of one matrix, measured on activations.

The adapter is ΔW = F·T with T the orthonormal transform of width d_in (row i:
Δw_i = f_i·T, `WalshHadamard.inverse`) and F sparse, n = r·(d_in + d_out) values at
fixed positions (LoRA rank r's parameter count). Given E = W − deq(Q) and the
input second moment G (XᵀX, dampened), the output error of row i is

    ‖X(e_i − f_i T)ᵀ‖² = (ê_i − f_i) G_Z (ê_i − f_i)ᵀ,   ê_i = e_i Tᵀ,  G_Z = T G Tᵀ,

because T is orthogonal. So the initialisation works in the transformed domain:

1. AdaAlloc: row i gets k_i ∝ ‖ê_i‖^α of the n positions (floor, cap d_in, the
   remainder to the largest fractional parts);
2. its k_i positions are the largest activation-weighted energies ê_ij²·G_Z[j, j];
3. its values minimise the output error on those positions, in closed form:
   G_Z[S, S] f_S = (ê_i G_Z)[S]  (a k_i × k_i Cholesky solve, batched over rows
   with the same k_i).

f = 0 is feasible for step 3, so a row's error can only fall; a row whose error
would rise through the damping (never seen, but G may be singular) is left at 0,
so the init never increases ‖X(W − Q − ΔW)ᵀ‖ (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpeft.calibration.activations import DAMPING, damping_shift
from qpeft.transforms.hadamard import WalshHadamard

# rows of k × k systems solved at once: bounds the gathered G_Z blocks to ~256 MB
SOLVE_BYTES = 256 << 20


def parameter_count(rank: int, shape: tuple[int, int]) -> int:
    """n = r·(d_in + d_out), LoRA rank r's trainable parameters, at most d_out·d_in."""
    rows, cols = shape
    return min(rank * (rows + cols), rows * cols)


@dataclass
class SparseSpectrum:
    """F in coordinate form: `values[k]` at (rows[k], cols[k]), rows ascending."""

    shape: tuple[int, int]  # (d_out, d_in)
    rows: torch.Tensor  # int64 (n,)
    cols: torch.Tensor  # int64 (n,)
    values: torch.Tensor  # fp32 (n,)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        f = torch.zeros(self.shape, dtype=dtype, device=self.values.device)
        return f.index_put_((self.rows, self.cols), self.values.to(dtype))

    def delta_weight(self, transform: WalshHadamard | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW = F·T (d_out × d_in)."""
        return (transform or WalshHadamard(self.shape[1])).inverse(self.dense(dtype))


@dataclass
class QWHAInit:
    spectrum: SparseSpectrum
    counts: torch.Tensor  # k_i per row (int64)
    error_before: torch.Tensor  # per row, ‖X e_iᵀ‖² (fp64)
    error_after: torch.Tensor  # per row, ‖X(e_i − Δw_i)ᵀ‖² (fp64)
    rows_reset: int  # rows left at f_i = 0 by the guard


def ada_alloc(norms: torch.Tensor, total: int, cap: int, alpha: float = 1.0) -> torch.Tensor:
    """Integer k_i ≥ 0, Σ k_i = total, k_i ≤ cap, k_i ≈ total·norm_i^α / Σ norm^α.

    Shares are water-filled: rows that hit the cap keep it and the rest of the budget
    is shared among the others in the same proportions; the floors' remainder goes one
    position each to the largest fractional parts."""
    if total > cap * norms.numel():
        raise ValueError(f"{total} positions do not fit in {norms.numel()} rows of {cap}")
    weight = norms.double().clamp(min=0) ** alpha
    if float(weight.sum()) == 0:
        weight = torch.ones_like(weight)
    share = torch.zeros_like(weight)
    capped = torch.zeros_like(weight, dtype=torch.bool)
    while True:
        free = ~capped
        left = total - cap * int(capped.sum())
        share[free] = left * weight[free] / weight[free].sum().clamp(min=1e-300)
        share[capped] = cap
        over = free & (share > cap)
        if not bool(over.any()):
            break
        capped |= over
    counts = share.floor().long().clamp(max=cap)
    remainder = total - int(counts.sum())
    if remainder:
        fraction = (share - counts).masked_fill(counts >= cap, -1.0)
        counts[fraction.topk(remainder).indices] += 1
    return counts


def select_positions(scores: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row i the columns of its counts[i] largest scores; (rows, cols) row-major,
    each row's columns by falling score."""
    order = scores.argsort(dim=1, descending=True)
    keep = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0) < counts.unsqueeze(1)
    rows = torch.arange(scores.shape[0], device=scores.device).unsqueeze(1).expand_as(order)
    return rows[keep], order[keep]


def refine_values(
    err_t: torch.Tensor, gram_t: torch.Tensor, counts: torch.Tensor, cols: torch.Tensor, shift: float
) -> torch.Tensor:
    """Least-squares values on fixed positions: per row, (G_Z[S, S] + shift·I) f_S =
    (ê_i G_Z)[S], with S its counts[i] columns in `cols` (row-major). fp64 in, fp64 out."""
    rhs_full = err_t @ gram_t
    offsets = counts.cumsum(0) - counts
    values = torch.zeros(cols.numel(), dtype=torch.float64, device=err_t.device)
    for k in counts.unique().tolist():
        if k == 0:
            continue
        rows = (counts == k).nonzero().squeeze(1)
        step = max(1, SOLVE_BYTES // (8 * k * k))
        for start in range(0, rows.numel(), step):
            chunk = rows[start : start + step]
            where = offsets[chunk].unsqueeze(1) + torch.arange(k, device=cols.device)
            support = cols[where]  # (m, k)
            system = gram_t[support.unsqueeze(2), support.unsqueeze(1)]
            system.diagonal(dim1=1, dim2=2).add_(shift)
            rhs = rhs_full[chunk.unsqueeze(1), support].unsqueeze(2)
            factor, info = torch.linalg.cholesky_ex(system)
            if bool((info != 0).any()):  # numerically singular: a least-squares solve
                solution = torch.linalg.lstsq(system, rhs).solution
            else:
                solution = torch.cholesky_solve(rhs, factor)
            values[where.reshape(-1)] = solution.reshape(-1)
    return values


def row_errors(residual_t: torch.Tensor, gram_t: torch.Tensor) -> torch.Tensor:
    """(ê_i − f_i) G_Z (ê_i − f_i)ᵀ per row, for the transformed residual rows."""
    return ((residual_t @ gram_t) * residual_t).sum(dim=1)


class QWHASolver:
    """The initialisation for one input distribution: G_Z = T G Tᵀ is computed once
    and shared by every error matrix (every candidate config of the cost table)."""

    def __init__(self, gram: torch.Tensor, damping: float = DAMPING, transform: WalshHadamard | None = None) -> None:
        self.size = gram.shape[0]
        if gram.shape != (self.size, self.size):
            raise ValueError(f"a Gram matrix is square, got {tuple(gram.shape)}")
        self.transform = transform or WalshHadamard(self.size)
        self.gram = g = gram.to(torch.float64)
        gram_t = self.transform.forward(self.transform.forward(g).T)  # T G Tᵀ (G symmetric)
        self.gram_t = (gram_t + gram_t.T) / 2
        self.shift = damping_shift(self.gram_t, damping)

    def init(self, error: torch.Tensor, count: int, alpha: float = 1.0) -> QWHAInit:
        """The sparse spectrum F (`count` values) that best cancels `error`
        (E = W − deq(Q), d_out × d_in) on these inputs."""
        rows_out, cols_in = error.shape
        if cols_in != self.size:
            raise ValueError(f"a {rows_out}×{cols_in} matrix needs a {cols_in}-wide Gram matrix, not {self.size}")
        gram_t = self.gram_t.to(error.device)
        err_t = self.transform.forward(error.to(torch.float64))  # Ê = E Tᵀ
        counts = ada_alloc(err_t.norm(dim=1), count, cols_in, alpha)
        rows, cols = select_positions(err_t.square() * gram_t.diagonal().unsqueeze(0), counts)
        values = refine_values(err_t, gram_t, counts, cols, self.shift)
        coeffs = torch.zeros_like(err_t).index_put_((rows, cols), values)
        before = row_errors(err_t, gram_t)
        after = row_errors(err_t - coeffs, gram_t)
        worse = after > before
        if bool(worse.any()):
            values[worse[rows]] = 0.0
            after = torch.where(worse, before, after)
        spectrum = SparseSpectrum((rows_out, cols_in), rows, cols, values.float())
        return QWHAInit(spectrum, counts, before, after, int(worse.sum()))


def qwha_init(
    error: torch.Tensor,
    gram: torch.Tensor,
    count: int,
    alpha: float = 1.0,
    damping: float = DAMPING,
    transform: WalshHadamard | None = None,
) -> QWHAInit:
    """QWHA's init of one matrix: `error` = W − deq(Q) (d_out × d_in), `gram` = XᵀX or
    XᵀX/tokens (d_in × d_in, undampened: `damping`·mean diagonal is added for the
    solves), `count` values."""
    return QWHASolver(gram.to(error.device), damping, transform).init(error, count, alpha)
