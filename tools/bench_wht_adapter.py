"""Forward cost of QWHA's WHT adapter: activations first vs merged into the weight,
next to a peft LoRA of the same trainable parameter count, measured in the same run.

For each layer shape and number of tokens it times, over a frozen dequantized base
y = x·Wᵀ (the matmul every path shares):
* `act`:    + transform of x and the gathered sparse product (WHTAdapter.forward);
* `merged`: + ΔW = F·T added to W before the one matmul;
* `peft`:   + peft's LoRA (lora.Linear) of rank r, the same parameter count;
and prints each path's extra time over the bare matmul, the merged/act ratio, and the
tokens-per-output-row ratio at which merging becomes cheaper (the crossover that
`WHT_MERGE_TOKENS_PER_ROW` encodes).

    python tools/bench_wht_adapter.py [--shapes 576x576,1536x576] [--rank 8]
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from measure import timed

from qpeft.methods.qwha.adapter import WHTAdapter
from qpeft.methods.qwha.solver import parameter_count


def wht_adapter(d_in: int, d_out: int, rank: int) -> WHTAdapter:
    count = parameter_count(rank, (d_out, d_in))
    adapter = WHTAdapter(d_in, d_out, count)
    flat = torch.randperm(d_out * d_in)[:count].sort().values
    adapter.set_positions(torch.randn(count), flat // d_in, flat % d_in)
    return adapter


def extra_times(weight: torch.Tensor, adapter: WHTAdapter, lora, x: torch.Tensor, repeats: int) -> list[float]:
    """Seconds of the bare matmul, then each path's extra over it: act, merged, peft."""
    base = timed(lambda: F.linear(x, weight), repeats, warmup=1, statistic=min)[0]
    paths = [
        lambda: F.linear(x, weight) + adapter(x),
        lambda: F.linear(x, weight + adapter.delta_weight()),
        lambda: lora(x),
    ]
    return [base, *(timed(path, repeats, warmup=1, statistic=min)[0] - base for path in paths)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="576x576,1536x576,576x1536,4096x4096", help="DOUTxDIN list")
    parser.add_argument("--tokens", default="1,16,64,256,1024,4096")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"rank-{args.rank} parameter budget; extra ms over the base matmul y = x·Wᵀ (fp32, no grad)")
    columns = " ".join(f"{c:>8}" for c in ("base", "act", "merged", "peft"))
    print(f"{'shape':>10} {'tokens':>6} {columns} {'merged/act':>10} {'tok/row':>8}")
    with torch.no_grad():
        for shape in args.shapes.split(","):
            d_out, d_in = map(int, shape.split("x"))
            adapter = wht_adapter(d_in, d_out, args.rank)
            base_layer = torch.nn.Linear(d_in, d_out, bias=False)
            config = LoraConfig(r=args.rank, lora_alpha=args.rank)
            lora = LoraLinear(base_layer, "default", config, r=args.rank, lora_alpha=args.rank)
            torch.nn.init.normal_(lora.lora_B["default"].weight)
            for tokens in map(int, args.tokens.split(",")):
                x = torch.randn(tokens, d_in)
                base, act, merged, peft_extra = extra_times(base_layer.weight, adapter, lora, x, args.repeats)
                print(
                    f"{shape:>10} {tokens:>6} {1e3 * base:>8.3f} {1e3 * act:>8.3f} {1e3 * merged:>8.3f} "
                    f"{1e3 * peft_extra:>8.3f} {merged / act if act > 0 else float('nan'):>10.2f} "
                    f"{tokens / d_out:>8.3f}"
                )


if __name__ == "__main__":
    main()
