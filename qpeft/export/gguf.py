"""`qpeft export CKPT --to gguf`: OUT/model.gguf and OUT/adapter.gguf for llama.cpp.

model.gguf is a llama-architecture GGUF file (LLaMA, Mistral): llama.cpp's tensor
names (`blk.N.attn_q.weight`, ...), its hyperparameter keys, and the tokenizer and
chat template converted from the checkpoint's tokenizer files. Each quantized matrix
in one of GGUF's block formats (`qpeft.quant.formats.ggml`) is written as the bytes it
is stored in: nothing is re-quantized. Matrices of other formats are re-quantized
with `--requantize`, to the block format nearest to them in at most their own bits
(`nearest_requantization`), each one's error reported. The other tensors keep their
stored dtype (or `--dtype`; 1-D tensors stay F32, as llama.cpp expects).

llama.cpp's llama architecture applies RoPE to adjacent pairs of a head's
dimensions; transformers' LLaMA to its two halves. As llama.cpp's own converter does,
the rows of W_q and W_k are permuted within each head, row h·d + 2j + t taking row
h·d + t·d/2 + j (d the head width; for W_k the KV heads). A row permutation moves
whole blocks, so it is exact, and it applies to LoRA's B and to biases alike.

adapter.gguf is llama.cpp's LoRA adapter: `general.type = adapter`, `adapter.type =
lora`, tensors `<base name>.lora_a` (r × d_in) and `.lora_b` (d_out × r) in F32.
llama.cpp scales B·A by alpha / r, or by 1 when alpha is 0: alpha is r where every
adapter has the same rank, 0 otherwise, and B carries qpeft's own scale, so B·A is
ΔW as qpeft applies it.

Tokenizer (as llama.cpp's convert_hf_to_gguf.py reads one): a GPT-2-style byte-level
BPE (tokenizer.json, no byte fallback) is `tokenizer.ggml.model = gpt2`, with the
vocabulary by id, token types (added special tokens CONTROL, other added tokens
USER_DEFINED), merges, special token ids and chat template; its pre-tokenizer is
named by the sha256 of its token ids on llama.cpp's check text (`PRE_TOKENIZERS`). A
byte-fallback BPE (LLaMA-2, Mistral-7B) is `tokenizer.ggml.model = llama`: llama.cpp
tokenizes it as SentencePiece does, merging first the adjacent pair whose merged piece
scores highest, so each piece formed by merge k scores −k (`merge_rank_scores`), the
order of tokenizer.json's merges (for a model converted from SentencePiece, the order of
its tokenizer.model scores); gguf-py's `LlamaHfVocab` alone gives every piece −1000, and
llama.cpp then merges left to right. Whether BOS/EOS are added is what the tokenizer does.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qpeft.errors import QpeftError
from qpeft.export.lora import LoraFactors
from qpeft.export.requantize import nearest_requantization
from qpeft.export.transformers_dir import adapter_factors
from qpeft.models.weights import SafetensorsWeights, unshared_state
from qpeft.modules import quantized_layers
from qpeft.quant import QuantConfig, QuantizedTensor
from qpeft.quant.formats import GRIDS
from qpeft.quant.formats.ggml import BLOCK, GGUFBlockConfig

MODEL_FILE, ADAPTER_FILE = "model.gguf", "adapter.gguf"
MODEL_TYPES = ("llama", "mistral")  # transformers' model types of llama.cpp's `llama` architecture

# llama.cpp's check text for BPE pre-tokenizers (convert_hf_to_gguf.py, get_vocab_base_pre)
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# sha256 of str(token ids of CHECK_TEXT) → llama.cpp's pre-tokenizer name, for the
# families qpeft targets (llama.cpp's table has many more)
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # LLaMA-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
}


def ggml_type(config: GGUFBlockConfig):
    """gguf-py's GGMLQuantizationType of a block format."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[config.name.upper()]


def gguf_holds(config: QuantConfig, shape: tuple[int, int]) -> bool:
    """Whether model.gguf stores a matrix of `config` exactly (a GGUF block format)."""
    return isinstance(config, GGUFBlockConfig)


