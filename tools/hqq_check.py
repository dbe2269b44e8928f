"""`qpeft export --to hf-hqq` on SmolLM2, loaded by transformers 4.57 + hqq + peft
with no qpeft imported (tools/hqq_load.py in the `make hf4-env` environment), against
qpeft's own forward of the same checkpoint on the same tokens.

    python tools/hqq_check.py WORKDIR [--tokens 512] [--hf4-python .venv-hf4/bin/python]

Checkpoints (written once into WORKDIR, reused):

* int4-g64: `qpeft quantize smollm2 --config int4-g64`, with a rank-8 LoRA adapter of
  random non-zero factors (what a fine-tune leaves; its values do not matter here);
* ILP-int: `qpeft decompose smollm2 --budget 3.5 --rank 0 --configs
  int2-g64,int3-g64,int4-g64,int4-g128,int8-g64` (GPTQ rounding, Fisher costs), with the
  same kind of adapter: a per-matrix mixture, int4-g128 on 576-wide rows included;
* nf4: `qpeft quantize smollm2 --config nf4`, exported with --requantize.

Each is exported with --dtype fp32 and fp16 and loaded in that dtype. Prints a
markdown table: bits, the matrices re-quantized, whether every HQQ layer dequantizes
to qpeft's weights bit for bit (fp32), and the logit differences.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from qpeft.cli import main as qpeft
from qpeft.eval.perplexity import load_eval_text, tokenize
from qpeft.export.formats import export_checkpoint
from qpeft.io.checkpoint import read_manifest
from qpeft.models.loading import load_checkpoint
from qpeft.models.resolve import resolve_model
from qpeft.modules import quantized_layers
from qpeft.training.model import save_with_random_lora

ROOT = Path(__file__).resolve().parents[1]
ILP_CONFIGS = "int2-g64,int3-g64,int4-g64,int4-g128,int8-g64"


def checkpoints(work: Path) -> dict[str, tuple[Path, bool]]:
    """name → (checkpoint, needs --requantize)."""
    runs = {
        "int4-g64": ["quantize", "smollm2", "--config", "int4-g64"],
        "ILP-int": ["decompose", "smollm2", "--budget", "3.5", "--rank", "0", "--configs", ILP_CONFIGS],
        "nf4": ["quantize", "smollm2", "--config", "nf4"],
    }
    out = {}
    for name, argv in runs.items():
        path = work / name
        if not path.exists() and qpeft([*argv, "--out", str(path)]) != 0:
            raise SystemExit(f"qpeft {' '.join(argv)} failed")
        lora = work / f"{name}-lora"
        if name != "nf4" and not lora.exists():
            save_with_random_lora(path, lora, 8, 16.0, std=0.02)
        out[name] = (path if name == "nf4" else lora, name == "nf4")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--tokens", type=int, default=512, help="WikiText-2 test tokens of the prompt")
    parser.add_argument("--hf4-python", type=Path, default=ROOT / ".venv-hf4" / "bin" / "python")
    args = parser.parse_args()
    if not args.hf4_python.exists():
        raise SystemExit(f"{args.hf4_python} is missing: run `make hf4-env`")
    args.work.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    ids = tokenize(tokenizer, load_eval_text("wikitext2"))[: args.tokens].unsqueeze(0)
    rows = []
    for name, (ckpt, requantize) in checkpoints(args.work).items():
        ours = load_checkpoint(ckpt)
        with torch.no_grad():
            logits = ours(ids).logits.float()
        weights = {n: layer.dequantized_weight() for n, layer in quantized_layers(ours).items()}
        reference = args.work / f"{name}-reference.pt"
        torch.save({"ids": ids, "logits": logits, "weights": weights}, reference)
        del ours
        summary = read_manifest(ckpt)["summary"]
        for dtype in ("fp32", "fp16"):
            out = args.work / f"{name}-hqq-{dtype}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            report = export_checkpoint(ckpt, "hf-hqq", out, dtype=dtype, requantize=requantize)
            seconds = time.perf_counter() - start
            loaded = subprocess.run(
                [str(args.hf4_python), str(ROOT / "tools" / "hqq_load.py"), str(out), str(reference), "--dtype", dtype],
                capture_output=True, text=True, check=False, env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
            )  # fmt: skip
            if loaded.returncode:
                raise SystemExit(loaded.stderr[-3000:])
            found = json.loads(loaded.stdout.strip().splitlines()[-1])
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
            errors = report["requantized_rel_error"]
            rows.append(
                [
                    name,
                    dtype,
                    f"{summary['bits_per_param']:.4f}",
                    f"{report['hqq_bits_per_param']:.4f}",
                    f"{len(errors)}" + (f" (≤ {max(errors.values()):.3f})" if errors else ""),
                    ("yes" if found["weights_equal"] else "no") if dtype == "fp32" else "—",
                    f"{found['max_abs_diff']:.3g}",
                    f"{found['rel_diff']:.3g}",
                    f"{size:.1f}",
                    f"{seconds:.1f}",
                ]
            )
            print(json.dumps({"checkpoint": name, "dtype": dtype, **found}), file=sys.stderr)
    header = [
        "checkpoint", "runtime dtype", "qpeft Q bits", "HQQ bits", "re-quantized (rel. error)",
        "weights bit-equal (fp32)", "max abs Δlogit", "rel. Δlogit", "export MiB", "export s",
    ]  # fmt: skip
    print(f"{args.tokens} WikiText-2 test tokens; {platform.node()}, torch {torch.__version__}; transformers "
          f"{found['transformers']}, hqq {found['hqq']}, peft {found['peft']} (no qpeft imported)")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
