"""Uniform quantization of a model into a qpeft checkpoint, and loading it back."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qpeft.errors import QpeftError
from qpeft.eval.perplexity import perplexity, tokenize
from qpeft.io.checkpoint import MANIFEST_NAME
from qpeft.models.loading import load_checkpoint
from qpeft.models.selection import select_linear
from qpeft.models.skeleton import build_skeleton
from qpeft.modules import QuantLinear
from qpeft.quant import dequantize, parse_config, quantize, storage_bits
from qpeft.stages import quantize as quantize_stage
from qpeft.stages.quantize import quantize_model


def reference_model(model_dir, config):
    """The HF model with every selected weight replaced by deq(quant(W))."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for name in select_linear(model):
        linear = model.get_submodule(name)
        with torch.no_grad():
            linear.weight.copy_(dequantize(quantize(linear.weight, config)))
    return model


def test_selection_patterns(tiny_model_dir):
    skeleton = build_skeleton(tiny_model_dir)
    default = select_linear(skeleton)
    assert len(default) == 14 and "lm_head" not in default
    assert select_linear(skeleton, r"model\.layers\.0\..*") == [n for n in default if n.startswith("model.layers.0.")]
    assert select_linear(skeleton, ["lm_head"]) == ["lm_head"]
    with pytest.raises(QpeftError, match=r"no linear layer matches the targets \['attn'\]"):
        select_linear(skeleton, ["attn"])


@pytest.mark.parametrize("config_name", ["nf4", "nf3-b16-s4x16-bf16", "nf2-b64-fp16"])
def test_checkpoint_round_trip(tiny_model_dir, tmp_path, config_name):
    config = parse_config(config_name)
    out = tmp_path / "ckpt"
    manifest = quantize_model(tiny_model_dir, out, config)
    assert (out / MANIFEST_NAME).is_file() and (out / "tokenizer.json").is_file()
    assert len(manifest["quantized"]) == 14
    numel = sum(m["shape"][0] * m["shape"][1] for m in manifest["quantized"].values())
    assert (
        manifest["summary"]["bits_per_param"]
        == sum(storage_bits(config, m["shape"]) for m in manifest["quantized"].values()) / numel
    )

    model = load_checkpoint(out)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tying survives
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        ours = model(ids).logits
        expected = reference_model(tiny_model_dir, config)(ids).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_sharded_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "ckpt"
    manifest = quantize_model(tiny_model_dir, out, parse_config("nf4"), max_shard_bytes=8 * 1024)
    assert len(set(manifest["weight_map"].values())) > 5
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            load_checkpoint(out)(ids).logits, reference_model(tiny_model_dir, parse_config("nf4"))(ids).logits
        )


def test_crash_leaves_no_directory(tiny_model_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = quantize_stage.quantize

    def failing(weight, config, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real(weight, config, **kwargs)

    monkeypatch.setattr(quantize_stage, "quantize", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        quantize_model(tiny_model_dir, tmp_path / "ckpt", parse_config("nf4"))
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_errors(tiny_model_dir, tmp_path):
    out = tmp_path / "ckpt"
    quantize_model(tiny_model_dir, out, parse_config("nf4"))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["schema_version"] = 99
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(QpeftError, match="schema version 99 is not supported"):
        load_checkpoint(out)
    manifest["schema_version"] = 1
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    (out / "model-00001.safetensors").unlink()
    with pytest.raises(QpeftError, match=r"is missing model-00001\.safetensors"):
        load_checkpoint(out)


def test_quant_linear_passes_input_gradients():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=True)
    module = QuantLinear.from_linear(linear, parse_config("nf4"))
    x = torch.randn(3, 64, requires_grad=True)
    module(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    weight = dequantize(quantize(linear.weight, parse_config("nf4")))
    torch.nn.functional.linear(x_ref, weight, linear.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert all(not p.requires_grad for p in module.parameters())


def test_perplexity_matches_the_hf_loss(tiny_model_dir, tiny_text_file):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = tokenize(AutoTokenizer.from_pretrained(tiny_model_dir), tiny_text_file.read_text())
    result = perplexity(model, ids, seqlen=64, max_windows=5, progress=False)
    with torch.no_grad():
        losses = [model(w.unsqueeze(0), labels=w.unsqueeze(0)).loss for w in ids[: 5 * 64].reshape(5, 64)]
    assert result.windows == 5 and result.tokens == 5 * 63
    assert result.nll == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    assert result.ppl == pytest.approx(torch.stack(losses).mean().exp().item(), rel=1e-5)
