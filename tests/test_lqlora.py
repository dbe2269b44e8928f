"""LQ-LoRA single-matrix decomposition: randomized SVD and the alternating split."""

import numpy as np
import pytest
import torch

from qpeft.methods.lowrank import lowrank_factors, randomized_svd
from qpeft.methods.lqlora.alternation import lq_decompose, weighted_error
from qpeft.quant import dequantize, nf_codebook, parse_config, quantize


def test_randomized_svd_matches_exact_on_low_rank():
    torch.manual_seed(0)
    a = torch.randn(200, 12) @ torch.randn(12, 150)
    u, s, vh = randomized_svd(a, 12, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(u @ torch.diag(s) @ vh, a, atol=1e-3, rtol=1e-4)
    exact = torch.linalg.svdvals(a)[:12]
    torch.testing.assert_close(s, exact, rtol=1e-4, atol=1e-4)


def test_randomized_svd_is_near_optimal_on_decaying_spectrum():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(256, 256))
    v, _ = torch.linalg.qr(torch.randn(192, 192))
    s = 0.9 ** torch.arange(192.0)
    a = u[:, :192] @ torch.diag(s) @ v.T
    approx_u, approx_s, approx_vh = randomized_svd(a, 16, generator=torch.Generator().manual_seed(0))
    err = torch.linalg.norm(a - approx_u @ torch.diag(approx_s) @ approx_vh)
    optimal = torch.linalg.norm(s[16:])
    assert err <= optimal * 1.01


def test_weighted_factors_minimise_the_weighted_error():
    torch.manual_seed(0)
    a = torch.randn(64, 48)
    r, c = torch.rand(64) * 3 + 0.1, torch.rand(48) * 3 + 0.1
    left, right = lowrank_factors(a, 4, r, c, torch.Generator().manual_seed(0))
    plain_left, plain_right = lowrank_factors(a, 4, generator=torch.Generator().manual_seed(0))
    assert weighted_error(a - left @ right, r, c) < weighted_error(a - plain_left @ plain_right, r, c)
    # and matches the exact weighted optimum (Eckart–Young on the scaled matrix)
    optimal = torch.linalg.svdvals(a * r.unsqueeze(1) * c.unsqueeze(0))[4:].square().sum().sqrt()
    assert weighted_error(a - left @ right, r, c) == pytest.approx(optimal.item(), rel=1e-3)


def test_low_rank_plus_on_grid_goes_to_zero():
    torch.manual_seed(0)
    config = parse_config("nf4-b64-fp32")
    levels = nf_codebook(4)
    codes = torch.randint(0, 16, (128, 128))
    codes[:, ::64] = 15  # every block reaches +1: its absmax is exactly the scale
    on_grid = levels[codes] * 0.5
    low_rank = 0.02 * torch.randn(128, 4) @ torch.randn(4, 128) / 4
    result = lq_decompose(on_grid + low_rank, config, rank=4, max_iters=50, rel_tol=0)
    relative = result.error / torch.linalg.norm(on_grid + low_rank).item()
    assert relative < 1e-3, (relative, result.errors)


@pytest.mark.parametrize("config_name", ["nf2", "nf3", "nf4"])
def test_never_worse_than_plain_quantization(config_name):
    torch.manual_seed(1)
    config = parse_config(config_name)
    w = torch.randn(96, 160) * 0.02 + 0.01 * torch.randn(96, 3) @ torch.randn(3, 160)
    plain = torch.linalg.norm(w - dequantize(quantize(w, config))).item()
    result = lq_decompose(w, config, rank=8)
    assert result.error <= plain
    assert result.error == min(result.errors)
    recon = dequantize(result.quantized) + result.left @ result.right
    assert torch.linalg.norm(w - recon).item() == pytest.approx(result.error, rel=1e-5)


def test_weighted_variant_lowers_the_weighted_error():
    torch.manual_seed(2)
    config = parse_config("nf3")
    w = torch.randn(128, 128) * 0.02
    r = torch.ones(128)
    r[:8] = 20.0  # a skewed Fisher: a few rows matter far more
    c = torch.ones(128)
    unweighted = lq_decompose(w, config, rank=8)
    weighted = lq_decompose(w, config, rank=8, row_weight=r, col_weight=c)
    recon = dequantize(unweighted.quantized) + unweighted.left @ unweighted.right
    assert weighted.error < weighted_error(w - recon, r, c)