def ggml_candidates(shape: tuple[int, int]) -> list[tuple[GGUFBlockConfig, float]]:
    """The block formats a matrix of `shape` can take, with their bits per parameter."""
    return [(c, c.bits_per_param) for c in GRIDS["gguf"] if c.holds(shape)]


def head_permutation(rows: int, heads: int) -> torch.Tensor:
    """The row order of W_q / W_k in llama.cpp (new row i is old row perm[i])."""
    if rows % (2 * heads):
        raise QpeftError(f"cannot permute {rows} rows into {heads} heads of even width")
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def check_gguf_config(config: dict[str, Any]) -> None:
    """A one-line error unless `config` (a checkpoint's config.json) is a causal LM of
    the llama architecture, the one model file `--to gguf` writes."""
    model_type = config.get("model_type")
    architecture = (config.get("architectures") or ["LlamaForCausalLM"])[0]
    if model_type not in MODEL_TYPES or not architecture.endswith("ForCausalLM"):
        raise QpeftError(
            f"--to gguf writes llama-architecture causal LMs ({', '.join(MODEL_TYPES)}), not {architecture} "
            f"({model_type})"
        )


def _hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The llama-architecture hyperparameters of a transformers config.json."""
    check_gguf_config(config)
    heads = config["num_attention_heads"]
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise QpeftError(f"--to gguf does not write RoPE scaling of type {rope_type!r} (default, linear, llama3)")
    return {
        "layers": config["num_hidden_layers"],
        "hidden": config["hidden_size"],
        "ffn": config["intermediate_size"],
        "heads": heads,
        "kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "context": config.get("max_position_embeddings", 2048),
        "eps": config.get("rms_norm_eps", 1e-6),
        "vocab": config["vocab_size"],
        "rope": rope,
        "rope_type": rope_type,
        "name": config.get("_model_name_or_path") or config.get("_name_or_path") or config.get("model_type"),
    }


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """LLaMA-3.1's per-frequency RoPE divisors (llama.cpp's `rope_freqs.weight`):
    1 for wavelengths below λ_high = L / high_freq_factor, `factor` above λ_low = L /
    low_freq_factor, and between them 1 / ((1 − s)/factor + s) with s = (L/λ − low) /
    (high − low), L the original context length."""
    base, factor = rope["rope_theta"], rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelength = 2 * np.pi / freqs
    smooth = (context / wavelength - low) / (high - low)
    out = np.where(wavelength < context / high, 1.0, np.where(wavelength > context / low, factor, 0.0))
    between = (wavelength >= context / high) & (wavelength <= context / low)
    out[between] = 1 / ((1 - smooth[between]) / factor + smooth[between])
    return out.astype(np.float32)


def _write_hparams(writer, hp: dict[str, Any]) -> None:
    from gguf import RopeScalingType

    writer.add_type("model")
    writer.add_name(str(hp["name"]))
    writer.add_block_count(hp["layers"])
    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_layer_norm_rms_eps(hp["eps"])
    writer.add_rope_freq_base(hp["rope"]["rope_theta"])
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["hidden"] // hp["heads"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    if hp["rope_type"] == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hp["rope"]["factor"])
    writer.add_vocab_size(hp["vocab"])
    writer.add_quantization_version(2)


# -- the tokenizer ----------------------------------------------------------------------


def _gpt2_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their types, as convert_hf_to_gguf.py's get_vocab_base."""
    from gguf import TokenType

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            types.append(TokenType.CONTROL if decoder[i].special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def pre_tokenizer_name(tokenizer, pre: dict[str, Any]) -> str:
    """llama.cpp's name of a BPE tokenizer's pre-tokenizer: by `PRE_TOKENIZERS`, or
    "gpt-2" for tokenizer.json's plain byte-level pre-tokenizer with GPT-2's split
    pattern (`pre`, its `pre_tokenizer`), whatever the vocabulary."""
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT, add_special_tokens=False)).encode()).hexdigest()
    # llama.cpp hashes the ids with the tokenizer's special tokens; without them too
    with_special = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    for key in (with_special, digest):
        if key in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[key]
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    raise QpeftError(
        f"--to gguf does not know this tokenizer's pre-tokenizer (sha256 {with_special} of llama.cpp's check "
        f"text; known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))})"
    )


