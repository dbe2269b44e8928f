"""WikiText-2 test perplexity before and after the same short fine-tune, per method.

    python tools/train_results.py WORKDIR [--steps 20] [--max-windows 20] [--costs CKPT]

Runs the user-facing commands into WORKDIR: the bases (`qpeft quantize` NF4 for
QLoRA; `qpeft decompose` Fisher LQ-LoRA rank 8 at 2.75 and 3.25 bits, one cost table
for both, or `--costs` from an earlier rank-8 Fisher checkpoint; QWHA rank 8 on NF3),
`qpeft eval` of each base, `qpeft train` of each SmolLM2 recipe with the same steps
(`--set train.steps=...`, its base given as `method.checkpoint` for the
decompositions), and `qpeft eval` of each trained model. Finished steps in WORKDIR
are reused, so an interrupted run continues. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from qpeft_run import run_qpeft

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
METHODS = {  # label → (recipe, base command or None when the recipe makes its own base)
    "QLoRA nf4 r8": ("smollm2-qlora-nf4.yaml", None),
    "LQ-LoRA 2.75 r8 (Fisher)": ("smollm2-lqlora-2.75bit.yaml", ["--budget", "2.75", "--rank", "8"]),
    "LQ-LoRA 3.25 r8 (Fisher)": ("smollm2-lqlora-3.25bit.yaml", ["--budget", "3.25", "--rank", "8"]),
    "QWHA nf3 r8": ("smollm2-qwha-3bit.yaml", ["--method", "qwha", "--config", "nf3", "--rank", "8"]),
}


def sh(*argv: object) -> str:
    return run_qpeft(*argv)[0]


def evaluate(path: Path, args: argparse.Namespace) -> dict:
    out = sh("eval", path, "--seqlen", 2048, "--max-windows", args.max_windows, "--json")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-windows", type=int, default=20)
    parser.add_argument("--costs", type=Path, default=None, help="a rank-8 Fisher LQ-LoRA checkpoint's cost table")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    costs = args.costs
    rows = []
    for label, (recipe_name, base_args) in METHODS.items():
        recipe = yaml.safe_load((RECIPES / recipe_name).read_text())
        name = recipe_name.removesuffix(".yaml")
        overrides = ["--set", f"train.steps={args.steps}", "--set", f"output_dir={work / name}"]
        if base_args is None:
            base = work / name / "base"
        else:
            base = work / f"base-{name}"
            if not base.exists():
                extra = ["--costs", costs] if costs is not None and "--budget" in base_args else []
                sh("decompose", "smollm2", *base_args, "--out", base, *extra)
            if "--budget" in base_args and costs is None:
                costs = base
            overrides += ["--set", "method.name=checkpoint", "--set", f"method.checkpoint={base}"]
            overrides += ["--set", "method.budget=null", "--set", "method.config=null"]
        trained = work / name / "model"
        if not trained.exists():
            sh("train", RECIPES / recipe_name, *overrides)
        before, after = evaluate(base, args), evaluate(trained, args)
        manifest = json.loads((trained / "qpeft_manifest.json").read_text())
        state = manifest["training"]
        rows.append((label, manifest["summary"], state, before, after, recipe["train"]))
        print(f"{label}: {before['ppl']:.4f} -> {after['ppl']:.4f}", file=sys.stderr, flush=True)
    first = rows[0]
    print(
        f"WikiText-2 test, seqlen 2048, first {first[3]['windows']} windows; fine-tune: {args.steps} steps x "
        f"{first[5]['batch_size']} x {first[2]['recipe']['data']['seqlen']} tokens of WikiText-2 validation "
        f"({first[2]['tokens']:,} tokens), lr {first[5]['lr']}, {first[5]['schedule']}, {first[5]['dtype']}"
    )
    print(
        f"{'method':<26} {'Q bits':>7} {'+adapter':>9} {'trainable':>10} {'ppl before':>11} {'ppl after':>10} {'s':>6}"
    )
    for label, summary, state, before, after, _ in rows:
        print(
            f"{label:<26} {summary['bits_per_param']:>7.3f} {summary['bits_with_adapter']:>9.3f} "
            f"{summary['adapter_params']:>10,} {before['ppl']:>11.4f} {after['ppl']:>10.4f} {state['seconds']:>6.0f}"
        )


if __name__ == "__main__":
    main()
