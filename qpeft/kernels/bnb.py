"""bitsandbytes' compiled dequantize kernels for matrices stored in its own NF4
format (`qpeft.quant.bnb_format.BNB_CONFIG`): the same bits as qpeft's torch ops,
faster (OpenMP on CPU, CUDA on GPU). `qpeft.kernels.dequantize` chooses them."""

from __future__ import annotations

import functools
import logging

import torch

from qpeft.quant import QuantizedTensor, dequantize, quantize
from qpeft.quant.bnb_format import BNB_CONFIG
from qpeft.quant.codebooks import dynamic_codebook


@functools.cache
def _bnb_kernels_on(device: str) -> bool:
    """Whether bitsandbytes' dequantize kernels run on `device` and give, on a probe
    matrix, exactly what qpeft's own dequantizer gives (checked once per device)."""
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its CPU backend warns about an optional package
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

        probe = torch.linspace(-1.0, 1.0, 3 * 192, device=device).reshape(3, 192).sin()
        qt = quantize(probe, BNB_CONFIG)
        return all(
            torch.equal(_bnb_dequantize(qt, dtype), dequantize(qt, dtype)) for dtype in (torch.float32, torch.bfloat16)
        )
    except Exception:  # no bitsandbytes, or no kernel for this device: qpeft's path
        return False
    finally:
        quiet.setLevel(level)


def _bnb_dequantize(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    ops = torch.ops.bitsandbytes
    parts = qt.parts
    code, scale_block = dynamic_codebook(qt.device), BNB_CONFIG.scale_block_size
    absmax = ops.dequantize_blockwise.default(parts["scales"], parts["scale_scales"], code, scale_block, torch.float32)
    absmax += parts["scale_offset"]
    codes = parts["codes"][: (qt.numel + 1) // 2]  # bitsandbytes keeps no padding to whole blocks
    return ops.dequantize_4bit.default(codes, absmax, BNB_CONFIG.block_size, "nf4", list(qt.shape), dtype)


def bnb_dequantize(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor | None:
    """`dequantize(qt, dtype)` by bitsandbytes' compiled kernels (3x qpeft's torch ops
    for a 576x1536 NF4 matrix to bf16 on one CPU thread, tools/bench_dequant.py), bit
    for bit the same; None unless `qt` is stored in bitsandbytes' own format with rows
    of whole blocks (every LLM matrix) and those kernels are there."""
    if qt.config != BNB_CONFIG or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if qt.shape[-1] % BNB_CONFIG.block_size:
        # bitsandbytes 0.50's CPU kernel gets rows that are not whole blocks wrong
        # (e.g. 64x32, 2x96), and falls back to a torch.compile'd function on odd rows
        return None
    if not _bnb_kernels_on(str(qt.device)):
        return None
    return _bnb_dequantize(qt, dtype)