def merge_rank_scores(tokens: list[str], merges: list) -> list[float]:
    """SentencePiece-style scores of a BPE vocabulary: −k for the piece that merge k
    forms (its first merge where several form it), 0 for pieces no merge forms
    (characters, bytes, specials), which llama.cpp never forms by merging."""
    rank: dict[str, int] = {}
    for k, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, k)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def write_tokenizer(writer, model_dir: Path, vocab_size: int) -> None:
    """The tokenizer.* keys of the tokenizer in `model_dir` (see the module docstring)."""
    import gguf
    from transformers import AutoTokenizer

    spec_path = model_dir / "tokenizer.json"
    if not spec_path.is_file():
        raise QpeftError(f"--to gguf needs the model's tokenizer.json, and {model_dir} has none")
    spec = json.loads(spec_path.read_text())
    model = spec.get("model", {})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        vocab = gguf.LlamaHfVocab(model_dir)
        tokens, _, types = zip(*vocab.all_tokens(), strict=True)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(tokens))
        writer.add_token_scores(merge_rank_scores([t.decode("utf-8") for t in tokens], model.get("merges", [])))
        writer.add_token_types(list(types))
        special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=len(tokens))
    elif model.get("type") == "BPE" and (spec.get("decoder") or {}).get("type") == "ByteLevel":
        tokens, types = _gpt2_vocab(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        pre = spec.get("pre_tokenizer") or {}
        writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, pre))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        if "add_prefix_space" in pre:
            writer.add_add_space_prefix(bool(pre["add_prefix_space"]))
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    else:
        raise QpeftError(
            f"--to gguf converts byte-level BPE and byte-fallback BPE tokenizers, not a {model.get('type')} one"
        )
    # whether BOS / EOS are added is what the tokenizer does, not what a config claims
    ids = tokenizer("a")["input_ids"]
    special.add_special_token = {
        "bos": tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id],
        "eos": tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id],
    }
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


# -- the tensors ------------------------------------------------------------------------


def _unquantized(tensor: torch.Tensor, dtype: torch.dtype | None) -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) of an unquantized tensor: 1-D in F32, others in
    `dtype` (None: as stored); bf16 as raw bytes."""
    from gguf import GGMLQuantizationType

    tensor = tensor.detach().cpu()
    if tensor.dim() == 1 or not tensor.is_floating_point():
        return tensor.float().numpy(), None
    tensor = tensor.to(dtype) if dtype is not None else tensor
    if tensor.dtype == torch.bfloat16:
        raw = tensor.contiguous().view(torch.uint8).reshape(tensor.shape[0], -1)
        return raw.numpy(), GGMLQuantizationType.BF16
    if tensor.dtype not in (torch.float16, torch.float32):
        tensor = tensor.float()
    return tensor.contiguous().numpy(), None


def _gguf_name(name_map, hf_name: str) -> str:
    name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise QpeftError(f"--to gguf has no llama.cpp name for the tensor {hf_name}")
    return name


def _row_order(hf_name: str, hp: dict[str, Any]) -> torch.Tensor | None:
    if ".self_attn.q_proj." in hf_name:
        return head_permutation(hp["heads"] * hp["head_dim"], hp["heads"])
    if ".self_attn.k_proj." in hf_name:
        return head_permutation(hp["kv_heads"] * hp["head_dim"], hp["kv_heads"])
    return None


def _file_type(counts: Counter) -> int:
    """general.file_type: llama.cpp's name for the format of most parameters."""
    from gguf import LlamaFileType

    kind = counts.most_common(1)[0][0] if counts else "f32"
    return {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16}.get(
        kind, getattr(LlamaFileType, f"MOSTLY_{kind.upper()}", LlamaFileType.GUESSED)
    )


def _block_rows(qt: QuantizedTensor) -> torch.Tensor:
    """A block-format matrix's bytes, one row of blocks per matrix row."""
    rows, per_row = qt.config.blocks(qt.shape)
    return qt.parts["blocks"].cpu().reshape(rows, per_row * qt.config.block_bytes)


