"""Parity with bitsandbytes' NF4 + double quantization on CPU.

Packed NF4 codes are byte-identical. Scale codes agree except where bitsandbytes'
CPU kernel rounds a scale to a level that is not the nearest (its table-driven
search over the dynamic map); there qpeft's level is strictly nearer. qpeft's
dequantizer reproduces bitsandbytes' dequantization of bitsandbytes' own state
bit for bit.
"""

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from qpeft import kernels  # noqa: E402
from qpeft.kernels import DEQUANT_ENV  # noqa: E402
from qpeft.kernels.bnb import bnb_dequantize  # noqa: E402
from qpeft.quant import (  # noqa: E402
    PRESETS,
    dequantize,
    dynamic_codebook,
    quantize,
)
from qpeft.quant.bnb_format import from_bnb  # noqa: E402
from qpeft.quant.formats.normalfloat import dequantize_scales  # noqa: E402


def _bnb(weight):
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    return packed, state, bnbf.dequantize_4bit(packed, state)


def _check_parity(weight):
    packed, state, bnb_deq = _bnb(weight)
    qt = quantize(weight, PRESETS["nf4"])
    # 1. NF4 codes: byte for byte
    assert torch.equal(qt.parts["codes"][: packed.numel()], packed.reshape(-1))
    # 2. qpeft's dequantizer on bitsandbytes' state: bit for bit
    assert torch.equal(dequantize(from_bnb(packed, state), dtype=weight.dtype), bnb_deq)
    # 3. the same storage: as many scale codes, second-level scales, and code bytes
    assert qt.parts["scales"].numel() == state.absmax.numel()
    assert qt.parts["scale_scales"].numel() == state.state2.absmax.numel()
    assert qt.parts["codes"].numel() == -(-weight.numel() // 64) * 32
    # the scale offset and second-level absmax are the same numbers
    assert torch.equal(qt.parts["scale_offset"], state.offset.reshape(1))
    n = state.absmax.numel()
    ours, theirs = qt.parts["scales"][:n].long(), state.absmax.long()
    differ = ours != theirs
    assert differ.float().mean() < 0.005
    # 4. where the scale codes differ, qpeft's level is the nearer one
    absmax = weight.float().reshape(-1, 64).abs().amax(1) if weight.numel() % 64 == 0 else None
    if absmax is not None and differ.any():
        centred = (absmax - state.offset).reshape(-1)
        block_max = torch.nn.functional.pad(centred, (0, (-n) % 256)).reshape(-1, 256).abs().amax(1)
        target = centred / block_max.repeat_interleave(256)[:n]
        code = dynamic_codebook()
        assert torch.all((code[ours] - target).abs()[differ] < (code[theirs] - target).abs()[differ])
    # 5. so every dequantized block scale is at least as close to the true absmax
    if absmax is not None:
        bnb_scales = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert torch.all((dequantize_scales(qt)[:n] - absmax).abs() <= (bnb_scales - absmax).abs())
    # 6. the weights: identical in every block whose scale code agrees, and within a
    # scale level elsewhere
    ours_deq = dequantize(qt, dtype=weight.dtype)
    same_block = (~differ).repeat_interleave(64)[: weight.numel()].reshape(weight.shape)
    assert torch.equal(ours_deq[same_block], bnb_deq[same_block])
    assert torch.linalg.norm(ours_deq - bnb_deq) < 0.02 * torch.linalg.norm(weight.float())
    return differ.float().mean().item()


@pytest.mark.parametrize("shape", [(128, 256), (576, 576), (1536, 576), (100, 33), (1024, 1024)])
def test_parity_random(shape):
    torch.manual_seed(sum(shape))
    _check_parity(torch.randn(shape) * 0.02)


def test_parity_heavy_tailed():
    torch.manual_seed(1)
    weight = torch.distributions.StudentT(3.0).sample((512, 768)) * 0.01
    _check_parity(weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parity_half_inputs(dtype):
    torch.manual_seed(2)
    _check_parity((torch.randn(256, 512) * 0.02).to(dtype))


def test_scale_dequantization_matches_bnb_absmax():
    torch.manual_seed(3)
    packed, state, _ = _bnb(torch.randn(512, 512))
    expected = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(dequantize_scales(from_bnb(packed, state)), expected)


def test_parity_real_weights():
    """Real SmolLM2 matrices, read from the embedded GGUF without building the model."""
    gguf = pytest.importorskip("gguf")
    from qpeft.models.resolve import embedded_gguf

    path = embedded_gguf()
    reader = gguf.GGUFReader(str(path))
    wanted = {"blk.0.attn_q.weight", "blk.7.ffn_down.weight", "blk.29.ffn_up.weight", "token_embd.weight"}
    checked = 0
    for tensor in reader.tensors:
        if tensor.name in wanted:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            _check_parity(torch.from_numpy(values.copy()).float())
            checked += 1
    assert checked == len(wanted)


@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (3, 64), (5, 192)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bnb_kernels_dequantize_bit_for_bit(shape, dtype):
    qt = quantize(torch.randn(shape, generator=torch.Generator().manual_seed(1)), PRESETS["nf4"])
    fast = bnb_dequantize(qt, dtype)
    assert fast is not None  # bitsandbytes is installed here: its kernels must be taken
    assert torch.equal(fast, dequantize(qt, dtype))  # qpeft's torch ops
    assert torch.equal(kernels.dequantize(qt, dtype), fast)


@pytest.mark.parametrize("config", ["nf4-b64-fp32", "nf3", "nf4-b32-s8x256-fp32"])
def test_bnb_kernels_only_for_its_own_format(config):
    from qpeft.quant import parse_config

    qt = quantize(torch.randn(16, 64), parse_config(config))
    assert bnb_dequantize(qt, torch.float32) is None


@pytest.mark.parametrize("shape", [(6, 37), (64, 32), (2, 96)])
def test_bnb_kernels_skip_rows_of_partial_blocks(shape):
    # bitsandbytes 0.50's CPU kernel dequantizes 64x32 and 2x96 wrongly: qpeft's path takes them
    qt = quantize(torch.randn(shape), PRESETS["nf4"])
    assert bnb_dequantize(qt, torch.float32) is None
    assert torch.equal(kernels.dequantize(qt), dequantize(qt))


def test_bnb_kernels_can_be_turned_off(monkeypatch):
    qt = quantize(torch.randn(6, 64), PRESETS["nf4"])
    assert bnb_dequantize(qt, torch.float32) is not None  # the per-device probe has passed and is cached
    called = []
    monkeypatch.setattr("qpeft.kernels.bnb.bnb_dequantize", lambda *args: called.append(args))
    kernels.dequantize(qt)
    assert len(called) == 1
    monkeypatch.setenv(DEQUANT_ENV, "torch")
    assert torch.equal(kernels.dequantize(qt), dequantize(qt)) and len(called) == 1  # not asked
