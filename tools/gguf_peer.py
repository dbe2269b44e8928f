"""qpeft's GGUF against llama.cpp's own quantizer, at equal file size, in llama.cpp.

Both start from the same model (default SmolLM2). llama.cpp's side: qpeft writes an
F32 GGUF of it (`write_model_gguf`, every tensor unquantized) and llama.cpp quantizes
that file at each standard preset (`llama_model_quantize` through llama-cpp-python,
no importance matrix), with the token-embedding type pinned to the one qpeft's export
keeps, so that only the decoder matrices differ. qpeft's side: `qpeft decompose
--configs gguf --no-fisher --rounding nearest` (data-free round-to-nearest, as the
presets are) at a budget equal to the preset's bits per parameter over the decoder
matrices, exported with `qpeft export --to gguf`. llama.cpp computes the perplexity
of every file on the same WikiText-2 test windows (qpeft's windows and token ids).

    python tools/gguf_peer.py --out DIR [--presets Q4_0,Q4_K_M,...] [--windows 4]

Prints a markdown table (file MiB, matrix bits, perplexity of each, and the ratios
qpeft / llama.cpp) and writes DIR/gguf_peer.png, perplexity against file size.
SmolLM2's inputs are 576 wide: only down_proj (1536) can take the k-quants, and
llama.cpp gives the other matrices its fallback types (q2_k, q3_k → iq4_nl, q4_k →
q5_0, q5_k → q5_1, q6_k → q8_0). Its weights lie on a q4_1 grid (a Q4_1 GGUF).
Finished files are kept in DIR and reused when the tool is run again.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import subprocess
from datetime import date
from pathlib import Path

import gguf
import torch
from gguf_check import llama_perplexity

from qpeft.cli import main as qpeft_main
from qpeft.eval.perplexity import load_eval_text, tokenize
from qpeft.export.gguf import MODEL_FILE, write_model_gguf
from qpeft.models.resolve import resolve_model

PRESETS = ("Q2_K", "Q3_K_M", "IQ4_NL", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
MATRIX_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def matrix_bits(path: Path) -> tuple[float, str]:
    """(bits per parameter over the decoder matrices, the token embedding's type)."""
    reader = gguf.GGUFReader(path)
    bits = params = 0
    embedding = ""
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            embedding = tensor.tensor_type.name
        if tensor.name.startswith("blk.") and tensor.name.split(".")[2] in MATRIX_TENSORS:
            bits += int(tensor.n_bytes) * 8
            params += int(tensor.n_elements)
    return bits / params, embedding


def llama_quantize(source: Path, out: Path, preset: str, embedding_type: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
    params.nthread = 2
    params.token_embedding_type = int(gguf.GGMLQuantizationType[embedding_type])
    params.output_tensor_type = int(gguf.GGMLQuantizationType[embedding_type])
    tmp = out.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed for {preset}")
    tmp.rename(out)


def qpeft_gguf(model: Path, root: Path, budget: float, costs: Path | None) -> Path:
    """model.gguf of qpeft's data-free allocation over the GGUF formats at `budget`."""
    name = f"qpeft-{budget:.4f}"
    target = root / f"{name}.gguf"
    if target.is_file():
        return target
    argv = ["decompose", str(model), "--out", str(root / name), "--budget", f"{budget:.6f}", "--configs", "gguf",
            "--rank", "0", "--no-fisher", "--rounding", "nearest"]  # fmt: skip
    if costs is not None:
        argv += ["--costs", str(costs)]
    export = ["export", str(root / name), "--to", "gguf", "--out", str(root / f"{name}.x")]
    if qpeft_main(argv) != 0 or qpeft_main(export) != 0:
        raise SystemExit(f"qpeft failed at budget {budget}")
    (root / f"{name}.x" / MODEL_FILE).rename(target)
    return target


def main() -> None:
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=2048)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(args.model)
    source = args.out / "f32.gguf"
    if not source.is_file():
        hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        write_model_gguf(hf, model_dir, source.with_suffix(".tmp"), torch.float32)
        source.with_suffix(".tmp").rename(source)
    # qpeft's embedding type, from a first export (its cost table serves every budget)
    first = qpeft_gguf(model_dir, args.out, 6.0, None)
    costs = args.out / "qpeft-6.0000" / "cost_table.json"
    _, embedding = matrix_bits(first)
    token_ids = tokenize(AutoTokenizer.from_pretrained(model_dir), load_eval_text("wikitext2"))

    def ppl(path: Path) -> float:
        cache = path.with_suffix(f".ppl-{args.windows}x{args.seqlen}.json")
        if cache.is_file():
            return json.loads(cache.read_text())["ppl"]
        llm = Llama(model_path=str(path), n_ctx=args.seqlen, n_batch=args.seqlen, logits_all=True, type_k=0,
                    type_v=0, flash_attn=False, n_threads=2, verbose=False)  # fmt: skip
        value = llama_perplexity(llm, token_ids, args.seqlen, args.windows)
        llm.close()
        cache.write_text(json.dumps({"ppl": value}))
        return value

    rows = []
    for preset in args.presets.split(","):
        theirs = args.out / f"llama-{preset}.gguf"
        if not theirs.is_file():
            llama_quantize(source, theirs, preset, embedding)
        bits, _ = matrix_bits(theirs)
        ours = qpeft_gguf(model_dir, args.out, bits, costs)
        # interleaved: each preset's pair one after the other
        rows.append((preset, theirs, ours, bits, matrix_bits(ours)[0], ppl(theirs), ppl(ours)))
    reference = ppl(source)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(
        f"{args.model}, {args.windows} × {args.seqlen} WikiText-2 test windows, llama.cpp perplexity; F32 "
        f"{reference:.3f}; token embedding {embedding}; commit {commit}, {platform.node()}, {date.today()}"
    )
    print(
        "| preset | llama.cpp MiB | qpeft MiB | matrix bits llama.cpp | qpeft | ppl llama.cpp | ppl qpeft "
        "| size qpeft / llama.cpp | ppl qpeft / llama.cpp |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    points = []
    for preset, theirs, ours, bits_l, bits_q, ppl_l, ppl_q in rows:
        mib_l, mib_q = theirs.stat().st_size / 2**20, ours.stat().st_size / 2**20
        points.append((mib_l, ppl_l, mib_q, ppl_q, preset))
        print(f"| {preset} | {mib_l:.1f} | {mib_q:.1f} | {bits_l:.4f} | {bits_q:.4f} | {ppl_l:.3f} | {ppl_q:.3f} "
              f"| {mib_q / mib_l:.4f} | {ppl_q / ppl_l:.4f} |")  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    points.sort()
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="llama.cpp presets")
    ax.plot([p[2] for p in points], [p[3] for p in points], "s-", label="qpeft (ILP over GGUF formats)")
    for mib_l, ppl_l, _, _, preset in points:
        ax.annotate(preset, (mib_l, ppl_l), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(reference, color="grey", lw=0.8, ls="--", label="F32")
    ax.set_xlabel("model.gguf size (MiB)")
    ax.set_ylabel(f"perplexity ({args.windows} windows, llama.cpp)")
    ax.set_title(f"{args.model}: GGUF files in llama.cpp, data-free rounding")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "gguf_peer.png", dpi=120)


if __name__ == "__main__":
    main()
