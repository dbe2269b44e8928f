"""Quantize and dequantize throughput: qpeft vs bitsandbytes, NF4 + double quant.

    python tools/bench_quant.py [--device cpu|cuda] [--shapes 4096x4096,8192x28672] [--repeat 3]

Both libraries quantize the same bf16 matrix and dequantize it back to bf16 in the
same process; the table gives the median time of `--repeat` runs, the throughput
in millions of weights per second, and qpeft's speed as a ratio to bitsandbytes'
(> 1: qpeft is faster).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from qpeft.quant import PRESETS, dequantize, quantize


def timed(fn, repeat: int, device: torch.device) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default="4096x4096,8192x28672")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import bitsandbytes.functional as bnbf

    device = torch.device(args.device)
    config = PRESETS["nf4"]
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeat}"
    )
    print("| shape | op | qpeft s | bnb s | qpeft Mweights/s | bnb Mweights/s | qpeft speed / bnb |")
    print("|---|---|---:|---:|---:|---:|---:|")
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


if __name__ == "__main__":
    main()
