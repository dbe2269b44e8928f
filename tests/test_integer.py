"""The asymmetric integer format int<b>-g<G>: names, bits, arithmetic against a plain
reference, GPTQ, and its use everywhere a config is read (checkpoints, the CLI, the
cost table and mixed-format grids)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from qpeft.errors import QpeftError
from qpeft.methods.lqlora import matrix_costs
from qpeft.models.loading import load_checkpoint
from qpeft.quant import QuantizedTensor, dequantize, parse_config, parse_grid, quantize, simulate, storage_bits
from qpeft.quant.formats.integer import IntConfig
from qpeft.quant.gptq import gptq_quantize
from tests.conftest import run

NAMES = [f"int{b}-g{g}" for b in (2, 3, 4, 8) for g in (32, 64, 128)]


def reference(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """deq(quant(W)) written out group by group, as the format's docstring states it."""
    out = torch.empty_like(weight)
    top = 2**bits - 1
    for i in range(weight.shape[0]):
        for start in range(0, weight.shape[1], group):
            g = weight[i, start : start + group]
            lo, hi = min(float(g.min()), 0.0), max(float(g.max()), 0.0)
            s = torch.tensor((hi - lo) / top).half().float().clamp(min=2**-24)
            z = (-lo / s).half().float()
            q = torch.clamp(torch.round(g / s + z), 0, top)
            out[i, start : start + group] = (q - z) * s
    return out


@pytest.mark.parametrize("name", NAMES)
def test_names_and_bits(name):
    config = parse_config(name)
    assert isinstance(config, IntConfig) and config.name == name and str(config) == name
    assert config.bits_per_param == config.bits + 32 / config.group_size
    weight = torch.randn(12, 4 * config.group_size)
    qt = quantize(weight, config)
    assert qt.format == "int" and set(qt.parts) == {"codes", "scales", "zeros"}
    assert qt.nbytes * 8 == storage_bits(config, weight.shape) == config.bits_per_param * weight.numel()


def test_int4_g128_is_4_25_bits_and_partial_groups_are_counted():
    config = parse_config("int4-g128")
    assert storage_bits(config, (4096, 4096)) / 4096**2 == 4.25
    # SmolLM2's d_in 576 = 4.5 groups of 128: five groups per row are stored
    assert storage_bits(config, (1536, 576)) == 1536 * 576 * 4 + 1536 * 5 * 32


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("int5-g128", "code bits must be one of (2, 3, 4, 8), got 5"),
        ("int4-g100", "group size must be a power of two from 8 to 4096, got 100"),
        ("int4", "unknown quantization config 'int4': use a preset (nf2, nf3, nf4, nf8) or the form"),
    ],
)
def test_bad_names(text, message):
    with pytest.raises(QpeftError, match=re.escape(message)):
        parse_config(text)


@pytest.mark.parametrize("name", ["int2-g32", "int3-g64", "int4-g128", "int8-g32"])
@pytest.mark.parametrize("shape", [(6, 256), (5, 200), (3, 7)])
def test_arithmetic_equals_the_plain_reference(name, shape):
    config = parse_config(name)
    weight = torch.randn(shape) * torch.logspace(-3, 1, shape[0]).unsqueeze(1)
    expected = reference(weight, config.bits, config.group_size)
    assert torch.equal(simulate(weight, config), expected)
    assert torch.equal(dequantize(quantize(weight, config)), expected)
    # chunking changes nothing (row chunks that start inside a 3-bit packing group too)
    assert torch.equal(dequantize(quantize(weight, config, chunk=shape[1]), chunk=3 * shape[1]), expected)


def test_error_is_at_most_half_a_step_and_zero_groups_stay_zero():
    config = parse_config("int3-g32")
    weight = torch.randn(8, 128)
    weight[2] = 0.0
    qt = quantize(weight, config)
    deq = dequantize(qt)
    steps = qt.parts["scales"].float().view(8, 4).repeat_interleave(32, dim=1)
    assert torch.all((deq - weight).abs() <= steps / 2 * (1 + 1e-3))
    assert torch.equal(deq[2], weight[2])


def test_part_sizes_are_checked():
    config = parse_config("int4-g64")
    qt = quantize(torch.randn(4, 128), config)
    parts = dict(qt.parts, zeros=qt.parts["zeros"][:-1])
    with pytest.raises(QpeftError, match=r"quantized tensor part 'zeros' should be torch\.float16 with 8 values"):
        QuantizedTensor.from_tensors(config, qt.shape, parts)
    with pytest.raises(QpeftError, match="tensor contains NaN or Inf values"):
        quantize(torch.full((2, 64), float("nan")), config)


@pytest.mark.parametrize("name", ["int3-g64", "int4-g128"])
def test_gptq_lowers_the_output_error_and_is_nearest_rounding_without_correlation(name):
    config = parse_config(name)
    mix = torch.randn(256, 256) / 16 + torch.eye(256)
    x = torch.randn(1024, 256) @ mix  # correlated input channels
    weight = torch.randn(48, 256)
    gram = x.T @ x
    rtn, gptq = quantize(weight, config), gptq_quantize(weight, config, gram)
    assert gptq.config == config and gptq.parts["scales"].equal(rtn.parts["scales"])
    error = {k: float(((dequantize(q) - weight) @ x.T).norm()) for k, q in (("rtn", rtn), ("gptq", gptq))}
    assert error["gptq"] < 0.85 * error["rtn"]
    identity = gptq_quantize(weight, config, torch.eye(256))
    assert torch.equal(identity.parts["codes"], rtn.parts["codes"])


def test_grids_mix_families_and_the_cost_table_prices_each_exactly():
    grid = parse_grid("int, nf3")
    assert [c.name for c in grid[:3]] == ["int2-g32", "int2-g64", "int2-g128"] and grid[-1].name.startswith("nf3")
    assert len(grid) == 13
    weight = torch.randn(32, 128)
    costs = matrix_costs(weight, grid, rank=0)
    for config, cost in zip(grid, costs, strict=True):
        direct = float((weight - simulate(weight, config)).double().square().sum())
        assert math.isclose(cost, direct, rel_tol=1e-6)
    low_rank = matrix_costs(weight, grid, rank=4, refine_iters=2)
    assert all(low <= zero * (1 + 1e-6) for low, zero in zip(low_rank, costs, strict=True))


def test_checkpoint_cli_and_decompose(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "int4"
    code, _, err = run(capsys, "quantize", str(tiny_model_dir), "--config", "int4-g32", "--out", str(out))
    assert code == 0, err
    manifest = json.loads((out / "qpeft_manifest.json").read_text())
    assert {e["config"] for e in manifest["quantized"].values()} == {"int4-g32"}
    model = load_checkpoint(out)
    layer = model.model.layers[0].self_attn.k_proj
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = simulate(source.model.layers[0].self_attn.k_proj.weight, parse_config("int4-g32"))
    assert torch.equal(layer.dequantized_weight(), expected)

    lowrank = tmp_path / "int3-r0"
    code, _, err = run(
        capsys, "decompose", str(tiny_model_dir), "--config", "int3-g32", "--rank", "0", "--no-fisher",
        "--out", str(lowrank),
    )  # fmt: skip
    assert code == 0, err
    assert {e["config"] for e in json.loads((lowrank / "qpeft_manifest.json").read_text())["quantized"].values()} == {
        "int3-g32"
    }
