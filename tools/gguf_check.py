"""Does llama.cpp run a `qpeft export --to gguf` export as the model qpeft trained?

For each qpeft checkpoint given: export it (`--to gguf`), load model.gguf with
adapter.gguf in llama.cpp (llama-cpp-python, `make llama-cpp`; F32 KV cache, no
flash attention), and compare on the same token ids with qpeft's own fp32 forward:
the relative logit difference ‖z_llama − z_qpeft‖ / ‖z_qpeft‖ on a fixed prompt, and
the perplexity of each on the first N windows of WikiText-2 test (qpeft's windows,
its tokenizer's ids). llama.cpp's quantized dot products round the activations to
8 bits per block of 32, so the logits differ by a few percent even for the source
GGUF; the perplexities show whether that matters.

    python tools/gguf_check.py CKPT [CKPT ...] [--windows 4] [--seqlen 2048]
    python tools/gguf_check.py --wide DIR [--windows 1] [--seqlen 512]

`--wide DIR` first builds, under DIR, a 2-layer LLaMA of LLaMA-2-7B's widths (hidden
4096, intermediate 11008, 32 heads; SmolLM2's tokenizer, tied embeddings, random
weights), allocates its 14 matrices over the k-quants q2_k … q6_k at a 4-bit budget
(`qpeft decompose`, round-to-nearest) and adds a rank-8 LoRA of random non-zero
factors; that checkpoint is checked with the others. Its perplexity is that of a
random model (about the vocabulary size): only the ratio means something.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from qpeft.eval.perplexity import load_eval_text, perplexity, tokenize
from qpeft.export.formats import export_checkpoint
from qpeft.export.gguf import ADAPTER_FILE, MODEL_FILE
from qpeft.models.loading import load_checkpoint
from qpeft.models.resolve import resolve_model
from qpeft.training.model import save_with_random_lora

PROMPT = "The capital of France is"


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_perplexity(llm, token_ids: torch.Tensor, seqlen: int, windows: int) -> float:
    nll = count = 0.0
    for i in range(windows):
        ids = token_ids[i * seqlen : (i + 1) * seqlen].tolist()
        z = torch.from_numpy(llama_logits(llm, ids)[:-1])
        nll += torch.nn.functional.cross_entropy(z, torch.tensor(ids[1:]), reduction="sum").item()
        count += seqlen - 1
    return math.exp(nll / count)


def make_wide_checkpoint(root: Path) -> Path:
    """The k-quant checkpoint of a 2-layer LLaMA-2-7B-width random model (see above)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qpeft.cli import main as qpeft_main

    checkpoint = root / "wide-kquants-lora"
    if checkpoint.is_dir():
        return checkpoint
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, torch_dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "wide-base")
    tokenizer.save_pretrained(root / "wide-base")
    argv = ["decompose", str(root / "wide-base"), "--out", str(root / "wide-kquants"), "--budget", "4",
            "--configs", "q2_k,q3_k,q4_k,q5_k,q6_k", "--rank", "0", "--no-fisher", "--rounding", "nearest"]  # fmt: skip
    if qpeft_main(argv) != 0:
        raise SystemExit("qpeft decompose failed")
    return save_with_random_lora(root / "wide-kquants", checkpoint, 8, 16.0, std=0.01)


def main() -> None:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", type=Path)
    parser.add_argument("--wide", type=Path, default=None, help="build and check the wide k-quant model here")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=2048)
    args = parser.parse_args()
    checkpoints = list(args.checkpoints) + ([make_wide_checkpoint(args.wide)] if args.wide else [])
    if not checkpoints:
        parser.error("give checkpoints, --wide DIR or both")
    rows = []
    for ckpt in checkpoints:
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        token_ids = tokenize(tokenizer, load_eval_text("wikitext2"))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "gguf"
            report = export_checkpoint(ckpt, "gguf", out)
            adapter = out / ADAPTER_FILE
            llm = Llama(
                model_path=str(out / MODEL_FILE),
                **({"lora_path": str(adapter)} if adapter.is_file() else {}),
                n_ctx=args.seqlen,
                n_batch=args.seqlen,
                logits_all=True,
                type_k=0,  # F32 KV cache
                type_v=0,
                flash_attn=False,
                n_threads=2,
                verbose=False,
            )
            size = (out / MODEL_FILE).stat().st_size + (adapter.stat().st_size if adapter.is_file() else 0)
            assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == prompt, "tokenizers disagree"
            z_llama = llama_logits(llm, prompt)
            ppl_llama = llama_perplexity(llm, token_ids, args.seqlen, args.windows)
            llm.close()
        model = load_checkpoint(ckpt).eval()
        with torch.no_grad():
            z_qpeft = model(torch.tensor([prompt])).logits[0].numpy()
        ppl_qpeft = perplexity(model, token_ids, args.seqlen, args.windows, progress=False).ppl
        rel = float(np.linalg.norm(z_llama - z_qpeft) / np.linalg.norm(z_qpeft))
        same_top = bool((z_llama.argmax(1) == z_qpeft.argmax(1)).all())
        rows.append((ckpt.name, report["gguf_bits_per_param"], size / 2**20, rel, same_top, ppl_qpeft, ppl_llama))
    print(f"windows: {args.windows} × {args.seqlen} of WikiText-2 test")
    print(
        "| checkpoint | GGUF bits/param (matrices) | files MiB | rel. Δlogit | same top-1 "
        "| ppl qpeft | ppl llama.cpp | ratio |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for name, bits, mib, rel, top, pq, pl in rows:
        print(f"| {name} | {bits:.4f} | {mib:.1f} | {rel:.4f} | {top} | {pq:.3f} | {pl:.3f} | {pl / pq:.4f} |")


if __name__ == "__main__":
    main()
