#!/usr/bin/env bash
# One model end to end (README "End to end"): decompose SmolLM2 over the GGUF block
# formats at 4.75 bits → fine-tune 20 steps → generate → export to llama.cpp, to
# transformers (HQQ and bitsandbytes) and to peft. Prints each step's wall time and a
# table of each export's size on disk and bits per parameter. About 15 min on CPU-2.
#   tools/walkthrough.sh [OUT]        (default out/walk; OUT must not exist)
set -euo pipefail
OUT=${1:-out/walk}
if [ -e "$OUT" ]; then echo "walkthrough: $OUT exists" >&2; exit 2; fi
mkdir -p "$OUT"
log="$OUT/times.tsv"
step() {  # step NAME COMMAND...: run, log the wall time
  local name=$1; shift
  local start=$SECONDS
  echo "+ $*" >&2
  "$@"
  printf '%s\t%d\n' "$name" $((SECONDS - start)) >>"$log"
}
step decompose qpeft decompose smollm2 --configs gguf --budget 4.75 --rank 8 --out "$OUT/base"
cat >"$OUT/train.yaml" <<YAML
model: smollm2
method: {name: checkpoint, checkpoint: $OUT/base}
data: {train: wikitext2, eval: null, seqlen: 512}
train: {steps: 20, batch_size: 4, lr: 2.0e-4, max_grad_norm: 0.3, dtype: bf16, save_every: 10}
seed: 0
output_dir: $OUT/train
YAML
step train qpeft train "$OUT/train.yaml"
CKPT="$OUT/train/model"
step generate qpeft generate "$CKPT" --chat --prompt "What is a GGUF file?" --max-new-tokens 48 \
  | tee "$OUT/generate.txt"
step export-gguf qpeft export "$CKPT" --to gguf --out "$OUT/gguf"
step export-hf-hqq qpeft export "$CKPT" --to hf-hqq --requantize --out "$OUT/hf-hqq"
step export-hf-bnb qpeft export "$CKPT" --to hf-bnb --requantize --out "$OUT/hf-bnb"
step export-peft qpeft export "$CKPT" --to peft --out "$OUT/peft"
step export-merged qpeft export "$CKPT" --to merged --out "$OUT/merged"
python - "$OUT" <<'PY'
import json, subprocess, sys
from pathlib import Path

out = Path(sys.argv[1])
def mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20
print("| step | wall (s) |\n|---|---:|")
for line in (out / "times.tsv").read_text().splitlines():
    name, seconds = line.split("\t")
    print(f"| {name} | {seconds} |")
print("\n| artefact | MiB on disk | bits/param of the quantized matrices | largest re-quantization error |\n|---|---:|---:|---:|")
info = json.loads(subprocess.run(["qpeft", "inspect", "--json", str(out / "train/model")], capture_output=True, text=True, check=True).stdout)
print(f"| qpeft checkpoint | {mib(out / 'train/model'):.1f} | {info['bits_q']:.4f} (with the adapter {info['bits_total']:.4f}) | |")
for name in ("gguf", "hf-hqq", "hf-bnb", "peft", "merged"):
    report = json.loads((out / name / "qpeft_export.json").read_text())
    bits = report.get("gguf_bits_per_param") or report.get("hqq_bits_per_param")
    errors = report.get("requantized_rel_error") or {}
    worst = f"{max(errors.values()):.4f} ({len(errors)} matrices)" if errors else "none"
    print(f"| {name} | {mib(out / name):.1f} | {'' if bits is None else f'{bits:.4f}'} | {worst} |")
PY
