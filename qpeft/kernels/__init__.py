"""Compute kernels for the frozen quantized base, chosen per device.

`QPEFT_DEQUANT` picks them: `auto` (default) dequantizes matrices in bitsandbytes'
NF4 format with its compiled kernels and everything else with qpeft's torch ops;
`torch` uses the torch ops only; `triton` runs the base's products as one fused
Triton dequantize-matmul kernel on CUDA. That kernel stays opt-in: on an H200
(tools/gpu_check.py, docs/RESULTS.md) it ran NF configs at about 6 TFLOP/s and integer
ones at about 50, against 490-680 for bitsandbytes' NF4 dequantize + cuBLAS.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch

from qpeft.quant import QuantConfig, QuantizedTensor
from qpeft.quant import dequantize as torch_dequantize

DEQUANT_ENV = "QPEFT_DEQUANT"
CHOICES = ("auto", "torch", "triton")


def dequant_choice() -> str:
    choice = os.environ.get(DEQUANT_ENV, "auto")
    if choice not in CHOICES:
        from qpeft.errors import QpeftError

        raise QpeftError(f"{DEQUANT_ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    return choice


@functools.cache
def _fused_for(device_type: str, choice: str) -> Callable | None:
    if choice != "triton" or importlib.util.find_spec("triton") is None:
        return None
    from qpeft.kernels.triton_dequant import dequant_matmul, fused_available

    return dequant_matmul if fused_available(torch.device(device_type)) else None


def fused_dequant_matmul(device: torch.device, config: QuantConfig) -> Callable | None:
    """`dequant_matmul(x, qt, transpose=False)` (x·deq(Q)ᵀ, or x·deq(Q)) fused in one
    Triton kernel for matrices of `config` on `device`, or None where it does not run
    (no Triton, not CUDA, a format it has no kernel for, or not asked for with
    QPEFT_DEQUANT=triton)."""
    fused = _fused_for(device.type, dequant_choice())
    if fused is None:
        return None
    from qpeft.kernels.triton_dequant import supports

    return fused if supports(config) else None


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """deq(Q) in `dtype` for the frozen base: bitsandbytes' compiled kernels for a
    matrix in its own NF4 format where they run and give qpeft's bits (checked once per
    device, `qpeft.kernels.bnb`) unless QPEFT_DEQUANT=torch; qpeft's torch ops for
    everything else. The same values either way."""
    if dequant_choice() != "torch":
        from qpeft.kernels.bnb import bnb_dequantize

        fast = bnb_dequantize(qt, dtype)
        if fast is not None:
            return fast
    return torch_dequantize(qt, dtype)
