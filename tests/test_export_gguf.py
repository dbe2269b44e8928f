"""`qpeft export --to gguf`: model.gguf and adapter.gguf read back with gguf-py (no
llama.cpp needed): block-format matrices bit-exact in llama.cpp's row order, the
hyperparameters and tokenizer, the LoRA factors, and the errors for bad input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qpeft.export.formats import export_checkpoint
from qpeft.export.gguf import head_permutation
from qpeft.io.checkpoint import read_manifest
from qpeft.models.loading import load_checkpoint
from qpeft.modules import quantized_layers
from qpeft.training.model import save_with_random_lora
from tests.conftest import assert_one_line_error, run

gguf = pytest.importorskip("gguf")
GGUF_MIX = "q4_0,q4_1,q5_0,q5_1,q8_0"


@pytest.fixture(scope="module")
def gguf_checkpoint(tmp_path_factory) -> Path:
    """The tiny LLaMA as an ILP mixture of GGUF's block formats, with rank-4 LoRAs."""
    from qpeft.cli import main
    from tests.conftest import make_tiny_llama

    root = tmp_path_factory.mktemp("gguf")
    source = make_tiny_llama(root / "model")
    argv = ["decompose", source, "--out", root / "q", "--budget", "5.2", "--rank", "0", "--no-fisher"]
    assert main([str(a) for a in [*argv, "--rounding", "nearest", "--configs", GGUF_MIX]]) == 0
    return save_with_random_lora(root / "q", root / "trained", 4, 8.0, std=0.05)


def _llama_rows(name: str, rows: int, config: dict) -> torch.Tensor | None:
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    if name.endswith("q_proj"):
        return head_permutation(rows, config["num_attention_heads"])
    if name.endswith("k_proj"):
        return head_permutation(rows, rows // head_dim)
    return None


def test_model_and_adapter_gguf_hold_the_checkpoint_exactly(gguf_checkpoint, tmp_path):
    from gguf.quants import dequantize

    ours = load_checkpoint(gguf_checkpoint)
    layers = quantized_layers(ours)
    assert len({layer.config.name for layer in layers.values()}) > 1  # a mixture
    report = export_checkpoint(gguf_checkpoint, "gguf", tmp_path / "out")
    assert report["requantized"] == {}
    config = json.loads((gguf_checkpoint / "config.json").read_text())
    model = gguf.GGUFReader(str(tmp_path / "out" / "model.gguf"))
    fields = {k: f.contents() for k, f in model.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.embedding_length"] == 64
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_checkpoint)
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    assert fields["tokenizer.ggml.tokens"] == [vocab[i] for i in range(len(vocab))]
    assert fields["tokenizer.ggml.bos_token_id"] == 0 and fields["tokenizer.ggml.eos_token_id"] == 1
    tensors = {t.name: t for t in model.tensors}
    adapter = gguf.GGUFReader(str(tmp_path / "out" / "adapter.gguf"))
    lora = {t.name: np.asarray(t.data) for t in adapter.tensors}
    assert {k: f.contents() for k, f in adapter.fields.items()}["adapter.lora.alpha"] == 4.0
    for name, layer in layers.items():
        i, kind = name.split(".")[2], name.split(".")[-1]
        short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
        base = f"blk.{i}.{short.get(kind, 'ffn_' + kind.removesuffix('_proj'))}"
        t = tensors[f"{base}.weight"]
        assert t.tensor_type.name.lower() == layer.config.name
        weight = layer.dequantized_weight()
        delta = layer.adapter.delta_weight(torch.float32).detach()
        order = _llama_rows(kind, weight.shape[0], config)
        if order is not None:
            weight, delta = weight[order], delta[order]
        theirs = dequantize(t.data, t.tensor_type).reshape(weight.shape)
        assert torch.equal(torch.from_numpy(theirs.copy()), weight), name  # bit for bit
        ba = torch.from_numpy(lora[f"{base}.weight.lora_b"] @ lora[f"{base}.weight.lora_a"])
        torch.testing.assert_close(ba, delta, rtol=1e-5, atol=1e-6)


def test_non_gguf_formats_need_requantize(tiny_model_dir, tmp_path, capsys):
    from qpeft.cli import main

    assert main(["quantize", str(tiny_model_dir), "--config", "nf4", "--out", str(tmp_path / "nf4")]) == 0
    code, _, err = run(capsys, "export", tmp_path / "nf4", "--to", "gguf", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "gguf cannot hold")
    assert not (tmp_path / "x").exists()
    report = export_checkpoint(tmp_path / "nf4", "gguf", tmp_path / "y", requantize=True)
    # nf4's 4.127 bits: no block format this narrow model takes is as cheap; the
    # cheapest (4.5 bits) of least error is iq4_nl, its levels nf4-like
    assert report["requantized"] and {r["to"] for r in report["requantized"].values()} == {"iq4_nl"}
    assert all(0 < e < 0.2 for e in report["requantized_rel_error"].values())


@pytest.fixture(scope="module")
def byte_fallback_export(tmp_path_factory) -> Path:
    """A tiny LLaMA with a LLaMA-2-style (byte-fallback BPE) tokenizer, q8_0, exported."""
    from qpeft.cli import main
    from tests.conftest import make_tiny_llama

    root = tmp_path_factory.mktemp("spm")
    source = make_tiny_llama(root / "model", byte_fallback=True)
    assert main(["quantize", str(source), "--config", "q8_0", "--out", str(root / "q")]) == 0
    export_checkpoint(root / "q", "gguf", root / "out")
    return root


def test_a_byte_fallback_tokenizer_is_llama_cpp_sentencepiece_vocabulary(byte_fallback_export):
    """tokenizer.ggml.model = llama: the pieces by id, <0xXX> typed BYTE, and scores that
    rank the pieces in tokenizer.json's merge order (llama.cpp merges the best first)."""
    from transformers import AutoTokenizer

    root = byte_fallback_export
    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(root / "out" / "model.gguf")).fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama"
    tokenizer = AutoTokenizer.from_pretrained(root / "q")
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens == [vocab[i] for i in range(len(vocab))]
    types = fields["tokenizer.ggml.token_type"]
    assert [tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.BYTE] == [f"<0x{i:02X}>" for i in range(256)]
    assert [types[i] for i in (0, 1, 2)] == [gguf.TokenType.CONTROL] * 3
    assert fields["tokenizer.ggml.bos_token_id"] == 0 and fields["tokenizer.ggml.add_bos_token"] is True
    score = dict(zip(tokens, fields["tokenizer.ggml.scores"], strict=True))
    merges = json.loads((root / "q" / "tokenizer.json").read_text())["model"]["merges"]
    first_formed = list(dict.fromkeys(a + b for a, b in merges))
    assert len(first_formed) > 300
    ranked = [score[p] for p in first_formed]
    assert all(a > b for a, b in itertools.pairwise(ranked))