def test_rank_zero_is_plain_quantization():
    w = torch.randn(64, 64)
    result = lq_decompose(w, parse_config("nf4"), rank=0)
    assert result.iterations == 0 and result.left.shape == (64, 0)
    assert torch.equal(dequantize(result.quantized), dequantize(quantize(w, parse_config("nf4"))))


@pytest.mark.parametrize("weighted", [False, True])
def test_gptq_split_refits_the_factors_to_what_gptq_left(weighted, monkeypatch):
    """After GPTQ rounds Q, L1·L2 is refit to W − Q: the (Fisher-weighted) error of
    the stored split is at most that of the alternation's factors, and lower here."""
    from qpeft.calibration.activations import InputGrams
    from qpeft.calibration.fisher import FisherStats
    from qpeft.methods.lqlora import LQLoRA

    g = torch.Generator().manual_seed(5)
    rows, cols, rank = 48, 128, 4
    weight = torch.randn(rows, cols, generator=g) * 0.02 + 0.01 * torch.randn(rows, 4, generator=g) @ torch.randn(
        4, cols, generator=g
    )
    x = torch.randn(512, cols, generator=g) * torch.rand(cols, generator=g).add(0.2)
    grams = InputGrams({"w": (x.T @ x).double()}, {"w": "w"}, 512)
    fisher = None
    if weighted:
        fisher = FisherStats({"w": torch.rand(rows, generator=g) + 0.2}, {"w": torch.rand(cols, generator=g) + 0.2})
    method = LQLoRA(fisher, rounding="gptq", grams=grams)
    row, col = method._weights("w", weight.device)
    config = parse_config("nf3-b64-s4x64-fp16")
    result = lq_decompose(weight, config, rank, row, col)
    measure = method._measure("w", weight)
    quantized, adapter, ratio = method._gptq_split("w", weight, result.left, result.right, config, measure)
    refit_error = weighted_error(weight - dequantize(quantized) - adapter.delta_weight(), row, col)
    assert method.split("w", weight, config, rank).report["refit_error_ratio"] < 1.0  # the split refits too
    monkeypatch.setattr(LQLoRA, "_refit", lambda self, weight, quantized, adapter, m: (adapter, 1.0))
    kept_q, kept, _ = method._gptq_split("w", weight, result.left, result.right, config, measure)
    kept_error = weighted_error(weight - dequantize(kept_q) - kept.delta_weight(), row, col)
    assert torch.equal(kept_q.parts["codes"], quantized.parts["codes"])  # the same Q
    assert refit_error < 0.99 * kept_error
    assert ratio == pytest.approx(refit_error / kept_error, rel=1e-4)


@pytest.mark.parametrize("zero", ["row", "column", "all"])
def test_a_zero_fisher_row_or_column_is_floored(zero):
    """A row or column that no calibration gradient reached (F = 0) must not divide
    by zero: costs and split stay finite, and the split stays as good as unweighted."""
    from qpeft.calibration.fisher import FisherStats
    from qpeft.methods.lqlora import LQLoRA
    from qpeft.quant import parse_config

    g = torch.Generator().manual_seed(3)
    weight = torch.randn(48, 64, generator=g) * 0.02
    row, col = torch.rand(48, generator=g) + 0.5, torch.rand(64, generator=g) + 0.5
    if zero in ("row", "all"):
        row[5] = 0.0
    if zero in ("column", "all"):
        col[7] = 0.0
    if zero == "all":
        row.zero_()
    method = LQLoRA(FisherStats({"w": row}, {"w": col}), rounding="nearest")
    configs = [parse_config("nf3-b64-s8x256-fp16"), parse_config("nf4-b64-s8x256-fp16")]
    costs = method.costs("w", weight, configs, 4)
    assert np.isfinite(costs).all() and (costs >= 0).all()
    split = method.split("w", weight, configs[0], 4)
    recon = dequantize(split.quantized) + split.adapter.delta_weight()
    assert torch.isfinite(recon).all()
    assert float(torch.linalg.norm(weight - recon) / torch.linalg.norm(weight)) < 0.3
