"""Error-feedback (GPTQ) rounding onto the blockwise NF grid, and codes packed from outside."""

from __future__ import annotations

import pytest
import torch

from qpeft.errors import QpeftError
from qpeft.quant import dequantize, nf_codebook, parse_config, quantize
from qpeft.quant.codebooks import nearest_level
from qpeft.quant.formats.normalfloat import normalized_blocks, pack_quantized, simulated_scales
from qpeft.quant.gptq import gptq_quantize

CONFIGS = ["nf3-b64-s4x64-fp16", "nf4-b64-s8x256-fp32", "nf2-b16-s2x16-bf16", "nf3-b32-fp32"]


def correlated_gram(d_in: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """XᵀX (fp64) of inputs whose channels are strongly correlated and unevenly scaled."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d_in) + 2 * torch.randn(d_in, d_in, generator=g) / d_in**0.5
    x = torch.randn(tokens, d_in, generator=g) @ mix * torch.rand(d_in, generator=g).add(0.2)
    return (x.T @ x).double()


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    delta = (weight - approx).double()
    return float(((delta @ gram) * delta).sum())


@pytest.mark.parametrize("name", CONFIGS)
def test_pack_quantized_of_nearest_codes_is_quantize(name):
    config = parse_config(name)
    weight = torch.randn(24, 96) * torch.rand(24, 1)
    blocks, absmax, levels = normalized_blocks(weight, config.bits, config.block_size)
    if config.codes_follow_scales:  # the nearest levels of x / s, s the stored scales
        inverse = 1.0 / simulated_scales(absmax, config).clamp(min=1e-38)
        levels = torch.clamp(blocks * inverse.unsqueeze(1), -1, 1)
    codes = nearest_level(levels.reshape(-1)[: weight.numel()], nf_codebook(config.bits))
    packed = pack_quantized(codes.view(weight.shape), absmax, config, tuple(weight.shape))
    expected = quantize(weight, config)
    for key, tensor in expected.tensors().items():
        assert torch.equal(packed.tensors()[key], tensor), key


def test_pack_quantized_checks_sizes():
    config = parse_config("nf4-b64-s8x256-fp32")
    with pytest.raises(QpeftError, match="130 codes and 2 scales do not fit nf4-b64-s8x256-fp32 on \\(2, 64\\)"):
        pack_quantized(torch.zeros(130, dtype=torch.int32), torch.ones(2), config, (2, 64))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_halves_the_output_error_of_nearest_rounding(name, act_order):
    config = parse_config(name)
    weight = torch.randn(64, 256) * 0.02
    gram = correlated_gram(256)
    nearest = output_error(weight, dequantize(quantize(weight, config)), gram)
    feedback = output_error(weight, dequantize(gptq_quantize(weight, config, gram, act_order=act_order)), gram)
    assert feedback < 0.6 * nearest


@pytest.mark.parametrize("name", CONFIGS)
def test_gptq_keeps_the_scales_and_the_format(name):
    config = parse_config(name)
    weight = torch.randn(32, 128)
    before = weight.clone()
    qt = gptq_quantize(weight, config, correlated_gram(128))
    assert torch.equal(weight, before)  # the input is not written to
    qt.validate()
    nearest = quantize(weight, config)
    for key in ("scales", "scale_scales", "scale_offset"):
        if key in nearest.tensors():
            assert torch.equal(qt.tensors()[key], nearest.tensors()[key]), key
    assert not torch.equal(qt.parts["codes"], nearest.parts["codes"])


def test_gptq_with_uncorrelated_inputs_is_nearest_rounding():
    # H diagonal: no error is passed on, and with plain fp32 scales the grid is the same
    config = parse_config("nf3-b32-fp32")
    weight = torch.randn(16, 64)
    gram = torch.diag(torch.rand(64).add(0.5)).double()
    assert torch.equal(gptq_quantize(weight, config, gram).parts["codes"], quantize(weight, config).parts["codes"])


def test_gptq_dead_input_channels():
    config = parse_config("nf4-b64-fp32")
    weight = torch.randn(8, 64)
    gram = correlated_gram(64)
    gram[:, 5] = 0
    gram[5, :] = 0
    approx = dequantize(gptq_quantize(weight, config, gram))
    assert torch.isfinite(approx).all()
    # the dead channel passes no error on and is rounded to the nearest level
    assert torch.equal(approx[:, 5], dequantize(quantize(weight, config))[:, 5])


def test_gptq_errors():
    config = parse_config("nf4-b64-s8x256-fp32")
    with pytest.raises(QpeftError, match=r"a \(32, 32\) input second moment does not fit a \(8, 64\) matrix"):
        gptq_quantize(torch.randn(8, 64), config, torch.eye(32))
    weight = torch.randn(8, 64)
    weight[0, 0] = float("nan")
    with pytest.raises(QpeftError, match="NaN or Inf"):
        gptq_quantize(weight, config, torch.eye(64))


def test_lqlora_rounding_settings_are_checked():
    from qpeft.methods.lqlora import LQLoRA

    with pytest.raises(QpeftError, match="gptq rounding needs the calibration activations"):
        LQLoRA(rounding="gptq")
    with pytest.raises(QpeftError, match="unknown rounding 'stochastic': choose nearest or gptq"):
        LQLoRA(rounding="stochastic")
