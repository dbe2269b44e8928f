"""Walsh–Hadamard transforms: constructions, orthogonality, fast = dense, inverse."""

from __future__ import annotations

import pytest
import scipy.linalg
import torch

from qpeft.transforms.hadamard import WalshHadamard, hadamard_matrix

# The widths of the models qpeft targets: SmolLM2, MiniLM, LLaMA-2 7B, LLaMA-3 / Mistral, LLaMA-2 70B
MODEL_WIDTHS = [576, 1536, 384, 4096, 11008, 14336, 8192, 28672]


@pytest.mark.parametrize("order", [1, 2, 4, 8, 64, 256])
def test_powers_of_two_are_scipys(order):
    expected = torch.from_numpy(scipy.linalg.hadamard(order)).float()
    assert torch.equal(hadamard_matrix(order), expected)


@pytest.mark.parametrize("order", [12, 20, 28, 36, 40, 44, 60, 68, 76, 108, 140, 148])
def test_paley_orders_are_hadamard(order):
    h = hadamard_matrix(order)
    assert h is not None
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, order * torch.eye(order))


@pytest.mark.parametrize("order", [3, 6, 10, 172])
def test_orders_without_a_construction(order):
    assert hadamard_matrix(order) is None


@pytest.mark.parametrize("size", [1, 2, 12, 48, 96, 576, 1536, 384, 172 * 4, 3 * 5 * 8])
def test_fast_transform_is_orthonormal_and_matches_its_dense_matrix(size):
    transform = WalshHadamard(size)
    dense = transform.matrix(torch.float64)
    torch.testing.assert_close(dense @ dense.T, torch.eye(size, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.randn(5, 3, size, dtype=torch.float64)
    torch.testing.assert_close(transform.forward(x), x @ dense.T)
    torch.testing.assert_close(transform.inverse(transform.forward(x)), x)


def test_kronecker_structure_for_576():
    transform = WalshHadamard(576)
    assert transform.factors[0] == 36 and transform.note is None
    expected = torch.kron(hadamard_matrix(36), hadamard_matrix(16)).double() / 24.0
    torch.testing.assert_close(transform.matrix(torch.float64), expected)


@pytest.mark.parametrize("size", MODEL_WIDTHS)
def test_model_widths(size):
    transform = WalshHadamard(size)
    x = torch.randn(4, size)
    torch.testing.assert_close(transform.inverse(transform.forward(x)), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(transform.forward(x).norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-5)
    if size == 11008:  # 43·256: order 172 is not constructed here
        assert transform.block_diagonal and "43 Hadamard blocks of 256" in transform.note
    else:
        assert not transform.block_diagonal and transform.note is None


def test_block_diagonal_fallback_is_independent_blocks():
    transform = WalshHadamard(43 * 4)
    dense = transform.matrix(torch.float64)
    blocks = torch.block_diag(*[hadamard_matrix(4).double() / 2.0] * 43)
    torch.testing.assert_close(dense, blocks)


def test_half_precision_and_bad_width():
    transform = WalshHadamard(576)
    x = torch.randn(2, 576)
    torch.testing.assert_close(transform.forward(x.bfloat16()).float(), transform.forward(x), atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="expected a last dimension of 576"):
        transform.forward(torch.randn(2, 512))
