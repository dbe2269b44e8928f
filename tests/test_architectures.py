"""Checkpoints of other classes and families: a head-less BERT encoder (as
sentence-transformers ship them), a BERT with its masked-LM head, a LLaMA saved as
`LlamaModel`, and a Qwen2-style decoder with biased q/k/v. Each is loaded under its
task's class with transformers' key mapping (`base_model_prefix`), quantized,
inspected and exported; the exported model is checked against the fp32 one."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from qpeft.models.loading import load_checkpoint
from qpeft.models.skeleton import build_skeleton, model_task, model_weights, open_stored
from tests.conftest import assert_one_line_error, make_tokenizer, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=384,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=128,
    )


def _save(model, path):
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertModel

    torch.manual_seed(0)
    return _save(BertModel(_bert_config()).eval(), tmp_path_factory.mktemp("bert") / "model")


@pytest.fixture(scope="module")
def bert_mlm_dir(tmp_path_factory):
    from transformers import BertForMaskedLM

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("bertmlm") / "model"
    BertForMaskedLM(_bert_config()).eval().save_pretrained(path)
    tokenizer = make_tokenizer(383)
    tokenizer.add_special_tokens({"mask_token": "<mask>"})  # id 383, the last of the 384
    tokenizer.save_pretrained(path)
    return path


# a tiny decoder's widths (LLaMA and Qwen2 alike)
DECODER_WIDTHS = {
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def _llama_config(tie: bool):
    from transformers import LlamaConfig

    return LlamaConfig(**DECODER_WIDTHS, tie_word_embeddings=tie)


def _mean_pooled(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state.mean(dim=1)


def test_headless_bert_quantize_inspect_export_merged(bert_dir, tmp_path, capsys):
    from transformers import AutoModel

    ckpt, merged = tmp_path / "q", tmp_path / "merged"
    code, _, err = run(capsys, "quantize", bert_dir, "--config", "nf4", "--out", ckpt)
    assert code == 0, err
    manifest = json.loads((ckpt / "qpeft_manifest.json").read_text())
    # BERT-family default: the encoder layers' query, key, value and dense; not the pooler's dense
    assert sorted(manifest["quantized"])[:4] == [
        "encoder.layer.0.attention.output.dense",
        "encoder.layer.0.attention.self.key",
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.value",
    ]
    assert len(manifest["quantized"]) == 12 and manifest["task"] == "feature-extraction"
    code, out, _ = run(capsys, "inspect", ckpt)
    assert code == 0 and "task          feature-extraction (BertModel)" in out
    code, out, _ = run(capsys, "eval", ckpt, "--seqlen", "64", "--max-windows", "1")
    assert code == 0
    assert out.strip() == (
        "perplexity: N/A: BertModel is a feature-extraction model; perplexity needs a causal LM's next-token head"
    )
    code, _, err = run(capsys, "export", ckpt, "--to", "merged", "--out", merged)
    assert code == 0, err
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["BertModel"]
    fp32, exported = AutoModel.from_pretrained(bert_dir).eval(), AutoModel.from_pretrained(merged).eval()
    assert type(exported).__name__ == "BertModel"
    ids = torch.randint(0, 384, (8, 48), generator=torch.Generator().manual_seed(0))
    cosine = F.cosine_similarity(_mean_pooled(fp32, ids), _mean_pooled(exported, ids), dim=-1)
    assert cosine.min() >= 0.99, cosine
    # merged is the checkpoint's model: the same embeddings as the packed model gives
    packed = load_checkpoint(ckpt)
    assert torch.allclose(_mean_pooled(packed, ids), _mean_pooled(exported, ids).float(), atol=0.05)
    code, _, err = run(capsys, "export", ckpt, "--to", "gguf", "--out", tmp_path / "g")
    assert_one_line_error(
        code, err, "--to gguf writes llama-architecture causal LMs (llama, mistral), not BertModel (bert)"
    )


def test_encoder_decompose_and_peft_export_load_in_peft(bert_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModel

    ckpt, adapter = tmp_path / "lq", tmp_path / "adapter"
    argv = ["decompose", bert_dir, "--config", "nf3", "--rank", "4", "--no-fisher", "--rounding", "nearest"]
    code, _, err = run(capsys, *argv, "--out", ckpt)
    assert code == 0, err
    code, _, err = run(capsys, "export", ckpt, "--to", "peft", "--out", adapter)
    assert code == 0, err
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "FEATURE_EXTRACTION"
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(bert_dir), adapter)
    packed = load_checkpoint(ckpt)
    for name, layer in packed.named_modules():
        if hasattr(layer, "adapter") and layer.adapter is not None:
            lora = model.base_model.model.get_submodule(name)
            delta = lora.lora_B["default"].weight @ lora.lora_A["default"].weight
            expected = layer.adapter.delta_weight(torch.float32)
            assert torch.allclose(delta.float(), expected, atol=2e-2 * expected.abs().max()), name
    assert len(config["target_modules"]) == 12


def test_layerwise_masked_lm_matches_the_whole_model(bert_mlm_dir):
    """The streamed forward sweep and masked-LM loss gradient equal the whole
    model's (autograd through transformers' BertForMaskedLM, same masked inputs)."""
    from transformers import AutoModelForMaskedLM

    from qpeft.calibration.stream import LayerwiseMaskedLM, layerwise_model

    lm = layerwise_model(bert_mlm_dir)
    assert isinstance(lm, LayerwiseMaskedLM)
    ids = torch.randint(0, 383, (3, 40), generator=torch.Generator().manual_seed(0))
    states = lm.forward_sweep(ids, batch_size=2, keep=True)
    grad = lm.sequence_loss_grad(states[-1], ids, batch_size=2)
    full = AutoModelForMaskedLM.from_pretrained(bert_mlm_dir, attn_implementation="sdpa").eval()
    masked, targets = lm._inputs(ids), lm._targets(ids)
    predicted = targets != -100
    assert 0.1 < predicted.float().mean() < 0.2 and bool(predicted.any(dim=1).all())
    assert bool((masked[~predicted] == ids[~predicted]).all()) and bool((masked[predicted] == 383).any())
    hidden = full.bert(input_ids=masked).last_hidden_state
    torch.testing.assert_close(states[-1], hidden, rtol=1e-5, atol=1e-5)
    leaf = hidden.detach().requires_grad_(True)
    nll = F.cross_entropy(full.cls(leaf).flatten(0, 1), targets.flatten(), reduction="none").view(3, -1)
    (nll.sum(dim=1) / predicted.sum(dim=1)).sum().backward()
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-5, atol=1e-7)


def test_masked_lm_decompose_with_fisher_and_gptq(bert_mlm_dir, tmp_path, capsys):
    calib = ["--calib-sequences", "4", "--calib-seqlen", "64"]
    argv = ["decompose", bert_mlm_dir, "--config", "nf3", "--rank", "4", *calib, "--out", tmp_path / "lq"]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    manifest = json.loads((tmp_path / "lq" / "qpeft_manifest.json").read_text())
    assert manifest["task"] == "masked-lm" and len(manifest["quantized"]) == 12
    code, _, err = run(capsys, "decompose", bert_mlm_dir, "--config", "nf3", "--out", tmp_path / "long")
    assert_one_line_error(
        code, err, "--calib-seqlen 512 is longer than the model's context (max_position_embeddings 128)"
    )


def test_encoder_calibration_says_what_it_needs(bert_dir, tmp_path, capsys):
    code, _, err = run(capsys, "decompose", bert_dir, "--config", "nf3", "--rank", "4", "--out", tmp_path / "o")
    assert_one_line_error(
        code,
        err,
        "BertModel (feature-extraction) has no masked-LM head, whose loss calibration (Fisher, GPTQ, activations) "
        "needs: use the checkpoint with its head (…ForMaskedLM), or --no-fisher and --rounding nearest",
    )


def test_mlm_head_is_kept_and_dropped_by_task(bert_mlm_dir, tmp_path, capsys):
    from transformers import AutoModelForMaskedLM

    assert model_task(bert_mlm_dir) == "masked-lm"
    stored = open_stored(bert_mlm_dir)
    assert "cls.predictions.transform.dense.weight" in stored.weights.weight_map
    code, _, err = run(capsys, "quantize", bert_mlm_dir, "--config", "nf4", "--out", tmp_path / "q")
    assert code == 0, err
    code, _, err = run(capsys, "export", tmp_path / "q", "--to", "merged", "--out", tmp_path / "m")
    assert code == 0, err
    fp32, exported = (
        AutoModelForMaskedLM.from_pretrained(bert_mlm_dir),
        AutoModelForMaskedLM.from_pretrained(tmp_path / "m"),
    )
    head = fp32.cls.predictions.transform.dense.weight  # kept as is, in merged's bf16
    assert bool((head.to(torch.bfloat16) == exported.cls.predictions.transform.dense.weight).all())
    # the head-less class from a checkpoint with a head: `bert.` stripped, the head left out
    skeleton = build_skeleton(bert_mlm_dir, task="feature-extraction", add_pooling_layer=False)
    weights = model_weights(bert_mlm_dir, skeleton)
    assert sorted(weights.weight_map) == sorted(skeleton.state_dict())
    assert torch.equal(
        weights.tensor("encoder.layer.1.output.dense.weight"), fp32.bert.encoder.layer[1].output.dense.weight
    )
    # BertModel's pooler, which BertForMaskedLM has not: refused, not initialised at random
    code, _, err = run(capsys, "quantize", bert_mlm_dir, "--task", "feature-extraction", "--out", tmp_path / "b")
    assert_one_line_error(
        code,
        err,
        "a feature-extraction model (BertModel) needs tensors the checkpoint lacks: pooler.dense.weight, "
        "pooler.dense.bias (the checkpoint's own class, BertForMaskedLM, is a masked-lm model)",
    )


@pytest.mark.parametrize("tie", [True, False])
def test_llama_saved_as_llamamodel(tie, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, LlamaModel

    torch.manual_seed(2)
    model_dir = _save(LlamaModel(_llama_config(tie)), tmp_path / "model")
    assert model_task(model_dir) == "feature-extraction"
    # its own names, as peft would see them on a LlamaModel
    code, _, err = run(capsys, "quantize", model_dir, "--targets", "layers.0.self_attn.q_proj", "--out", tmp_path / "a")
    assert code == 0, err
    assert list(json.loads((tmp_path / "a" / "qpeft_manifest.json").read_text())["quantized"]) == [
        "layers.0.self_attn.q_proj"
    ]
    # as a causal LM: `model.` added to every key; the head is the tied embedding, or missing
    code, _, err = run(capsys, "quantize", model_dir, "--task", "causal-lm", "--out", tmp_path / "c")
    if not tie:
        assert_one_line_error(
            code,
            err,
            "a causal-lm model (LlamaForCausalLM) needs tensors the checkpoint lacks: lm_head.weight "
            "(the checkpoint's own class, LlamaModel, is a feature-extraction model)",
        )
        return
    assert code == 0, err
    packed = load_checkpoint(tmp_path / "c")
    assert type(packed).__name__ == "LlamaForCausalLM"
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    assert torch.equal(packed.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    assert packed.lm_head.weight is packed.model.embed_tokens.weight
    code, out, err = run(capsys, "eval", tmp_path / "c", "--seqlen", "64", "--max-windows", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["ppl"] > 1
    code, _, err = run(capsys, "decompose", model_dir, "--config", "nf3", "--rank", "4", "--out", tmp_path / "d")
    assert_one_line_error(code, err, "LlamaModel (feature-extraction): calibration (Fisher, GPTQ, activations) runs")


def test_qwen2_biased_qkv(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    config = Qwen2Config(**DECODER_WIDTHS, tie_word_embeddings=True)
    fp32 = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in fp32.model.layers:  # random init leaves biases at zero
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    model_dir = _save(fp32, tmp_path / "model")
    code, _, err = run(
        capsys,
        "decompose",
        model_dir,
        "--config",
        "nf4",
        "--rank",
        "8",
        "--no-fisher",
        "--rounding",
        "nearest",
        "--out",
        tmp_path / "lq",
    )
    assert code == 0, err
    packed = load_checkpoint(tmp_path / "lq")
    assert len(json.loads((tmp_path / "lq" / "qpeft_manifest.json").read_text())["quantized"]) == 14
    for index, layer in enumerate(packed.model.layers):
        assert torch.equal(layer.self_attn.q_proj.bias, fp32.model.layers[index].self_attn.q_proj.bias)
    code, _, err = run(capsys, "export", tmp_path / "lq", "--to", "merged", "--out", tmp_path / "m")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ids = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want, packed_logits = merged(ids).logits, fp32(ids).logits, packed(ids).logits
    assert torch.allclose(got, packed_logits, atol=0.05)  # bf16 export of the same model
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99
    calib = ["--calib-sequences", "4", "--calib-seqlen", "64"]  # Fisher and GPTQ, layer by layer
    code, _, err = run(
        capsys, "decompose", model_dir, "--config", "nf3", "--rank", "4", *calib, "--out", tmp_path / "f"
    )
    assert code == 0, err
    assert torch.equal(
        load_checkpoint(tmp_path / "f").model.layers[1].self_attn.k_proj.bias,
        fp32.model.layers[1].self_attn.k_proj.bias,
    )
    code, _, err = run(capsys, "export", tmp_path / "lq", "--to", "gguf", "--out", tmp_path / "g")
    assert_one_line_error(
        code, err, "--to gguf writes llama-architecture causal LMs (llama, mistral), not Qwen2ForCausalLM (qwen2)"
    )


def test_train_refuses_an_encoder(bert_dir, tmp_path, capsys):
    import yaml

    text = tmp_path / "train.txt"
    text.write_text("some words to train on\n" * 50)
    recipe = {
        "model": str(bert_dir),
        "method": {"name": "qlora", "rank": 4},
        "data": {"train": str(text), "eval": str(text), "seqlen": 32},
        "train": {"steps": 2, "batch_size": 2, "dtype": "fp32"},
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = run(capsys, "train", tmp_path / "r.yaml")
    assert_one_line_error(
        code, err, f"training (next-token loss) needs a causal LM; {bert_dir} is a feature-extraction model (BertModel)"
    )
    assert not (tmp_path / "out" / "base").exists()


def test_generate_and_plan_refuse_an_encoder(bert_dir, tmp_path, capsys):
    code, _, err = run(capsys, "generate", bert_dir, "--prompt", "hi")
    assert_one_line_error(
        code, err, f"generation needs a causal LM; {bert_dir} is a feature-extraction model (BertModel)"
    )
    code, _, err = run(capsys, "plan", bert_dir, "--method", "qlora")
    assert_one_line_error(code, err, "the memory plan (of a causal LM's training step) needs a causal LM")
