"""bitsandbytes' 4-bit format: reading its quantization state as a
`QuantizedTensor`, and its compiled kernels as a faster `dequantize` for matrices
stored in that very format.

bitsandbytes stores NF4 codes exactly as qpeft does (flattened, blocks of 64, high
nibble first) and its double-quantized absmax as 8-bit dynamic-map codes with a
fp32 absmax per 256 codes and a fp32 mean offset; qpeft's `nf4` preset stores the
same parts with the same sizes (codes padded to whole blocks when the size does not
divide by 64).
"""

from __future__ import annotations

import functools
import logging

import torch

from qpeft.errors import QpeftError
from qpeft.kernels import dequant_choice
from qpeft.quant.blockwise import QuantizedTensor
from qpeft.quant.codebooks import dynamic_codebook
from qpeft.quant.config import PRESETS, QuantConfig, storage_layout

BNB_CONFIG = PRESETS["nf4"]  # NF4, blocks of 64, 8-bit dynamic-map scales per 256, fp32


def from_bnb(packed: torch.Tensor, quant_state) -> QuantizedTensor:
    """Wrap bitsandbytes' (packed weight, QuantState) of an NF4 tensor."""
    if quant_state.quant_type != "nf4":
        raise QpeftError(f"only NF4 bitsandbytes states can be read, got {quant_state.quant_type}")
    shape = tuple(quant_state.shape)
    state2 = quant_state.state2 if quant_state.nested else None
    if state2 is not None:
        config = QuantConfig(4, quant_state.blocksize, 8, state2.blocksize, "fp32")
    else:
        config = QuantConfig(4, quant_state.blocksize, None, None, "fp32")
    layout = storage_layout(config, quant_state.shape.numel())
    # bitsandbytes stores only the codes it needs; qpeft pads them to whole blocks
    codes = packed.reshape(-1).view(torch.uint8)
    codes = torch.nn.functional.pad(codes, (0, layout.padded_numel // 2 - codes.numel()))
    if state2 is not None:
        scales = torch.nn.functional.pad(quant_state.absmax, (0, layout.padded_num_blocks - quant_state.absmax.numel()))
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32).reshape(1)
        return QuantizedTensor.from_tensors(
            config, shape, {"codes": codes, "scales": scales, "scale_scales": state2.absmax, "scale_offset": offset}
        )
    return QuantizedTensor.from_tensors(config, shape, {"codes": codes, "scales": quant_state.absmax.float()})


@functools.cache
def _bnb_kernels_on(device: str) -> bool:
    """Whether bitsandbytes' dequantize kernels run on `device` and give, on a probe
    matrix, exactly what qpeft's own dequantizer gives (checked once per device)."""
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its CPU backend warns about an optional package
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

        from qpeft.quant.blockwise import dequantize, quantize

        probe = torch.linspace(-1.0, 1.0, 3 * 192, device=device).reshape(3, 192).sin()
        qt = quantize(probe, BNB_CONFIG)
        return all(
            torch.equal(_bnb_dequantize(qt, dtype), dequantize(qt, dtype, use_bnb=False))
            for dtype in (torch.float32, torch.bfloat16)
        )
    except Exception:  # no bitsandbytes, or no kernel for this device: qpeft's path
        return False
    finally:
        quiet.setLevel(level)


def _bnb_dequantize(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    ops = torch.ops.bitsandbytes
    code, scale_block = dynamic_codebook(qt.codes.device), BNB_CONFIG.scale_block_size
    absmax = ops.dequantize_blockwise.default(qt.scales, qt.scale_scales, code, scale_block, torch.float32)
    absmax += qt.scale_offset
    codes = qt.codes[: (qt.numel + 1) // 2]  # bitsandbytes keeps no padding to whole blocks
    return ops.dequantize_4bit.default(codes, absmax, BNB_CONFIG.block_size, "nf4", list(qt.shape), dtype)


def bnb_dequantize(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor | None:
    """`dequantize(qt, dtype)` by bitsandbytes' compiled kernels (OpenMP on CPU, CUDA
    on GPU; 3x qpeft's torch ops for a 576x1536 NF4 matrix to bf16 on one CPU thread,
    tools/bench_dequant.py),
    bit for bit the same; None unless `qt` is stored in bitsandbytes' own format with
    rows of whole blocks (every LLM matrix) and those kernels are there (and not turned off with
    QPEFT_DEQUANT=torch)."""
    if qt.config != BNB_CONFIG or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if dequant_choice() == "torch":
        return None
    if qt.shape[-1] % BNB_CONFIG.block_size:
        # bitsandbytes 0.50's CPU kernel gets rows that are not whole blocks wrong
        # (e.g. 64x32, 2x96), and falls back to a torch.compile'd function on odd rows
        return None
    if not _bnb_kernels_on(str(qt.codes.device)):
        return None
    return _bnb_dequantize(qt, dtype)
