"""Speed of qpeft's table-driven `nearest_level` against `torch.bucketize` (binary
search over the midpoints), measured in the same run on the same values; the codes
are checked equal before timing.

    python tools/bench_nearest_level.py --numel 884736      # one 1536×576 matrix
"""

from __future__ import annotations

import argparse
from statistics import fmean

import torch
from measure import timed

from qpeft.quant.codebooks import dynamic_codebook, nearest_level, nf_codebook, uniform_codebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=1536 * 576)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    x = torch.rand(args.numel, generator=torch.Generator().manual_seed(0)) * 2 - 1
    codebooks = {f"nf{b}": nf_codebook(b) for b in (2, 3, 4, 8)}
    codebooks |= {"uniform3": uniform_codebook(3), "dynamic8": dynamic_codebook()}
    print(f"{args.numel} values in [-1, 1], {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'codebook':<10} {'bucketize ms':>13} {'qpeft ms':>9} {'speed-up':>9}")
    for name, codebook in codebooks.items():
        midpoints = (codebook[:-1] + codebook[1:]) / 2
        if not torch.equal(nearest_level(x, codebook), torch.bucketize(x, midpoints, out_int32=True)):
            raise SystemExit(f"{name}: codes differ from bucketize")
        bucketize = lambda m=midpoints: torch.bucketize(x, m, out_int32=True)  # noqa: E731
        search = timed(bucketize, args.repeats, warmup=1, statistic=fmean)[0]
        table = timed(lambda c=codebook: nearest_level(x, c), args.repeats, warmup=1, statistic=fmean)[0]
        print(f"{name:<10} {search * 1e3:>13.2f} {table * 1e3:>9.2f} {search / table:>8.1f}x")


if __name__ == "__main__":
    main()
