"""qpeft's round-to-nearest search for GGUF's 32-value block formats against gguf-py's
own quantizer (`gguf.quants.quantize`, llama.cpp's reference rounding), on the 210
projection matrices of SmolLM2, matrix by matrix from its safetensors.

    python tools/bench_gguf_quant.py [--model smollm2] [--limit N]

Prints a markdown table per format: the total squared error of each, their ratio
(qpeft / gguf-py), and on how many matrices qpeft's is lower or equal. SmolLM2's
weights come from a Q4_1 GGUF: they lie on a q4_1 grid, which both recover exactly. Both are read back
with `gguf.quants.dequantize`, so the errors are those of the bytes a GGUF file
would hold.
"""

from __future__ import annotations

import argparse
import platform

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from qpeft.models.resolve import resolve_model
from qpeft.models.selection import DEFAULT_TARGETS, matches
from qpeft.models.weights import SafetensorsWeights
from qpeft.quant import parse_config, quantize
from qpeft.quant.formats.ggml import KINDS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--limit", type=int, default=None, help="only the first N matrices")
    args = parser.parse_args()
    weights = SafetensorsWeights(resolve_model(args.model))
    names = [
        k
        for k in weights.stream_order()
        if k.endswith(".weight") and matches(k.removesuffix(".weight"), DEFAULT_TARGETS)
    ]
    names = sorted(names)[: args.limit]
    totals = {kind: [0.0, 0.0, 0] for kind in KINDS}
    for name in tqdm(names, desc="matrices"):
        w = weights.tensor(name).float()
        for kind in KINDS:
            qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
            raw = quantize(w, parse_config(kind)).parts["blocks"].numpy().reshape(w.shape[0], -1)
            ours = gguf.quants.dequantize(raw, qtype)
            theirs = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype)
            e_ours = float(np.square(w.numpy() - ours, dtype=np.float64).sum())
            e_theirs = float(np.square(w.numpy() - theirs, dtype=np.float64).sum())
            totals[kind][0] += e_ours
            totals[kind][1] += e_theirs
            totals[kind][2] += e_ours <= e_theirs
    print(f"{len(names)} matrices of {args.model}; {platform.node()}, torch {torch.__version__}")
    print("| format | bits/param | qpeft Σ(w − ŵ)² | gguf-py Σ(w − ŵ)² | qpeft / gguf-py | matrices qpeft ≤ gguf-py |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, (ours, theirs, lower) in totals.items():
        bits = parse_config(kind).bits_per_param
        ratio = f"{ours / theirs:.4f}" if theirs else ("equal (0)" if not ours else "inf")
        print(f"| {kind} | {bits:g} | {ours:.6g} | {theirs:.6g} | {ratio} | {lower}/{len(names)} |")


if __name__ == "__main__":
    main()
