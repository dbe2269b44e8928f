"""WikiText-2 test perplexity of SmolLM2: fp32, qpeft nf4/nf3/nf2, and bitsandbytes
NF4 + double quant loaded through transformers' BitsAndBytesConfig, in one run on
the same tokens.

    python tools/compare_bnb_ppl.py [--model smollm2] [--seqlen 2048] [--max-windows N]

Prints a markdown table (perplexity, ratio to bitsandbytes NF4, bits/param) and,
with --json FILE, writes the rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from qpeft.eval.perplexity import load_eval_text, perplexity, tokenize
from qpeft.models.loading import load_checkpoint
from qpeft.models.resolve import resolve_model
from qpeft.quant import parse_config
from qpeft.stages.quantize import quantize_model


def bnb_bits_per_param(model: torch.nn.Module) -> tuple[float, int]:
    """Stored bits per parameter of every bitsandbytes 4-bit layer, counted from its
    quant state: packed codes, absmax codes, nested absmax and the offset."""
    import bitsandbytes as bnb

    bits, numel = 0, 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            numel += state.shape.numel()
            bits += module.weight.numel() * module.weight.element_size() * 8
            bits += state.absmax.numel() * state.absmax.element_size() * 8
            if state.nested:
                bits += state.state2.absmax.numel() * 32 + 32
    return bits / numel, numel


def first_window_logits(model: torch.nn.Module, ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[:seqlen].unsqueeze(0), use_cache=False).logits[0].float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--configs", default="nf4,nf3,nf2", help="qpeft configs to evaluate")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    model_dir = resolve_model(args.model)
    ids = tokenize(AutoTokenizer.from_pretrained(model_dir), load_eval_text("wikitext2"))
    windows = ids.numel() // args.seqlen
    evaluated = min(windows, args.max_windows or windows)
    print(f"WikiText-2 test: {ids.numel()} tokens, {windows} windows of {args.seqlen}; evaluating {evaluated}")
    rows: list[dict] = []
    logits: dict[str, torch.Tensor] = {}

    def record(name: str, model: torch.nn.Module, bits: float | None, **extra) -> None:
        result = perplexity(model, ids, args.seqlen, args.max_windows)
        logits[name] = first_window_logits(model, ids, args.seqlen)
        rows.append({"method": name, "bits": bits, **result.as_dict(), **extra})
        print(f"  {name}: ppl {result.ppl:.4f} ({result.seconds:.0f} s)", flush=True)

    fp32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    record("fp32", fp32, 32.0)
    del fp32

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    start = time.perf_counter()
    bnb_model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config, dtype=torch.float32)
    bnb_model.eval()
    bnb_bits, bnb_numel = bnb_bits_per_param(bnb_model)
    record("bitsandbytes nf4 (DQ)", bnb_model, bnb_bits, quantize_seconds=time.perf_counter() - start, params=bnb_numel)
    del bnb_model

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            config = parse_config(name)
            out = Path(tmp) / config.name
            manifest = quantize_model(model_dir, out, config, source=args.model)
            seconds = manifest["provenance"]["seconds"]
            bits = manifest["summary"]["bits_per_param"]
            record(
                f"qpeft {name}",
                load_checkpoint(out),
                bits,
                quantize_seconds=seconds,
                params=manifest["summary"]["params"],
            )

    bnb_row = next(r for r in rows if r["method"].startswith("bitsandbytes"))
    reference = logits[bnb_row["method"]]
    print()
    print("| method | bits/param | ppl | ppl / bnb-nf4 | max abs logit diff vs bnb-nf4 (window 0) |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        diff = (logits[row["method"]] - reference).abs().max().item()
        row["max_logit_diff_vs_bnb"] = diff
        ratio = row["ppl"] / bnb_row["ppl"]
        print(f"| {row['method']} | {row['bits']:.4f} | {row['ppl']:.4f} | {ratio:.4f} | {diff:.4f} |")
    print(
        f"\n{rows[0]['tokens']} predicted tokens ({rows[0]['windows']} windows × {args.seqlen - 1}); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
