"""Compute kernels for the frozen quantized base, chosen per device.

`QPEFT_DEQUANT` picks them: `auto` (default) dequantizes matrices in bitsandbytes'
NF4 format with its compiled kernels and everything else with qpeft's torch ops;
`torch` uses the torch ops only; `triton` runs the base's products as one fused
Triton dequantize-matmul kernel on CUDA (opt-in until it has been measured on a GPU:
so far it has run only in Triton's CPU interpreter).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch

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


def fused_dequant_matmul(device: torch.device) -> Callable | None:
    """`dequant_matmul(x, qt, transpose=False)` (x·deq(Q)ᵀ, or x·deq(Q)) fused in one
    Triton kernel for tensors on `device`, or None where it does not run (no Triton, not
    CUDA, or not asked for with QPEFT_DEQUANT=triton)."""
    return _fused_for(device.type, dequant_choice())
