"""Throughput of qpeft's fast Walsh–Hadamard transform against a dense matmul by the
same orthonormal matrix, measured in the same run on the same device.

For each width, transforms a batch of rows (activations: tokens × width) with
`WalshHadamard.forward` and with `x @ Tᵀ` (T the dense n×n matrix, built once and
not timed), and prints rows/s of both and their ratio.

    python tools/bench_hadamard.py                      # CPU, fp32
    python tools/bench_hadamard.py --device cuda --dtype bf16 --rows 16384
"""

from __future__ import annotations

import argparse
from statistics import fmean

import torch
from measure import timed

from qpeft.transforms.hadamard import WalshHadamard

WIDTHS = [576, 1536, 4096, 8192, 11008, 14336, 28672]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--rows", type=int, default=2048, help="rows (tokens) per call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {args.device} ({name}), {args.dtype}, {args.rows} rows, torch {torch.__version__}")
    print(f"{'width':>6} {'factors':<16} {'fast rows/s':>12} {'dense rows/s':>13} {'fast/dense':>11}  note")
    for width in map(int, args.widths.split(",")):
        transform = WalshHadamard(width)
        dense = transform.matrix(torch.float32).to(args.device, dtype).T.contiguous()
        x = torch.randn(args.rows, width, device=args.device, dtype=dtype)
        fast_s = timed(lambda t=transform, x=x: t.forward(x), args.repeats, args.device, warmup=1, statistic=fmean)[0]
        dense_s = timed(lambda dense=dense, x=x: x @ dense, args.repeats, args.device, warmup=1, statistic=fmean)[0]
        factors = "x".join(map(str, transform.factors))
        print(
            f"{width:>6} {factors:<16} {args.rows / fast_s:>12.0f} {args.rows / dense_s:>13.0f} "
            f"{dense_s / fast_s:>10.2f}x  {transform.note or ''}"
        )


if __name__ == "__main__":
    main()