def write_model_gguf(model: nn.Module, model_dir: Path, path: Path, dtype: torch.dtype | None) -> dict[str, Any]:
    """model.gguf of a loaded qpeft model (see the module docstring); the report."""
    import gguf

    hp = _hparams(json.loads((model_dir / "config.json").read_text()))
    writer = gguf.GGUFWriter(path, "llama", use_temp_file=True)
    _write_hparams(writer, hp)
    write_tokenizer(writer, model_dir, hp["vocab"])
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["layers"])
    layers = quantized_layers(model)
    requantized: dict[str, dict[str, Any]] = {}
    params_by_kind: Counter = Counter()
    stored_bits = quantized_params = 0
    skip = tuple(f"{name}." for name in layers)
    stored = SafetensorsWeights(model_dir)
    for hf_name, tensor in unshared_state(model).items():
        if hf_name.startswith(skip):
            continue
        order = _row_order(hf_name, hp)
        tensor = tensor[order] if order is not None else tensor
        # the loaded model is fp32: without --dtype, each tensor keeps the checkpoint's dtype
        kept = dtype or (stored.stored_dtype(hf_name) if hf_name in stored.weight_map else None)
        array, raw = _unquantized(tensor, kept)
        writer.add_tensor(_gguf_name(name_map, hf_name), array, raw_dtype=raw)
        kind = "bf16" if raw is not None else {np.float32: "f32", np.float16: "f16"}.get(array.dtype.type, "f32")
        if tensor.dim() == 2:
            params_by_kind[kind] += tensor.numel()
    for name, layer in layers.items():
        qt, shape = layer.quantized, (layer.out_features, layer.in_features)
        if not gguf_holds(qt.config, shape):
            candidates = ggml_candidates(shape)
            if not candidates:
                raise QpeftError(
                    f"GGUF's block formats need rows whose length divides by {BLOCK}: {name} has {shape[1]}"
                )
            qt, error = nearest_requantization(qt, candidates)
            requantized[name] = {"from": layer.config.name, "to": qt.config.name, "rel_error": error}
        blocks = _block_rows(qt)
        order = _row_order(f"{name}.weight", hp)
        if order is not None:
            blocks = blocks[order]
        writer.add_tensor(_gguf_name(name_map, f"{name}.weight"), blocks.numpy(), raw_dtype=ggml_type(qt.config))
        if layer.bias is not None:
            bias = layer.bias.detach()
            writer.add_tensor(
                _gguf_name(name_map, f"{name}.bias"), (bias[order] if order is not None else bias).float().numpy()
            )
        params_by_kind[qt.config.name] += shape[0] * shape[1]
        stored_bits += qt.config.storage_bits(shape)
        quantized_params += shape[0] * shape[1]
    if hp["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(hp["rope"], hp["head_dim"]))
    writer.add_file_type(_file_type(params_by_kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "gguf_bits_per_param": stored_bits / quantized_params if quantized_params else 0.0,
        "params_by_type": dict(params_by_kind),
        "requantized": requantized,
        "requantized_rel_error": {name: r["rel_error"] for name, r in requantized.items()},
    }


def write_adapter_gguf(factors: dict[str, LoraFactors], hp: dict[str, Any], path: Path) -> None:
    """adapter.gguf: the adapters in llama.cpp's LoRA format (see the module docstring)."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["layers"])
    ranks = {f.a.shape[0] for f in factors.values()}
    writer = gguf.GGUFWriter(path, "llama", use_temp_file=True)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(next(iter(ranks))) if len(ranks) == 1 else 0.0)
    for name, f in factors.items():
        base = _gguf_name(name_map, f"{name}.weight")
        order = _row_order(f"{name}.weight", hp)
        b = f.b[order] if order is not None else f.b
        writer.add_tensor(f"{base}.lora_a", f.a.float().contiguous().numpy())
        writer.add_tensor(f"{base}.lora_b", b.float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(
    model: nn.Module, manifest: dict, src: Path, out: Path, final: Path, rank: int | None, dtype: torch.dtype | None
) -> dict[str, Any]:
    """OUT/model.gguf and, where the checkpoint has adapters, OUT/adapter.gguf."""
    factors, adapter_errors = adapter_factors(model, rank)
    report = write_model_gguf(model, src, out / MODEL_FILE, dtype)
    if factors:
        hp = _hparams(json.loads((src / "config.json").read_text()))
        write_adapter_gguf(factors, hp, out / ADAPTER_FILE)
    return {**report, "adapter_rel_error": adapter_errors}
