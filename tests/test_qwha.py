"""QWHA initialisation: allocation, positions, least-squares values, error guarantee."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qpeft.allocation.ilp import REFINED_SETS
from qpeft.calibration.activations import damping_shift, input_grams
from qpeft.calibration.stream import LayerwiseLM
from qpeft.methods.qwha import qwha_matrix_costs
from qpeft.methods.qwha.solver import QWHASolver, ada_alloc, parameter_count, qwha_init, select_positions
from qpeft.quant import PRESETS, parse_grid, simulate
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


@pytest.mark.parametrize("refine", ["hull", "front"])
def test_cost_table_is_exact_where_the_allocation_chooses(refine):
    """qwha_matrix_costs prices every config from its quantization error and runs the
    init only for the configs that matter (the hull, or the whole front): their costs
    must be the exact residual after their own init."""
    d_out, d_in = 40, 64
    x = _inputs(300, d_in, 11).double()
    weight = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(12)) * 0.05
    grid = parse_grid("lqlora")[::7]
    solver = QWHASolver(x.T @ x / 300)
    count = parameter_count(2, (d_out, d_in))
    costs = qwha_matrix_costs(weight, grid, solver, count, refine=refine)
    bits = np.array([c.bits_per_param for c in grid])
    chosen = REFINED_SETS[refine](costs, bits)
    for j in chosen:
        exact = float(solver.init(weight - simulate(weight, grid[j]), count).error_after.sum())
        assert costs[j] == pytest.approx(exact, rel=1e-9)
    assert len(chosen) < len(grid)  # the rest were estimated, not initialised


def test_input_grams_match_a_direct_computation_and_share_inputs(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    batches = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    grams = input_grams(LayerwiseLM(tiny_model_dir), names, batches, batch_size=2, progress=False)
    assert grams.owner[names[1]] == names[0]  # q and k read the same tensor: one G
    assert len(grams.grams) == 2 and grams.tokens == 48
    seen = []
    handle = model.get_submodule(names[2]).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=batches)
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    torch.testing.assert_close(grams.gram(names[2]), x.T @ x, rtol=1e-6, atol=1e-8)
    g = grams.gram(names[2])
    assert float(torch.linalg.eigvalsh(g + damping_shift(g) * torch.eye(g.shape[0], dtype=g.dtype)).min()) > 0


# --- the adapter module and the pipeline -------------------------------------------


@pytest.mark.parametrize("width", [48, 64, 96])
def test_wht_adapter_paths_agree(width, monkeypatch):
    from qpeft.methods.qwha import adapter as wht_adapter
    from qpeft.methods.qwha.adapter import WHTAdapter
    from qpeft.modules.quant_linear import QuantLinear

    d_out, count = 40, 120
    g = torch.Generator().manual_seed(width)
    adapter = WHTAdapter(width, d_out, count)
    flat = torch.randperm(d_out * width, generator=g)[:count].sort().values
    adapter.set_positions(torch.randn(count, generator=g), flat // width, flat % width)
    adapter.values.requires_grad_(True)
    dense = torch.zeros(d_out, width).index_put_((flat // width, flat % width), adapter.values.detach())
    expected_delta = dense @ WalshHadamard(width).matrix()
    torch.testing.assert_close(adapter.delta_weight().detach(), expected_delta, rtol=1e-5, atol=1e-5)
    layer = QuantLinear.from_linear(torch.nn.Linear(width, d_out, bias=False), PRESETS["nf4"])
    layer.adapter = adapter
    x = torch.randn(5, 7, width, generator=g)
    outputs = []
    for ratio in (1e9, 0.0):  # activations first, then merged (inference; training: tests/test_modules.py)
        monkeypatch.setattr(wht_adapter, "WHT_MERGE_TOKENS_PER_ROW", ratio)
        with torch.no_grad():
            outputs.append(layer(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs[0], x @ (layer.dequantized_weight() + expected_delta).T, rtol=1e-4, atol=1e-4)


def test_qwha_decompose_cli_writes_a_checkpoint_that_cancels_output_error(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    from qpeft.calibration.activations import load_grams
    from qpeft.io.checkpoint import read_manifest
    from qpeft.models.loading import load_checkpoint
    from qpeft.models.resolve import cache_dir
    from qpeft.models.weights import SafetensorsWeights
    from qpeft.quant import dequantize
    from tests.conftest import assert_one_line_error, run

    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    calib = ["--calib-sequences", 4, "--calib-seqlen", 32]
    out = tmp_path / "qwha"
    code, stdout, err = run(
        capsys, "decompose", tiny_model_dir, "--out", out, "--method", "qwha", "--config", "nf3", "--rank", 2, *calib
    )
    assert code == 0, err
    assert "config nf3-b64-s8x256-fp32" in stdout and "with the adapter (" in stdout
    manifest = read_manifest(out)
    assert manifest["method"] == "qwha" and manifest["grams"]["sequences"] == 4
    (gram_file,) = (cache_dir() / "activations").glob("*.safetensors")
    grams = load_grams(gram_file)
    model = load_checkpoint(out)
    weights = dict(SafetensorsWeights(tiny_model_dir).items())
    for name, entry in manifest["quantized"].items():
        assert entry["config"] == "nf3-b64-s8x256-fp32" and entry["adapter"]["kind"] == "wht"
        assert entry["adapter"]["count"] == entry["values"] == 2 * sum(entry["shape"])
        layer = model.get_submodule(name)
        w = weights[f"{name}.weight"].double()
        g = grams.gram(name)
        quant = w - dequantize(layer.quantized).double()
        full = quant - layer.adapter.delta_weight().detach().double()
        assert float(((full @ g) * full).sum()) < float(((quant @ g) * quant).sum())
    s = manifest["summary"]
    assert s["adapter_params"] == sum(e["values"] for e in manifest["quantized"].values())
    assert s["bits_with_adapter"] > s["bits_per_param"] and "bits_with_lowrank_nf8" not in s
    # with a budget: the ILP picks per-matrix configs from QWHA costs
    out2 = tmp_path / "qwha-ilp"
    grid = "nf2-b64-s8x256-fp16,nf3-b64-s8x256-fp16,nf4-b64-s8x256-fp16"
    code, _, err = run(
        capsys,
        "decompose",
        tiny_model_dir,
        "--out",
        out2,
        "--method",
        "qwha",
        "--budget",
        "3",
        "--configs",
        grid,
        "--rank",
        2,
        *calib,
    )
    assert code == 0, err
    manifest = read_manifest(out2)
    assert manifest["summary"]["bits_per_param"] <= 3.0
    assert all(e["table_cost"] >= 0 for e in manifest["quantized"].values())
    code, _, err = run(
        capsys,
        "decompose",
        tiny_model_dir,
        "--out",
        tmp_path / "x",
        "--method",
        "qwha",
        "--config",
        "nf3",
        "--no-fisher",
    )
    assert_one_line_error(
        code,
        err,
        "--no-fisher is for --method lqlora only, not qwha",
    )


def test_output_errors_match_captured_activations(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from qpeft.eval.output_error import output_errors
    from qpeft.models.selection import select_linear
    from qpeft.stages.quantize import quantize_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    names = select_linear(model)
    batches = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    grams = input_grams(LayerwiseLM(tiny_model_dir), names, batches, progress=False)
    quantize_model(tiny_model_dir, tmp_path / "nf3", PRESETS["nf3"])
    result = output_errors(tmp_path / "nf3", tiny_model_dir, grams)
    assert set(result.per_matrix) == set(names)
    name = "model.layers.1.self_attn.o_proj"
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=batches)
    handle.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1]).double()
    w = model.get_submodule(name).weight.detach().double()
    approx = simulate(w.float(), PRESETS["nf3"]).double()
    expected = float((x @ (w - approx).T).norm() / (x @ w.T).norm())
    assert result.per_matrix[name] == pytest.approx(expected, rel=1e-6)
    assert min(result.per_matrix.values()) <= result.total <= max(result.per_matrix.values())
