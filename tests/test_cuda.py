"""The CUDA paths, on a GPU only (marked `cuda`, skipped elsewhere; tools/gpu_check.py
runs them first on a lent GPU): the compiled fused kernel in bf16, quantization on
the device against the CPU's bytes, a QuantLinear training step through the kernel,
and one matrix's cost-table row on CUDA against the CPU's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qpeft.quant import dequantize, parse_config, quantize

pytestmark = pytest.mark.cuda
CONFIGS = ["nf4", "nf3", "nf2-b64-fp16", "nf8-b128-fp32", "int4-g128", "int3-g64", "int2-g32"]


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("config", CONFIGS)
def test_compiled_kernel_equals_dequantize_then_matmul(config):
    from qpeft.kernels.triton_dequant import dequant_matmul

    torch.manual_seed(0)
    for shape in [(1000, 1500), (4096, 1024)]:  # partial tiles, and full ones
        qt = quantize(torch.randn(shape, device="cuda"), parse_config(config))
        w = dequantize(qt, torch.float32)
        for dtype, tol in [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)]:
            x = torch.randn(333, shape[1], device="cuda").to(dtype)
            g = torch.randn(333, shape[0], device="cuda").to(dtype)
            wd = w.to(dtype).float()
            for got, ref in [(dequant_matmul(x, qt), x.float() @ wd.T), (dequant_matmul(g, qt, True), g.float() @ wd)]:
                assert got.dtype == dtype and torch.isfinite(got).all()
                assert relative_error(got, ref) < tol, (config, shape, dtype)


@pytest.mark.parametrize("config", ["nf4", "nf3-b64-s4x64-fp16", "int4-g128"])
def test_quantize_on_cuda_matches_cpu(config):
    """The same packed parts on the GPU as on the CPU: integer codes (the weights' and,
    double-quantized, the scales') may differ by one step only where a value sits on a
    decision boundary within rounding (the H200 moved some nf4 scale codes)."""
    torch.manual_seed(0)
    weight = torch.randn(512, 768)
    cpu, gpu = quantize(weight, parse_config(config)), quantize(weight.cuda(), parse_config(config))
    for name, part in cpu.parts.items():
        other = gpu.parts[name].cpu()
        if part.dtype.is_floating_point:
            assert torch.allclose(part.float(), other.float(), rtol=1e-6, atol=0), name
        else:
            # packed codes: compare the bytes (a one-step move changes one byte)
            moved = part != other
            assert moved.float().mean() < 1e-3, (name, int(moved.sum()), part.numel())
    assert relative_error(dequantize(gpu).cpu(), dequantize(cpu)) < 1e-4


def test_quant_linear_step_through_the_fused_kernel(monkeypatch):
    """Forward and backward of a QuantLinear with a LoRA under bf16 autocast: the
    fused kernel's outputs and gradients equal the torch dequantizer's."""
    from qpeft.modules import QuantLinear
    from qpeft.modules.adapters import LowRankAdapter

    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(1024, 768, bias=False).cuda(), parse_config("nf4"))
    layer.adapter = LowRankAdapter(1024, 768, 8, "cuda", torch.float32)
    with torch.no_grad():
        layer.adapter.left.normal_(0, 0.05)
        layer.adapter.right.normal_(0, 0.05)
    layer.adapter.requires_grad_(True)
    x = torch.randn(4, 128, 1024, device="cuda")

    def run(choice: str) -> list[torch.Tensor]:
        monkeypatch.setenv("QPEFT_DEQUANT", choice)
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(xi)
        y.float().square().mean().backward()
        grads = [xi.grad, *(p.grad.clone() for p in layer.adapter.parameters())]
        layer.adapter.zero_grad()
        return [y.detach(), *grads]

    for fused, ref in zip(run("triton"), run("torch"), strict=True):
        assert relative_error(fused, ref) < 1e-2


def test_cost_row_on_cuda_matches_cpu():
    """One matrix's LQ-LoRA costs over a small grid, on the GPU and on the CPU."""
    from qpeft.methods.lqlora.pricing import matrix_costs
    from qpeft.quant import parse_grid

    torch.manual_seed(0)
    weight = torch.randn(384, 512) * 0.02
    rows, cols = torch.rand(384) + 0.5, torch.rand(512) + 0.5
    grid = parse_grid("nf2-b64-s8x256-fp16,nf3-b64-s8x256-fp16,nf3-b32-s4x64-fp16,nf4-b64-s8x256-fp16")
    cpu = matrix_costs(weight, grid, 8, rows, cols)
    gpu = matrix_costs(weight.cuda(), grid, 8, rows.cuda(), cols.cuda())
    assert (abs(gpu - cpu) / cpu).max() < 0.02, (cpu, gpu)


def test_add_lora_on_a_cuda_model_draws_the_cpu_values(tiny_model_dir, tmp_path):
    """A QLoRA model loaded onto the GPU gets the same fresh LoRA as on the CPU."""
    from qpeft.models.loading import load_checkpoint
    from qpeft.quant import PRESETS
    from qpeft.stages.quantize import quantize_model
    from qpeft.training.model import add_lora

    quantize_model(tiny_model_dir, tmp_path / "nf4", PRESETS["nf4"])
    cpu, gpu = load_checkpoint(tmp_path / "nf4"), load_checkpoint(tmp_path / "nf4", device="cuda")
    add_lora(cpu, 4, 8.0, seed=0)
    add_lora(gpu, 4, 8.0, seed=0)
    for (name, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters(), strict=True):
        if "adapter" in name:
            assert b.is_cuda and torch.equal(a, b.cpu()), name
