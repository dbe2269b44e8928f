"""Fused dequantize-and-matmul for the frozen base on the GPU (Triton).

    y = x · deq(Q)ᵀ   (forward, `transpose=False`)
    g = y · deq(Q)    (input gradient, `transpose=True`)

without materialising deq(Q): each program loads the packed codes of one tile of W,
unpacks them (2, 3, 4 or 8 bits, MSB-first as `qpeft.quant.packing` stores them),
decodes them — NormalFloat: the codebook level times the fp32 block scale; integer
(`int<b>-g<G>`): (q − z)·s with the fp16 scale and zero of the element's (row, group)
— and feeds the tile to `tl.dot`, accumulating in fp32 (QLoRA §3's "dequantize, then matmul in
the compute dtype", in one pass over the codes instead of a d_out × d_in round trip
through memory). The block scales (one fp32 per B0 values, double quantization
already undone by `dequantize_scales`) are computed per call: numel / B0 values.

The tile sizes are a heuristic (small M: decode; large M: training/prefill), not yet
tuned on a GPU. Runs under Triton's CPU interpreter (TRITON_INTERPRET=1), which is
how the tests check it without a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qpeft.quant import QuantConfig, QuantizedTensor, nf_codebook
from qpeft.quant.formats.integer import IntConfig
from qpeft.quant.formats.normalfloat import NFConfig, dequantize_scales

INTERPRET_ENV = "TRITON_INTERPRET"


@triton.jit
def _unpack(codes_ptr, flat, mask, BITS: tl.constexpr):
    """The b-bit codes at flat element indices `flat` (MSB-first bit stream); 0 where
    `mask` is off."""
    if BITS == 8:
        code = tl.load(codes_ptr + flat, mask=mask, other=0).to(tl.int32)
    elif BITS == 3:
        group = (flat // 8) * 3  # 8 codes in 3 bytes
        pos = flat % 8
        b0 = tl.load(codes_ptr + group, mask=mask, other=0).to(tl.int32)
        b1 = tl.load(codes_ptr + group + 1, mask=mask, other=0).to(tl.int32)
        b2 = tl.load(codes_ptr + group + 2, mask=mask, other=0).to(tl.int32)
        word = (b0 << 16) | (b1 << 8) | b2
        code = (word >> (21 - 3 * pos)) & 7
    else:
        per_byte: tl.constexpr = 8 // BITS
        byte = tl.load(codes_ptr + flat // per_byte, mask=mask, other=0).to(tl.int32)
        shift = (per_byte - 1 - flat % per_byte) * BITS
        code = (byte >> shift) & ((1 << BITS) - 1)
    return code


@triton.jit
def _dequant_matmul_kernel(
    x_ptr,
    codes_ptr,
    codebook_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,
    M,
    N,
    K,
    in_features,
    stride_xm,
    stride_xk,
    stride_om,
    stride_on,
    TRANSPOSE: tl.constexpr,
    BITS: tl.constexpr,
    INTEGER: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    # out[M, N] = x[M, K] · op(W); W is (d_out, d_in) row-major, flattened, quantized.
    # TRANSPOSE False: op(W) = Wᵀ (K = d_in, N = d_out); True: op(W) = W (K = d_out, N = d_in).
    # BLOCK: NF's values per scale; integer: the group size G along d_in.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
            mask=(rows[:, None] < M) & (ks[None, :] < K),
            other=0.0,
        )
        # the (BLOCK_K, BLOCK_N) tile of op(W): element (k, n)
        if TRANSPOSE:  # noqa: SIM108  (a constexpr branch in Triton)
            flat = ks[:, None] * in_features + cols[None, :]
        else:
            flat = cols[None, :] * in_features + ks[:, None]
        inside = (ks[:, None] < K) & (cols[None, :] < N)
        code = _unpack(codes_ptr, flat, inside, BITS)
        if INTEGER:
            # (row, group) of each element: one fp16 scale and zero per G columns
            row, col = flat // in_features, flat % in_features
            group = row * tl.cdiv(in_features, BLOCK) + col // BLOCK
            scale = tl.load(scales_ptr + group, mask=inside, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + group, mask=inside, other=0.0).to(tl.float32)
            w = ((code.to(tl.float32) - zero) * scale).to(x.dtype)
        else:
            level = tl.load(codebook_ptr + code, mask=inside, other=0.0)
            scale = tl.load(scales_ptr + flat // BLOCK, mask=inside, other=0.0)
            w = (level * scale).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=(rows[:, None] < M) & (cols[None, :] < N),
    )


def supports(config: QuantConfig) -> bool:
    """The kernel decodes NormalFloat codes (any b, B0 and scale format) and the
    integer family (any b and G)."""
    return isinstance(config, NFConfig | IntConfig)


def fused_available(device: torch.device) -> bool:
    """Whether the fused kernel runs for tensors on `device`: CUDA, or anything under
    Triton's interpreter."""
    return device.type == "cuda" or os.environ.get(INTERPRET_ENV) == "1"


def dequant_matmul(x: torch.Tensor, qt: QuantizedTensor, transpose: bool = False) -> torch.Tensor:
    """x · deq(Q)ᵀ (`transpose` False; x: (..., d_in) → (..., d_out)) or x · deq(Q)
    (`transpose` True; x: (..., d_out) → (..., d_in)), in x's dtype, fp32 accumulation."""
    d_out, d_in = qt.shape
    if qt.numel >= 2**31:
        raise ValueError(f"fused dequant-matmul indexes with int32: a {d_out}x{d_in} matrix is too large")
    k_dim, n_dim = (d_out, d_in) if transpose else (d_in, d_out)
    x2 = x.reshape(-1, k_dim)
    m_dim = x2.shape[0]
    out = torch.empty(m_dim, n_dim, dtype=x.dtype, device=x.device)
    config = qt.config
    integer = isinstance(config, IntConfig)
    # a branch's unused pointer (integer: the codebook; NF: the zeros) gets any tensor
    if integer:
        scales, zeros, block = qt.parts["scales"], qt.parts["zeros"], config.group_size
        codebook = scales
    else:
        scales, block = dequantize_scales(qt), config.block_size
        codebook = nf_codebook(config.bits, x.device).to(torch.float32)
        zeros = scales
    block_m = 16 if m_dim <= 16 else 64
    block_n, block_k = 64, 32
    grid = (triton.cdiv(m_dim, block_m), triton.cdiv(n_dim, block_n))
    _dequant_matmul_kernel[grid](
        x2,
        qt.parts["codes"],
        codebook,
        scales,
        zeros,
        out,
        m_dim,
        n_dim,
        k_dim,
        d_in,
        x2.stride(0),
        x2.stride(1),
        out.stride(0),
        out.stride(1),
        TRANSPOSE=transpose,
        BITS=config.bits,
        INTEGER=integer,
        BLOCK=block,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32,
    )
    return out.reshape(*x.shape[:-1], n_dim)
