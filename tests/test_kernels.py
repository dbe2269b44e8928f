"""The fused dequantize-matmul kernel (Triton), checked in Triton's CPU interpreter.

Each check runs in a fresh process with TRITON_INTERPRET=1 (Triton reads it when a
kernel is defined). The interpreter has no bfloat16, so half precision is tested in
fp16; on a GPU the same kernel runs compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")


def _interpret(code: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "QPEFT_DEQUANT": "triton"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize(
    "config", ["nf4", "nf3", "nf2-b64-fp16", "nf8-b128-fp32", "nf3-b16-s4x64-bf16", "int4-g32", "int3-g64", "int2-g8"]
)
def test_fused_products_equal_dequantize_then_matmul(config):
    _interpret(f"""
        import torch
        from qpeft.kernels.triton_dequant import dequant_matmul
        from qpeft.quant import dequantize, parse_config, quantize
        torch.manual_seed(0)
        for shape in [(40, 72), (17, 96)]:  # partial tiles; 17x96 ends mid-block, 72 mid-group
            qt = quantize(torch.randn(shape), parse_config({config!r}))
            for dtype, tol in [(torch.float32, 1e-5), (torch.float16, 2e-3)]:
                w = dequantize(qt, torch.float32).to(dtype).float()
                x = torch.randn(3, 5, shape[1]).to(dtype)
                g = torch.randn(3, 5, shape[0]).to(dtype)
                for got, ref in [(dequant_matmul(x, qt), x.float() @ w.T),
                                 (dequant_matmul(g, qt, transpose=True), g.float() @ w)]:
                    assert got.dtype == dtype and got.shape == ref.shape
                    err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
                    assert err < tol, (shape, dtype, err)
    """)


def test_quant_linear_takes_the_fused_kernel_with_the_same_outputs_and_gradients():
    _interpret("""
        import torch
        from torch import nn
        import qpeft.kernels as kernels
        import qpeft.kernels.triton_dequant as td
        from qpeft.modules import QuantLinear
        from qpeft.modules.adapters import LowRankAdapter
        from qpeft.quant import PRESETS

        calls = []
        original = td.dequant_matmul
        def counted(*args, **kwargs):
            calls.append(kwargs.get("transpose", False))
            return original(*args, **kwargs)
        td.dequant_matmul = counted

        torch.manual_seed(0)
        layer = QuantLinear.from_linear(nn.Linear(128, 48, bias=True), PRESETS["nf4"])
        layer.adapter = LowRankAdapter(128, 48, 4)
        layer.adapter.load_state_dict({"left": torch.randn(48, 4) * 0.1, "right": torch.randn(4, 128) * 0.1})
        layer.adapter.requires_grad_(True)
        x = torch.randn(2, 3, 128)

        def run():
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            y.square().sum().backward()
            grads = [xi.grad] + [p.grad.clone() for p in layer.adapter.parameters()]
            layer.adapter.zero_grad()
            with torch.no_grad():
                inference = layer(x)
            return [y.detach(), inference] + grads

        fused = run()
        assert calls == [False, True, False], calls  # forward, input gradient, inference
        kernels.os.environ["QPEFT_DEQUANT"] = "torch"
        reference = run()
        assert len(calls) == 3  # the torch path did not call the kernel
        for a, b in zip(fused, reference):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()
    """)
