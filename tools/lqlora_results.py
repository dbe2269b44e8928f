"""WikiText-2 perplexity of LQ-LoRA / ILP-only checkpoints next to uniform NF4/NF3.

Runs the user-facing commands (`qpeft quantize`, `qpeft decompose`, `qpeft eval
--json`) into WORKDIR and prints one table. A variant's cost table is computed at
its first budget and reused (`--costs`) for the others; checkpoints already in
WORKDIR are reused, so an interrupted run continues.

    python tools/lqlora_results.py /tmp/runs --variants r0-f,r8-f,r8-f-nearest --max-windows 20

A variant is rRANK-f (Fisher) or rRANK-nf (no Fisher), with the default gptq rounding of
Q or, ending in -nearest, round-to-nearest (the paper's); -nearest variants reuse the
cost table of the same variant without it. The uniform rows are `qpeft quantize`
(round-to-nearest, bitsandbytes' format) and, with --uniform-gptq, `qpeft decompose
--config PRESET --rank 0` (the same formats, gptq rounding).

`--nproc 2` computes each cost table with `torchrun --nproc_per_node 2` and one
thread per process (1.5x faster than one two-thread process on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qpeft_run import resume_flag, run_qpeft


def sh(*argv: object, nproc: int = 1) -> str:
    return run_qpeft(*argv, nproc=nproc)[0]


def evaluate(target: str | Path, args: argparse.Namespace) -> dict:
    out = sh(
        "eval", target, "--seqlen", args.seqlen, "--max-windows", args.max_windows, "--dtype", args.dtype, "--json"
    )
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--budgets", default="2.5,2.75,3.25,3.5")
    parser.add_argument(
        "--variants", default="r0-f,r8-f,r8-nf,r64-f,r64-nf", help="rRANK-f (Fisher) or rRANK-nf, [-nearest]"
    )
    parser.add_argument("--uniform-gptq", action="store_true", help="also uniform nf4 and nf3 with gptq rounding")
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--nproc", type=int, default=1, help="processes for each cost table (torchrun)")
    args = parser.parse_args()
    args.max_windows = args.max_windows or 10**9
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    base = evaluate("smollm2", args)
    rows.append(("fp32 (unquantized)", "", 32.0, 32.0, 32.0, base))
    for preset in ("nf4", "nf3"):
        ckpt = work / f"uniform-{preset}"
        if not ckpt.exists():
            sh("quantize", "smollm2", "--config", preset, "--out", ckpt)
        manifest = json.loads((ckpt / "qpeft_manifest.json").read_text())
        bits = manifest["summary"]["bits_per_param"]
        rows.append((f"uniform {preset}", "", bits, bits, bits, evaluate(ckpt, args)))
    for preset in ("nf4", "nf3") if args.uniform_gptq else ():
        ckpt = work / f"uniform-{preset}-gptq"
        if not ckpt.exists():
            sh("decompose", "smollm2", "--config", preset, "--rank", 0, "--out", ckpt)
        bits = json.loads((ckpt / "qpeft_manifest.json").read_text())["summary"]["bits_per_param"]
        rows.append((f"uniform {preset} gptq", "", bits, bits, bits, evaluate(ckpt, args)))
    for variant in args.variants.split(","):
        rank_text, fisher, *rounding = variant.split("-")
        rank = int(rank_text.removeprefix("r"))
        table_variant = f"{rank_text}-{fisher}"  # the rounding does not change the cost table
        # a finished checkpoint of this variant lends its cost table to the others
        first = next((p for p in sorted(work.glob(f"lq-{table_variant}-*")) if (p / "cost_table.json").is_file()), None)
        for budget in args.budgets.split(","):
            ckpt = work / f"lq-{variant}-{budget}"
            if not ckpt.exists():
                extra = ["--costs", first] if first is not None else []
                extra += [] if fisher == "f" else ["--no-fisher"]
                extra += ["--rounding", "nearest"] if rounding == ["nearest"] else []
                extra += resume_flag(ckpt)
                nproc = 1 if first is not None else args.nproc  # a reused table needs no workers
                sh("decompose", "smollm2", "--budget", budget, "--rank", rank, "--out", ckpt, *extra, nproc=nproc)
            first = first or ckpt
            s = json.loads((ckpt / "qpeft_manifest.json").read_text())["summary"]
            label = ("ILP-only" if rank == 0 else f"LQ-LoRA r{rank}") + (" Fisher" if fisher == "f" else "")
            label += " nearest" if rounding == ["nearest"] else ""
            rows.append(
                (
                    label,
                    budget,
                    s["bits_per_param"],
                    s["bits_with_adapter"],
                    s["bits_with_lowrank_nf8"],
                    evaluate(ckpt, args),
                )
            )
            print(f"{label} {budget}: ppl {rows[-1][-1]['ppl']:.4f}", file=sys.stderr)
    windows = rows[0][-1]["windows"]
    print(
        f"WikiText-2 test, seqlen {args.seqlen}, first {windows} windows ({rows[0][-1]['tokens']} predicted tokens), "
        f"{args.dtype}"
    )
    print(f"{'method':<24} {'budget':>6} {'Q bits':>7} {'+LR bf16':>9} {'+LR nf8':>8} {'ppl':>9} {'vs nf4':>7}")
    nf4 = rows[1][-1]["ppl"]
    for label, budget, q, bf16, nf8, result in rows:
        print(
            f"{label:<24} {budget:>6} {q:>7.3f} {bf16:>9.3f} {nf8:>8.3f} {result['ppl']:>9.4f} "
            f"{result['ppl'] / nf4:>7.3f}"
        )


if __name__ == "__main__":
    main()
