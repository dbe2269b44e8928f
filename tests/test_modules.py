"""QuantLinear in training: the frozen base's backward, adapters' gradients, memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qpeft.methods.qwha import adapter as wht_adapter
from qpeft.methods.qwha.adapter import WHTAdapter
from qpeft.modules import QuantLinear
from qpeft.modules.adapters import LowRankAdapter
from qpeft.quant import PRESETS


def _layer(kind: str | None, d_in: int = 192, d_out: int = 96, bias: bool = False) -> QuantLinear:
    torch.manual_seed(0)
    linear = nn.Linear(d_in, d_out, bias=bias)
    layer = QuantLinear.from_linear(linear, PRESETS["nf4"])
    if kind == "lowrank":
        layer.adapter = LowRankAdapter(d_in, d_out, 4)
        layer.adapter.load_state_dict({"left": torch.randn(d_out, 4) * 0.1, "right": torch.randn(4, d_in) * 0.1})
    elif kind in ("wht", "wht-merged"):
        count = 300
        layer.adapter = WHTAdapter(d_in, d_out, count)
        flat = torch.randperm(d_out * d_in)[:count]
        layer.adapter.set_positions(torch.randn(count) * 0.1, flat // d_in, flat % d_in)
    if layer.adapter is not None:
        layer.adapter.requires_grad_(True)
    return layer


@pytest.mark.parametrize("kind", [None, "lowrank", "wht", "wht-merged"])
@pytest.mark.parametrize("bias", [False, True])
def test_training_forward_and_gradients_match_the_dense_layer(kind, bias, monkeypatch):
    """Both ways of applying an adapter in training (to the activations, or merged
    into the dequantized weight with ΔW's gradient passed through ΔW(θ)) give the
    dense layer's outputs and gradients."""
    monkeypatch.setattr(wht_adapter, "WHT_MERGE_TOKENS_PER_ROW", 0.0 if kind == "wht-merged" else 1e9)
    layer = _layer(kind, bias=bias)
    x = torch.randn(3, 5, 192, requires_grad=True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    got_x = x.grad.clone()
    got_adapter = [p.grad.clone() for p in layer.adapter.parameters()] if kind else []

    x.grad = None
    if kind:
        layer.adapter.zero_grad()
    delta = layer.adapter.delta_weight() if kind else 0.0
    dense = x @ (layer.dequantized_weight() + delta).T + (layer.bias if bias else 0.0)
    torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-5)
    (dense * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    torch.testing.assert_close(got_x, x.grad, rtol=1e-5, atol=1e-5)
    for got, expected in zip(got_adapter, [p.grad for p in layer.adapter.parameters()] if kind else [], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("kind", [None, "lowrank", "wht", "wht-merged"])
def test_the_backward_keeps_no_dequantized_weight(kind, monkeypatch):
    """What autograd holds between forward and backward is the activations (and the
    adapter's), never a d_out × d_in matrix: the base is dequantized again."""
    monkeypatch.setattr(wht_adapter, "WHT_MERGE_TOKENS_PER_ROW", 0.0 if kind == "wht-merged" else 1e9)
    layer = _layer(kind, d_in=512, d_out=1024)
    x = torch.randn(2, 512, requires_grad=True)
    dense_weight_bytes = 512 * 1024 * 4
    saved = _saved_bytes(lambda: layer(x))
    assert saved < dense_weight_bytes / 16, saved
    plain = nn.Linear(512, 1024, bias=False)
    assert _saved_bytes(lambda: plain(x)) >= dense_weight_bytes  # what a dense layer keeps


def test_gradients_survive_an_inference_pass():
    """bitsandbytes' CPU path repacks its weight after an inference forward and then
    silently drops the input gradient (methods.md §4); here an eval-mode no-grad pass
    between training steps changes nothing."""
    layer = _layer("lowrank")
    x = torch.randn(4, 192, requires_grad=True)
    layer(x).square().sum().backward()
    first = x.grad.clone()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(4, 192))
    layer.train()
    x.grad = None
    layer(x).square().sum().backward()
    torch.testing.assert_close(x.grad, first)
    assert torch.count_nonzero(x.grad) > 0


@pytest.mark.parametrize("kind", [None, "lowrank", "wht-merged"])
def test_autocast_dequantizes_straight_to_its_dtype(kind, monkeypatch):
    """Under bf16 autocast the base matmul runs in bf16 on a weight dequantized to bf16
    (not dequantized to fp32 and cast), forward and backward, and the gradients still
    come back in the input's dtype, close to an fp32 computation."""
    monkeypatch.setattr(wht_adapter, "WHT_MERGE_TOKENS_PER_ROW", 0.0 if kind == "wht-merged" else 1e9)
    layer = _layer(kind)
    x = torch.randn(6, 192, requires_grad=True)
    casts = []
    real = layer.dequantized_weight
    monkeypatch.setattr(layer, "dequantized_weight", lambda dtype=torch.float32: casts.append(dtype) or real(dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    assert casts == [torch.bfloat16, torch.bfloat16]  # forward and backward
    reference = x.detach() @ (real() + (layer.adapter.delta_weight() if kind else 0.0)).T
    torch.testing.assert_close(y.float(), reference, rtol=0.05, atol=0.05)


def test_wht_positions_are_stored_in_compressed_rows():
    """16 bits of column per value plus d_out + 1 row offsets, not 32 bits of (row,
    column); explicit pairs in any order (the first checkpoints' form) load the same."""
    torch.manual_seed(5)
    d_in, d_out, count = 192, 96, 300
    flat = torch.randperm(d_out * d_in)[:count]
    values = torch.randn(count)
    adapter = WHTAdapter(d_in, d_out, count)
    adapter.set_positions(values, flat // d_in, flat % d_in)
    state = adapter.state_dict()
    assert set(state) == {"values", "cols", "row_offsets"}
    assert state["cols"].dtype == torch.int16 and state["row_offsets"].shape == (d_out + 1,)
    dense = torch.zeros(d_out, d_in).index_put_((flat // d_in, flat % d_in), values)
    torch.testing.assert_close(adapter.coefficients(torch.float32), dense)
    old_form = {"values": values, "rows": (flat // d_in).short(), "cols": (flat % d_in).short()}
    again = WHTAdapter(d_in, d_out, count)
    again.load_state_dict(old_form)
    torch.testing.assert_close(again.delta_weight(), adapter.delta_weight())
    reloaded = WHTAdapter(d_in, d_out, count)
    reloaded.load_state_dict(state)
    assert torch.equal(reloaded.rows, adapter.rows) and torch.equal(reloaded.coefficients(torch.float32), dense)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_gives_the_eager_outputs_and_gradients(backend):
    import torch._dynamo

    layer = _layer("lowrank")
    x = torch.randn(8, 192, requires_grad=True)
    layer(x).square().sum().backward()
    eager = (x.grad.clone(), layer.adapter.left.grad.clone(), layer.adapter.right.grad.clone())
    x.grad = None
    layer.adapter.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend)
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    for got, expected in zip((x.grad, layer.adapter.left.grad, layer.adapter.right.grad), eager, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, tmp_path):
    """A whole model (QLoRA on the tiny LLaMA) with transformers' gradient
    checkpointing: the recomputed forward re-dequantizes, the gradients are the same."""
    from qpeft.models.loading import load_checkpoint
    from qpeft.stages.quantize import quantize_model
    from qpeft.training.model import add_lora, freeze_all_but_adapters

    quantize_model(tiny_model_dir, tmp_path / "nf4", PRESETS["nf4"])
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = load_checkpoint(tmp_path / "nf4")
        add_lora(model, 4, 8.0, seed=0)
        for layer in model.modules():  # L1 = 0 gives L2 no gradient: start elsewhere
            if isinstance(layer, LowRankAdapter):
                torch.nn.init.normal_(layer.left, std=0.02, generator=torch.Generator().manual_seed(1))
        params = freeze_all_but_adapters(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append([p.grad.clone() for p in params])
    assert model.is_gradient_checkpointing
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, recomputed, rtol=1e-5, atol=1e-7)
