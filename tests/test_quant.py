"""Quantizer properties: codebooks, config strings, bit accounting, packing, round trips."""

import math
import re

import pytest
import torch

from qpeft.errors import QpeftError
from qpeft.quant import (
    PRESETS,
    NFConfig,
    bits_per_param,
    dequantize,
    nf_codebook,
    parse_config,
    parse_grid,
    quantize,
    simulate,
    storage_bits,
)
from qpeft.quant.codebooks import dynamic_codebook, nearest_level, uniform_codebook
from qpeft.quant.config import CUDA_CHUNK
from qpeft.quant.formats.normalfloat import dequantize_scales, normalized_blocks, scaled_levels
from qpeft.quant.packing import pack_codes, packed_numel, unpack_codes

ALL_CONFIGS = [
    NFConfig(b, B0, b0, B1, dt)
    for b in (2, 3, 4, 8)
    for B0 in (16, 64)
    for b0, B1 in ((2, 16), (3, 64), (4, 16), (8, 256), (None, None))
    for dt in ("fp16", "bf16", "fp32")
]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nf_codebook_shape(bits):
    levels = nf_codebook(bits)
    assert levels.numel() == 2**bits
    assert levels[0] == -1.0 and levels[-1] == 1.0
    assert (levels == 0).sum() == 1
    assert torch.all(levels[1:] > levels[:-1])
    # one more positive level than negative ones (zero shared): NF's asymmetry
    assert (levels > 0).sum() == 2 ** (bits - 1)


CODEBOOKS = {
    **{f"nf{b}": lambda b=b: nf_codebook(b) for b in (2, 3, 4, 8)},
    **{f"uniform{b}": lambda b=b: uniform_codebook(b) for b in (2, 3, 4)},
    "dynamic": dynamic_codebook,
}


@pytest.mark.parametrize("name", sorted(CODEBOOKS))
def test_nearest_level_equals_binary_search(name):
    """The table lookup must give bucketize's codes bit for bit, ties included: on
    random values, on every midpoint and its two float32 neighbours, on the levels
    themselves and outside the codebook's range."""
    codebook = CODEBOOKS[name]()
    midpoints = (codebook[:-1] + codebook[1:]) / 2
    generator = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.rand(200_000, generator=generator) * 2.2 - 1.1,
            torch.randn(50_000, generator=generator) * 1e-3,  # the dense part near zero
            midpoints,
            torch.nextafter(midpoints, torch.tensor(2.0)),
            torch.nextafter(midpoints, torch.tensor(-2.0)),
            codebook,
            torch.tensor([-5.0, -1.0, 0.0, 1.0, 5.0, -0.0]),
        ]
    )
    expected = torch.bucketize(x, midpoints, out_int32=True)
    assert torch.equal(nearest_level(x, codebook), expected)
    strided = x[: x.numel() // 11 * 11].view(-1, 11)[:, :7]  # a non-contiguous input keeps its shape
    assert torch.equal(nearest_level(strided, codebook), torch.bucketize(strided, midpoints, out_int32=True))


def test_nf4_matches_the_published_table():
    published = [-1.0, -0.69619, -0.52507, -0.39492, -0.28444, -0.18477, -0.09105, 0.0,
                 0.07958, 0.16093, 0.24611, 0.33792, 0.44071, 0.56262, 0.72296, 1.0]  # fmt: skip
    assert torch.allclose(nf_codebook(4), torch.tensor(published), atol=5e-6)


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=str)
def test_config_string_round_trip(config):
    assert parse_config(config.name) == config
    assert parse_config(config.name).name == config.name


