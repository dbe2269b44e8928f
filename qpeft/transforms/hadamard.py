"""Orthonormal Walsh–Hadamard transforms of any width, for the QWHA adapter.

A Hadamard matrix H of order n has ±1 entries and H·Hᵀ = n·I, so H/√n is orthogonal.
Orders exist only for 1, 2 and multiples of 4. The transform of width n = K·2^m is
the Kronecker product H_K ⊗ H_2^m (QWHA §3; methods.md §3), applied as a chain of
small dense factors along the axes of x reshaped to (…, K, 2^a, 2^b, …): each factor
is one batched matmul with at most 128 columns, which is both the cheapest form on
CPU and the tensor-core-friendly one on GPU (d·Σ factor sizes flops per row instead
of d² for a dense H; see tools/bench_hadamard.py).

Constructions (all exact, checked by H·Hᵀ = n·I in the tests):
* Sylvester: H_2^k = H_2 ⊗ … ⊗ H_2, the natural order of `scipy.linalg.hadamard`;
* Paley I: order q + 1 for a prime q ≡ 3 (mod 4), from the Jacobsthal matrix;
* Paley II: order 2(q + 1) for a prime q ≡ 1 (mod 4);
* products with Sylvester factors: 2^j times any of the above.
That covers 12, 20, 24, 28, 36, 40, 44, 48, 56, 60, 68, 72, 76, 80, 84, 88, 96, 104,
108, 112, 120, 124, 136, 140, 144, … Widths whose odd part has no such order up to
MAX_HEAD_ORDER (LLaMA-2's 11008 = 43·256 needs order 172; 5504 is constructed, but a
5504-wide factor costs as much as a dense transform) get the orthogonal block-diagonal
transform I_K ⊗ H_2^m instead: K independent Hadamard blocks; `WalshHadamard.note`
says so, for the checkpoint manifest to record.
"""

from __future__ import annotations

import functools
import math

import torch

# Largest dense factor of the fast transform: 2^m is cut into factors of at most this.
MAX_FACTOR = 128
# Largest order of the non-power-of-two factor: a bigger one costs as much as a dense
# transform (11008 = 5504·2 is Hadamard, via Paley I, but that factor is 5504 wide).
MAX_HEAD_ORDER = 512


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q_ij = χ(j − i) for the quadratic character χ of the prime field GF(q)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if x in squares else -1.0 for x in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    return chi[(index.unsqueeze(0) - index.unsqueeze(1)) % q]


def _paley_core(q: int) -> torch.Tensor:
    """[[0, 1ᵀ], [±1, Q]] of order q + 1 (−1 column when Q is antisymmetric, q ≡ 3 mod 4)."""
    core = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    core[0, 1:] = 1.0
    core[1:, 0] = -1.0 if q % 4 == 3 else 1.0
    core[1:, 1:] = _jacobsthal(q)
    return core


@functools.cache
def _base_hadamard(order: int) -> torch.Tensor | None:
    """A Hadamard matrix of `order` (float64 ±1) from Sylvester or Paley, or None."""
    if order == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if order % 2 == 0 and (half := _base_hadamard(order // 2)) is not None:
        h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(h2, half)
    if order % 4 == 0 and _is_prime(order - 1) and (order - 1) % 4 == 3:  # Paley I
        return _paley_core(order - 1) + torch.eye(order, dtype=torch.float64)
    q = order // 2 - 1
    if order % 4 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II
        return torch.kron(_paley_core(q), torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)) + torch.kron(
            torch.eye(q + 1, dtype=torch.float64), torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        )
    return None


def hadamard_matrix(order: int) -> torch.Tensor | None:
    """A Hadamard matrix of `order` (float32, ±1, H·Hᵀ = order·I), or None where none
    of the constructions above gives one."""
    if order < 1:
        raise ValueError(f"a Hadamard order is a positive integer, not {order}")
    found = _base_hadamard(order)
    return None if found is None else found.to(torch.float32)


def _power_of_two_factors(power: int) -> list[int]:
    """2^power cut into near-equal factors of at most MAX_FACTOR."""
    if power == 0:
        return []
    count = -(-power // int(math.log2(MAX_FACTOR)))
    sizes = [power // count + (i < power % count) for i in range(count)]
    return [2**s for s in sizes]


class WalshHadamard:
    """The orthonormal transform x ↦ x·Hᵀ/√n along the last dimension (n = `size`),
    with its exact inverse, for any batch of rows, on CPU or CUDA."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"transform width must be positive, got {size}")
        self.size = size
        twos = (size & -size).bit_length() - 1  # size = odd · 2^twos
        odd = size >> twos
        # the smallest constructible order odd·2^shift takes the odd part
        shift = next(
            (
                s
                for s in range(2, twos + 1)
                if odd > 1 and odd << s <= MAX_HEAD_ORDER and _base_hadamard(odd << s) is not None
            ),
            None,
        )
        self.note: str | None = None
        if odd == 1:
            self.factors = _power_of_two_factors(twos)
        elif shift is not None:
            self.factors = [odd << shift, *_power_of_two_factors(twos - shift)]
        else:
            self.factors = [odd, *_power_of_two_factors(twos)]
            self.note = (
                f"no Hadamard matrix of order {odd}·2^k ≤ {MAX_HEAD_ORDER} is constructed here: "
                f"block-diagonal transform, {odd} Hadamard blocks of {1 << twos}"
            )
        self._scale = 1.0 / math.sqrt(size // odd if self.block_diagonal else size)
        self._matrices: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def block_diagonal(self) -> bool:
        """Whether the odd part of the width is left untransformed (see `note`)."""
        return self.note is not None

    def _factor(self, index: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        order = self.factors[index]
        if index == 0 and self.block_diagonal:
            return None  # the identity on the odd axis
        key = (order, device, dtype)
        if key not in self._matrices:
            self._matrices[key] = _base_hadamard(order).to(device=device, dtype=dtype)
        return self._matrices[key]

    def _apply(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"expected a last dimension of {self.size}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = x.reshape(-1, *self.factors)
        for axis in range(len(self.factors)):
            h = self._factor(axis, x.device, x.dtype)
            if h is None:
                continue
            # y ← H along `axis` (Hᵀ for the inverse): move it last, multiply, move back
            moved = y.movedim(axis + 1, -1)
            y = (moved @ (h if transpose else h.T)).movedim(-1, axis + 1)
        return y.reshape(*lead, self.size) * self._scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x·Hᵀ/√n: row-wise H·x/√n."""
        return self._apply(x, transpose=False)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The exact inverse y·H/√n (H/√n is orthogonal)."""
        return self._apply(y, transpose=True)

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense orthonormal n×n matrix T with forward(x) = x·Tᵀ (tests, small n)."""
        return self.forward(torch.eye(self.size, dtype=dtype)).T


@functools.cache
def walsh_hadamard(size: int) -> WalshHadamard:
    """The shared transform of width `size` (its factor matrices are cached per device)."""
    return WalshHadamard(size)
