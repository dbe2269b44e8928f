"""The byte-table gather inside qpeft's dequantizer, and its dequantizers side by side.

    python tools/bench_dequant.py [--threads 1] [--repeats 50]

1. Gathering the decoded fp32 values of 442,368 packed NF4 bytes (a 576x1536 matrix)
   from a 256-entry table, three ways: rows of a (256, 2) fp32 table (index_select
   copies a row at a time), one float64 per byte, one int64 per byte (what
   `qpeft.quant.packing.decode_lut` builds), on random codes and on the same codes
   sorted (long runs of one byte; NF4 pairs whose second value is 0.0 read as
   subnormal float64s).
2. `dequantize` of that NF4 matrix to bf16 with qpeft's torch ops (`qpeft.quant.dequantize`)
   and with the default (bitsandbytes' compiled kernels for this format).
Median milliseconds of `--repeats` calls after 3 warm-up calls, one process.
"""

from __future__ import annotations

import argparse

import torch
from measure import timed

from qpeft import kernels
from qpeft.quant import PRESETS, dequantize, nf_codebook, quantize
from qpeft.quant.packing import _byte_lut_cpu, decode_lut


def median_ms(fn, repeats: int) -> float:
    return timed(fn, repeats, warmup=3)[0] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weight = torch.randn(576, 1536, generator=torch.Generator().manual_seed(0)).bfloat16()
    qt = quantize(weight, PRESETS["nf4"])
    pairs = nf_codebook(4)[_byte_lut_cpu(4).long()]  # (256, 2) fp32
    tables = {"(256, 2) rows": pairs, "float64 per byte": pairs.view(torch.float64).reshape(256)}
    tables["int64 per byte (qpeft)"] = decode_lut(nf_codebook(4), 4)
    codes = {"random": qt.parts["codes"].to(torch.int32)}
    codes["sorted"] = codes["random"].sort().values
    print(f"torch {torch.__version__}, {args.threads} thread(s); median ms of {args.repeats}")
    print(f"{'gather of 442,368 bytes':<26} {'random codes':>13} {'sorted codes':>13}")
    for name, table in tables.items():
        row = [median_ms(lambda t=table, c=c: t.index_select(0, c), args.repeats) for c in codes.values()]
        print(f"{name:<26} {row[0]:>13.3f} {row[1]:>13.3f}")
    torch_ops = median_ms(lambda: dequantize(qt, torch.bfloat16), args.repeats)
    default = median_ms(lambda: kernels.dequantize(qt, torch.bfloat16), args.repeats)
    print(f"dequantize 576x1536 NF4 to bf16: torch ops {torch_ops:.3f}, default (bitsandbytes) {default:.3f}")


if __name__ == "__main__":
    main()
