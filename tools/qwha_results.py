"""Quantized-only vs LQ-LoRA init vs QWHA init at equal trainable parameters, on SmolLM2.

For every target (a uniform config, or an ILP bit budget) and every rank r (the
adapters' parameter budget: LoRA rank r, or r·(d_in + d_out) WHT values), it runs the
user-facing commands into WORKDIR and prints one table: Q bits, bits with the adapter
as stored, WikiText-2 test perplexity, the output error ‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖ summed
over all matrices on the calibration activations (WikiText-2 validation, the data
QWHA's init and LQ-LoRA's Fisher see), and the wall time of the `qpeft
decompose` (or `quantize`) command, calibration excluded (cached beforehand). Quantized-only at a budget is the
Fisher-weighted ILP-only mixed precision (LQ-LoRA rank 0). A method's cost table is
computed at its first budget and reused (`--costs`) for the others; finished
checkpoints in WORKDIR are reused, so an interrupted run continues.

    python tools/qwha_results.py /tmp/qwha --ranks 8 --max-windows 20

A checkpoint put into WORKDIR under the tool's name beforehand (e.g. a symbolic link to
`tools/lqlora_results.py`'s LQ-LoRA checkpoint of the same budget and rank) is used as
it is; its time column is then empty.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qpeft_run import resume_flag, run_qpeft

from qpeft.eval.output_error import output_errors
from qpeft.models.resolve import resolve_model
from qpeft.models.selection import DEFAULT_TARGETS
from qpeft.pipeline.calibrate import calibrate_activations

LABELS = {"quant": "quantized only", "lqlora": "LQ-LoRA r{}", "qwha": "QWHA r{}"}


def build(ckpt: Path, method: str, rank: int, target: str, costs: Path | None, nproc: int) -> float | None:
    """Make the checkpoint unless it exists; the command's wall seconds, or None."""
    if ckpt.exists():
        return None
    how = ["--budget", target] if target[0].isdigit() else ["--config", target]
    if method == "quant" and not target[0].isdigit():
        return run_qpeft("quantize", "smollm2", "--config", target, "--out", ckpt)[1]
    method_args = ["--method", "qwha"] if method == "qwha" else []
    extra = ["--costs", costs] if costs is not None and target[0].isdigit() else []
    extra += resume_flag(ckpt)
    nproc = nproc if target[0].isdigit() and costs is None else 1  # only a new cost table is split
    return run_qpeft("decompose", "smollm2", *method_args, *how, "--rank", rank, "--out", ckpt, *extra, nproc=nproc)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--configs", default="nf2,nf3,nf4")
    parser.add_argument("--budgets", default="2.75,3.25")
    parser.add_argument("--ranks", default="8,64")
    parser.add_argument("--methods", default="quant,lqlora,qwha")
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--nproc", type=int, default=1, help="processes for each cost table (torchrun)")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(None)
    grams, _ = calibrate_activations(model_dir, DEFAULT_TARGETS)
    # the Fisher too, so that no decompose below times a calibration
    if not (work / "fisher.safetensors").exists():
        run_qpeft("calibrate", "smollm2", "--out", work / "fisher.safetensors")
    window_args = ["--max-windows", args.max_windows] if args.max_windows else []
    rows = []
    targets = [t for t in [*args.configs.split(","), *args.budgets.split(",")] if t]
    for method in args.methods.split(","):
        for rank in [0] if method == "quant" else [int(r) for r in args.ranks.split(",")]:
            costs = None
            for target in targets:
                ckpt = work / f"{method}-r{rank}-{target}"
                seconds = build(ckpt, "lqlora" if method == "quant" else method, rank, target, costs, args.nproc)
                manifest = json.loads((ckpt / "qpeft_manifest.json").read_text())
                if (ckpt / "cost_table.json").is_file():
                    costs = costs or ckpt
                out, _ = run_qpeft("eval", ckpt, "--seqlen", args.seqlen, *window_args, "--json")
                result = json.loads(out.strip().splitlines()[-1])
                s = manifest["summary"]
                row = {
                    "method": LABELS[method].format(rank),
                    "target": target,
                    "q_bits": s["bits_per_param"],
                    "adapter_bits": s.get("bits_with_adapter", s["bits_per_param"]),
                    "adapter_params": s.get("adapter_params", 0),
                    "output_error": output_errors(ckpt, model_dir, grams).total,
                    "ppl": result["ppl"],
                    "seconds": seconds,  # None: the checkpoint came from an earlier run
                    "windows": result["windows"],
                    "tokens": result["tokens"],
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(
        f"WikiText-2 test, seqlen {args.seqlen}, first {rows[0]['windows']} windows ({rows[0]['tokens']} tokens); "
        f"output error on {grams.tokens} calibration tokens (WikiText-2 validation)"
    )
    columns = ("Q bits", 7), ("+adapter", 9), ("params", 10), ("out err", 8), ("ppl", 10), ("s", 6)
    print(f"{'method':<16} {'target':>6} " + " ".join(f"{name:>{width}}" for name, width in columns))
    for r in rows:
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        print(
            f"{r['method']:<16} {r['target']:>6} {r['q_bits']:>7.3f} {r['adapter_bits']:>9.3f} "
            f"{r['adapter_params']:>10,} {r['output_error']:>8.4f} {r['ppl']:>10.4f} {seconds:>6}"
        )


if __name__ == "__main__":
    main()
