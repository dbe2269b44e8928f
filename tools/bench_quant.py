"""Quantize and dequantize throughput and peak memory: qpeft vs bitsandbytes, NF4 + double quant.

    python tools/bench_quant.py [--device cpu|cuda] [--shapes 4096x4096,8192x28672] [--repeat 3] [--memory]

Both libraries quantize the same bf16 matrix and dequantize it back to bf16 in the
same process; the table gives the median time of `--repeat` runs, the throughput
in millions of weights per second, and qpeft's speed as a ratio to bitsandbytes'
(> 1: qpeft is faster). qpeft's side is its own torch-ops dequantizer
(`qpeft.quant.dequantize`): the one every non-bitsandbytes config uses; by default an NF4
matrix in bitsandbytes' own format is dequantized by bitsandbytes' kernel itself.

With --memory (CPU), each (library, operation) also runs once in a fresh child
process that reports its peak resident memory above what the input and the output
themselves take: the working memory of the operation.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time

import torch
from measure import peak_rss_during, rss_bytes, timed

from qpeft.quant import PRESETS, dequantize, quantize


def memory_child(library: str, op: str, rows: int, cols: int) -> None:
    """Run one operation on a fresh bf16 matrix; print its working memory in bytes:
    the peak resident memory above the input, minus the output it returns."""
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    weight = torch.randn(rows, cols, dtype=torch.bfloat16) * 0.02
    if library == "qpeft":
        quantize_fn = lambda: quantize(weight, PRESETS["nf4"])  # noqa: E731
    else:
        quantize_fn = lambda: bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")  # noqa: E731
    run = quantize_fn
    if op == "dequantize":
        stored = quantize_fn()
        del weight  # the operation's input is the packed state
        if library == "qpeft":
            run = lambda: dequantize(stored, dtype=torch.bfloat16)  # noqa: E731
        else:
            run = lambda: bnbf.dequantize_4bit(*stored)  # noqa: E731
    time.sleep(0.2)  # let freed temporaries of the set-up go back to the OS
    base = rss_bytes()
    peak, result = peak_rss_during(run)
    output = rows * cols * 2 if op == "dequantize" else int(rows * cols * 4.127 / 8)
    print(peak - base - output)
    del result


def measure_memory(library: str, op: str, rows: int, cols: int) -> float:
    cmd = [sys.executable, __file__, "--memory-child", f"{library}:{op}:{rows}x{cols}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return int(out) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default="4096x4096,8192x28672")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="also measure peak working memory (CPU)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        library, op, shape = args.memory_child.split(":")
        rows, cols = (int(v) for v in shape.split("x"))
        memory_child(library, op, rows, cols)
        return
    import bitsandbytes.functional as bnbf

    device = torch.device(args.device)
    config = PRESETS["nf4"]
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.machine()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeat}"
    )
    print("| shape | op | qpeft s | bnb s | qpeft Mweights/s | bnb Mweights/s | qpeft speed / bnb |")
    print("|---|---|---:|---:|---:|---:|---:|")
    memory_rows = []
    for text in args.shapes.split(","):
        rows, cols = (int(v) for v in text.split("x"))
        torch.manual_seed(0)
        weight = (torch.randn(rows, cols, device=device) * 0.02).to(torch.bfloat16)
        ours_q, qt = timed(lambda w=weight: quantize(w, config), args.repeat, device)
        bnb_q, (packed, state) = timed(
            lambda w=weight: bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"),
            args.repeat,
            device,
        )
        ours_d, _ = timed(lambda q=qt: dequantize(q, dtype=torch.bfloat16), args.repeat, device)
        bnb_d, _ = timed(lambda p=packed, s=state: bnbf.dequantize_4bit(p, s), args.repeat, device)
        numel = weight.numel() / 1e6
        for op, ours, theirs in (("quantize", ours_q, bnb_q), ("dequantize", ours_d, bnb_d)):
            print(
                f"| {rows}x{cols} | {op} | {ours:.4f} | {theirs:.4f} | {numel / ours:.0f} | {numel / theirs:.0f} "
                f"| {theirs / ours:.2f} |",
                flush=True,
            )
        if args.memory:
            fp32_mib = weight.numel() * 4 / 2**20
            for op in ("quantize", "dequantize"):
                ours_mem, bnb_mem = measure_memory("qpeft", op, rows, cols), measure_memory("bnb", op, rows, cols)
                memory_rows.append(f"| {rows}x{cols} | {op} | {fp32_mib:.0f} | {ours_mem:.0f} | {bnb_mem:.0f} |")
    if memory_rows:
        print("\nWorking memory (MiB): peak resident memory above the input, less the output")
        print("| shape | op | one fp32 copy of the matrix | qpeft | bnb |")
        print("|---|---|---:|---:|---:|")
        print("\n".join(memory_rows))


if __name__ == "__main__":
    main()
