"""QWHA initialisation: allocation, positions, least-squares values, error guarantee."""

from __future__ import annotations

import pytest
import torch

from qpeft.calibration.activations import damped, input_grams
from qpeft.decompose.qwha import QWHASolver, ada_alloc, parameter_count, qwha_init, select_positions
from qpeft.quant import PRESETS
from qpeft.quant.blockwise import simulate
from qpeft.transforms.hadamard import WalshHadamard


def _inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / width**0.5
    scale = torch.rand(width, generator=g) * 3  # uneven channel energies, as in LLMs
    return (torch.randn(tokens, width, generator=g) @ mix) * scale


def test_parameter_count_matches_lora():
    assert parameter_count(8, (576, 1536)) == 8 * 576 + 8 * 1536
    assert parameter_count(64, (16, 12)) == 16 * 12  # never more than the matrix


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_ada_alloc_sums_caps_and_is_proportional(alpha):
    norms = torch.tensor([10.0, 1.0, 1.0, 0.0, 5.0, 100.0])
    counts = ada_alloc(norms, 30, cap=8, alpha=alpha)
    assert int(counts.sum()) == 30
    assert int(counts.max()) <= 8 and int(counts.min()) >= 0
    if alpha == 0:  # equal shares
        assert counts.tolist() == [5] * 6
    else:  # larger norm, never fewer positions
        order = norms.argsort()
        assert torch.all(counts[order].diff() >= 0)
        assert int(counts[5]) == 8  # capped, its excess shared among the others


def test_ada_alloc_rejects_an_impossible_budget():
    with pytest.raises(ValueError, match="do not fit"):
        ada_alloc(torch.ones(3), 10, cap=3)


def test_select_positions_takes_each_rows_largest_scores():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    rows, cols = select_positions(scores, torch.tensor([2, 1, 0]))
    assert rows.tolist() == [0, 0, 1]
    assert cols.tolist() == [1, 2, 0]


def test_values_equal_brute_force_least_squares():
    tokens, d_in, d_out = 300, 24, 10
    x = _inputs(tokens, d_in, 1).double()
    error = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(2))
    result = qwha_init(error, x.T @ x, count=40, damping=0.0)
    t = WalshHadamard(d_in).matrix(torch.float64)
    spectrum = result.spectrum
    for i in range(d_out):
        support = spectrum.cols[spectrum.rows == i]
        if support.numel() == 0:
            continue
        # min_f ‖X(e_i − f T_S)ᵀ‖: an ordinary least-squares problem in X T_Sᵀ
        design = x @ t[support].T
        target = x @ error[i].double()
        expected = torch.linalg.lstsq(design, target.unsqueeze(1)).solution.squeeze(1)
        got = spectrum.values[spectrum.rows == i].double()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(48, 48), (32, 96), (96, 40)])
def test_init_respects_budgets_and_never_raises_output_error(shape):
    d_out, d_in = shape
    x = _inputs(500, d_in, 3)
    weight = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(4)) * 0.05
    error = weight - simulate(weight, PRESETS["nf3"])
    count = parameter_count(2, shape)
    result = qwha_init(error, x.double().T @ x.double(), count)
    spectrum = result.spectrum
    assert spectrum.values.numel() == count == int(result.counts.sum())
    per_row = torch.bincount(spectrum.rows, minlength=d_out)
    assert torch.equal(per_row, result.counts)
    assert int(result.counts.max()) <= d_in
    assert len(set(zip(spectrum.rows.tolist(), spectrum.cols.tolist(), strict=True))) == count  # no repeats
    before = (x @ error.T).norm()
    after = (x @ (error - spectrum.delta_weight()).T).norm()
    assert after < before
    assert torch.all(result.error_after <= result.error_before)
    torch.testing.assert_close(float(result.error_after.sum()) ** 0.5, float(after), rtol=1e-3, atol=0)


def test_rank_deficient_inputs_still_never_raise_the_error():
    """Inputs that span a quarter of the width (a singular XᵀX): the guard holds."""
    d_in = 64
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(5)) @ torch.randn(16, d_in)
    error = torch.randn(32, d_in, generator=torch.Generator().manual_seed(6))
    result = qwha_init(error, x.double().T @ x.double(), 32 * 8)
    dw = result.spectrum.delta_weight().double()
    assert (x.double() @ (error.double() - dw).T).norm() <= (x.double() @ error.double().T).norm() * (1 + 1e-9)


def test_more_parameters_cancel_more_error():
    d_in = 64
    x = _inputs(400, d_in, 7).double()
    error = torch.randn(48, d_in, generator=torch.Generator().manual_seed(8))
    solver = QWHASolver(x.T @ x)
    errors = [float(solver.init(error, parameter_count(r, (48, d_in))).error_after.sum()) for r in (1, 4, 16)]
    assert errors[0] > errors[1] > errors[2]
    full = QWHASolver(x.T @ x, damping=0.0).init(error, 48 * d_in)  # every position, undamped: exact
    assert float(full.error_after.sum()) < 1e-9 * float(full.error_before.sum())


def test_input_grams_match_a_direct_computation_and_share_inputs(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    batches = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    grams = input_grams(model, names, batches, batch_size=2, progress=False)
    assert grams.owner[names[1]] == names[0]  # q and k read the same tensor: one G
    assert len(grams.grams) == 2 and grams.tokens == 48
    seen = []
    handle = model.get_submodule(names[2]).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=batches)
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    torch.testing.assert_close(grams.gram(names[2]), x.T @ x, rtol=1e-6, atol=1e-8)
    g = damped(grams.gram(names[2]))
    assert float(torch.linalg.eigvalsh(g).min()) > 0