@pytest.mark.slow
def test_llama_cpp_tokenizes_a_byte_fallback_export_as_transformers_does(byte_fallback_export):
    """llama.cpp's SentencePiece tokenizer, reading the export, gives transformers' ids
    on 300 lines of WikiText-2 test text (unseen by the tokenizer's training)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from qpeft.data import dataset_path

    root = byte_fallback_export
    tokenizer = AutoTokenizer.from_pretrained(root / "q")
    llm = llama_cpp.Llama(model_path=str(root / "out" / "model.gguf"), vocab_only=True, verbose=False)
    text = dataset_path("wikitext2", "test").read_text(encoding="utf-8")
    # no leading space (transformers 5 and SentencePiece differ there) and no special-token text
    lines = [line.strip().replace("<unk>", "unk") for line in text.splitlines() if line.strip()][:300]
    lines.append("Übergrößenträger 日本語 — naïve café ☕")
    differ = [line for line in lines if llm.tokenize(line.encode(), add_bos=True) != tokenizer(line)["input_ids"]]
    assert differ == []


def test_unquantized_tensors_keep_the_checkpoints_dtype(tiny_model_dir, tmp_path):
    """The loaded model is fp32; model.gguf keeps each unquantized tensor as the
    checkpoint stores it (a bf16 embedding stays BF16, half the bytes), 1-D in F32."""
    from qpeft.cli import main

    argv = ["quantize", str(tiny_model_dir), "--config", "q8_0", "--unquantized-dtype", "bf16"]
    assert main([*argv, "--out", str(tmp_path / "q")]) == 0
    export_checkpoint(tmp_path / "q", "gguf", tmp_path / "out")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "out" / "model.gguf")).tensors}
    assert types["token_embd.weight"] == "BF16" and types["output_norm.weight"] == "F32"
    export_checkpoint(tmp_path / "q", "gguf", tmp_path / "fp16", dtype="fp16")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "fp16" / "model.gguf")).tensors}
    assert types["token_embd.weight"] == "F16"


@pytest.mark.slow
def test_llama_cpp_runs_the_export_with_its_adapter(tmp_path):
    """llama.cpp itself (llama-cpp-python, `make llama-cpp`) loads model.gguf, k-quants
    included, with adapter.gguf: its logits are qpeft's within its 8-bit activation
    rounding, and the adapter's effect is many times that difference."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from qpeft.cli import main
    from tests.conftest import make_tiny_llama

    source = make_tiny_llama(tmp_path / "model", hidden_size=256, intermediate_size=512)
    argv = ["decompose", source, "--out", tmp_path / "q", "--budget", "4.5", "--rank", "0", "--no-fisher"]
    assert main([str(a) for a in [*argv, "--rounding", "nearest", "--configs", "gguf"]]) == 0
    configs = {e["config"] for e in read_manifest(tmp_path / "q")["quantized"].values()}
    assert configs & {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k"}, configs
    trained = save_with_random_lora(tmp_path / "q", tmp_path / "trained", 8, 16.0, std=0.05)
    export_checkpoint(trained, "gguf", tmp_path / "out")
    ids = torch.randint(2, 200, (64,), generator=torch.Generator().manual_seed(0)).tolist()

    def llama_logits(**kwargs) -> np.ndarray:
        llm = llama_cpp.Llama(
            model_path=str(tmp_path / "out" / "model.gguf"), n_ctx=64, n_batch=64, logits_all=True,
            type_k=0, type_v=0, flash_attn=False, n_threads=2, verbose=False, **kwargs,
        )  # fmt: skip
        llm.eval(ids)
        z = np.array(llm.scores[: len(ids)], dtype=np.float32)
        llm.close()
        return z

    with_adapter = llama_logits(lora_path=str(tmp_path / "out" / "adapter.gguf"))
    without = llama_logits()
    with torch.no_grad():
        ours = load_checkpoint(trained).eval()(torch.tensor([ids])).logits[0].numpy()
    difference = np.linalg.norm(with_adapter - ours)
    assert difference / np.linalg.norm(ours) < 0.05
    assert np.linalg.norm(with_adapter - without) > 5 * difference