def test_presets_and_their_bits():
    assert parse_config("nf4").name == "nf4-b64-s8x256-fp32"
    assert bits_per_param(PRESETS["nf4"]) == 4 + 8 / 64 + 32 / (64 * 256)
    assert round(bits_per_param(PRESETS["nf4"]), 3) == 4.127
    assert round(bits_per_param(PRESETS["nf3"]), 3) == 3.127
    assert round(bits_per_param(PRESETS["nf2"]), 3) == 2.127
    assert bits_per_param(parse_config("nf4-b64-fp16")) == 4.25


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nf5", "unknown quantization config 'nf5'"),
        ("int4-b64-fp32", "unknown quantization config"),
        ("nf5-b64-fp32", "code bits must be one of (2, 3, 4, 8), got 5"),
        ("nf4-b48-fp32", "block size must be a power of two from 8 to 4096, got 48"),
        ("nf4-b64-s8x100-fp32", "scale block size must be a power of two from 8 to 4096, got 100"),
        ("nf4-b64-s5x256-fp32", "scale bits must be one of (2, 3, 4, 8), got 5"),
    ],
)
def test_bad_config_strings(text, message):
    with pytest.raises(QpeftError, match=re.escape(message)):
        parse_config(text)


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=str)
def test_bits_per_param_equals_bytes_stored(config):
    # a size that divides B0·B1: the formula is exact, the fp32 offset aside
    rows = max(1, (config.block_size * (config.scale_block_size or 1)) // 64)
    weight = torch.randn(rows * 3, 64)
    qt = quantize(weight, config)
    stored_bits = qt.nbytes * 8
    offset_bits = 32 if config.double_quant else 0
    assert stored_bits - offset_bits == bits_per_param(config) * weight.numel()
    assert stored_bits == storage_bits(config, weight.shape)


@pytest.mark.parametrize("config", [parse_config(s) for s in ("nf4", "nf3-b16-s3x64-bf16", "nf2-b64-fp16")], ids=str)
@pytest.mark.parametrize("shape", [(7, 13), (576, 577), (1, 8), (33, 64)])
def test_padding_is_counted(config, shape):
    weight = torch.randn(shape)
    qt = quantize(weight, config)
    layout = config.layout(weight.numel())
    assert layout.padded_numel % config.block_size == 0 and layout.padded_numel >= weight.numel()
    assert qt.nbytes * 8 == storage_bits(config, weight.shape)
    # the padding makes the real cost per parameter higher than the asymptotic one
    assert storage_bits(config, weight.shape) / weight.numel() >= bits_per_param(config)
    assert dequantize(qt).shape == weight.shape


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_round_trip(bits):
    codes = torch.randint(0, 2**bits, (8 * 257,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_numel(codes.numel(), bits)
    assert packed.numel() * 8 == codes.numel() * bits
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_four_bit_packing_is_high_nibble_first():
    assert pack_codes(torch.tensor([1, 2, 15, 0]), 4).tolist() == [0x12, 0xF0]


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=str)
def test_on_grid_values_round_trip(config):
    # values already on the NF grid times exact block scales come back unchanged
    levels = nf_codebook(config.bits)
    blocks = 8 * (config.scale_block_size or 1)
    codes = torch.randint(0, levels.numel(), (blocks, config.block_size))
    codes[:, 0] = levels.numel() - 1  # each block reaches +1, so its absmax is its scale
    scales = torch.full((blocks, 1), 0.5)  # one scale everywhere: even 2-bit scales are exact
    weight = (levels[codes] * scales).reshape(-1, 64)
    assert torch.equal(dequantize(quantize(weight, config)), weight)


@pytest.mark.parametrize("config", [parse_config(s) for s in ("nf2", "nf3", "nf4", "nf8", "nf4-b64-fp32")], ids=str)
def test_error_is_bounded_by_half_the_largest_gap(config):
    weight = torch.randn(64, 256)
    deq = dequantize(quantize(weight, config))
    levels = nf_codebook(config.bits)
    half_gap = (levels[1:] - levels[:-1]).max() / 2
    absmax = weight.reshape(-1, config.block_size).abs().amax(1, keepdim=True)
    err = (deq - weight).reshape(-1, config.block_size).abs()
    # double quantization perturbs the scale by at most a few percent
    assert torch.all(err <= absmax * (half_gap * 1.05 + 0.05))


def test_more_bits_less_error():
    weight = torch.randn(256, 256)
    errors = [torch.linalg.norm(dequantize(quantize(weight, PRESETS[f"nf{b}"])) - weight) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.01 * torch.linalg.norm(weight)


def test_chunking_does_not_change_the_result():
    weight = torch.randn(300, 200)
    config = parse_config("nf3-b16-s4x16-bf16")
    whole = quantize(weight, config)
    chunked = quantize(weight, config, chunk=16 * 7)
    for key, tensor in whole.tensors().items():
        assert torch.equal(tensor, chunked.tensors()[key]), key
    assert torch.equal(dequantize(whole), dequantize(chunked, chunk=16 * 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_and_outputs(dtype):
    weight = torch.randn(64, 128, dtype=dtype)
    qt = quantize(weight, PRESETS["nf4"])
    assert torch.equal(qt.parts["codes"], quantize(weight.float(), PRESETS["nf4"]).parts["codes"])
    out = dequantize(qt, dtype=dtype)
    assert out.dtype == dtype
    assert torch.equal(out, dequantize(qt).to(dtype))


def test_zero_blocks_and_constant_scales():
    weight = torch.zeros(64, 64)
    weight[0, :8] = 1.0
    for config in (PRESETS["nf4"], parse_config("nf4-b16-s2x16-fp16")):
        assert torch.equal(dequantize(quantize(weight, config)), weight)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad):
    weight = torch.randn(16, 64)
    weight[3, 5] = bad
    with pytest.raises(QpeftError, match="NaN or Inf"):
        quantize(weight, PRESETS["nf4"])


def test_validate_names_the_bad_part():
    qt = quantize(torch.randn(64, 64), PRESETS["nf4"])
    parts = qt.tensors()
    parts["scales"] = parts["scales"][:-1]
    with pytest.raises(QpeftError, match=re.escape("'scales' should be torch.uint8 with 64 values")):
        type(qt).from_tensors(qt.config, qt.shape, parts)


@pytest.mark.cuda
def test_large_matrix_chunked_memory():
    """Dequantizing 8192×28672 stays near the output size: no full fp32 temporaries."""
    device = torch.device("cuda")
    weight = torch.randn(8192, 28672, device=device, dtype=torch.bfloat16)
    qt = quantize(weight, PRESETS["nf4"])
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = dequantize(qt, dtype=torch.bfloat16)
    extra = torch.cuda.max_memory_allocated() - base - out.numel() * 2
    # a few chunk-sized fp32/int32 temporaries (six fp32 chunks on an H200), not a
    # full fp32 copy (940 MB)
    assert extra < 8 * 4 * CUDA_CHUNK, extra
    assert math.isfinite(out.float().abs().max().item())


FOLLOWING = [c for c in parse_grid("lqlora") if c.codes_follow_scales]


def test_codes_follow_the_scales_exactly_below_8_bit_scales():
    """2–4-bit scales: the configs whose codes are chosen against the stored scale."""
    assert {c.scale_bits for c in FOLLOWING} == {2, 3, 4} and len(FOLLOWING) == 324
    assert not PRESETS["nf4"].codes_follow_scales  # bitsandbytes' order


@pytest.mark.parametrize("name", ["nf3-b64-s2x256-fp16", "nf4-b16-s2x256-bf16", "nf2-b32-s3x16-fp32"])
def test_each_value_takes_the_nearest_level_of_its_stored_scale(name):
    config = parse_config(name)
    weight = torch.randn(40, 200) * torch.rand(40, 1).add(0.1)
    deq = dequantize(quantize(weight, config))
    torch.testing.assert_close(simulate(weight, config), deq, rtol=0, atol=0)
    scales = dequantize_scales(quantize(weight, config)).repeat_interleave(config.block_size)[: weight.numel()]
    candidates = scales.view(*weight.shape, 1) * nf_codebook(config.bits)  # every level of every value's block
    best = (weight.unsqueeze(-1) - candidates).abs().amin(dim=-1)
    assert torch.all((weight - deq).abs() <= best + 1e-6 * scales.view(weight.shape))


def test_coding_against_the_stored_scale_never_costs_more_than_against_the_absmax():
    """Per value the stored-scale code is the nearest level: the squared error is at
    most that of the absmax's codes under the same scales, for every such grid config."""
    weight = torch.randn(64, 256)
    errors = []
    for config in FOLLOWING[::7]:
        _, absmax, levels = normalized_blocks(weight, config.bits, config.block_size)
        by_absmax = scaled_levels(levels, absmax, config, weight.shape)
        new, old = float((weight - simulate(weight, config)).square().sum()), float((weight - by_absmax).square().sum())
        assert new <= old * (1 + 1e-6), config.name
        errors.append(old / new)
    assert max(errors) > 1.1  # and it matters somewhere


def test_tables_are_made_once_per_device():
    """A dequantize on a GPU copies no codebook or byte table from the host: each is
    one shared tensor per device (meta stands in for another device here: a copy to
    it would be a new tensor each time)."""
    from qpeft.quant import nf_codebook
    from qpeft.quant.codebooks import dynamic_codebook
    from qpeft.quant.packing import decode_lut

    assert nf_codebook(4, "meta") is nf_codebook(4, torch.device("meta"))
    assert dynamic_codebook("meta") is dynamic_codebook("meta")
    first, second = decode_lut(nf_codebook(4, "meta"), 4), decode_lut(nf_codebook(4, "meta"), 4)
    assert first.device.type == "meta" and first.shape == second.shape == (256,)
