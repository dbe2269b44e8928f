"""Training step time and memory: qpeft QLoRA vs peft + bitsandbytes QLoRA, same run.

    python tools/bench_train.py [--steps 5] [--batch 4] [--seqlen 512] [--rank 8] [--dtype bf16]

Both train a LoRA of the same rank on the q, k, v, o, gate, up, down projections of
the embedded SmolLM2-135M over an NF4 base with double-quantized scales (qpeft: its
own packed NF4 and `QuantLinear`; peft: `BitsAndBytesConfig(load_in_4bit,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant, bnb_4bit_compute_dtype)` and
`get_peft_model`), on the same token batches, with AdamW and autocast in `--dtype`.
qpeft runs twice: with its default kernels (bitsandbytes' compiled dequantizer for
these NF4 matrices, `QPEFT_DEQUANT=auto`) and with its own torch-ops dequantizer
(`QPEFT_DEQUANT=torch`, what every other quantization config uses).
Each run is a fresh child process (one after the other, never together) and
reports the median step time (forward + backward + optimizer step, after one warm-up
step), its resident memory once the model is built, and the peak during the steps
(sampled every 0.2 ms). The table gives qpeft / peft ratios (time: < 1 is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from measure import peak_rss_during, rss_bytes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# run name -> QPEFT_DEQUANT for its process
RUNS = {"qpeft": "auto", "qpeft-torch": "torch", "peft": "auto"}


def build_qpeft(model_dir: Path, base: Path, rank: int, alpha: float):
    from qpeft.models.loading import load_checkpoint
    from qpeft.training.model import add_lora, freeze_all_but_adapters

    model = load_checkpoint(base, torch.float32)
    add_lora(model, rank, alpha, seed=0)
    return model, freeze_all_but_adapters(model)


def build_peft(
    model_dir: Path, base: Path | None, rank: int, alpha: float, dtype: torch.dtype, device_map: str | None = None
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, dtype=torch.float32, device_map=device_map
    )
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS, bias="none")
    model = get_peft_model(model, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def worker(args: argparse.Namespace) -> None:
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    start_rss = rss_bytes()
    if args.worker.startswith("qpeft"):
        model, params = build_qpeft(args.model_dir, args.base, args.rank, 2.0 * args.rank)
    else:
        model, params = build_peft(args.model_dir, args.base, args.rank, 2.0 * args.rank, dtype)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 49152, (args.batch, args.seqlen), generator=generator) for _ in range(args.steps + 1)]

    def step(ids: torch.Tensor) -> float:
        begin = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - begin

    step(batches[0])  # warm-up
    built_rss = rss_bytes()
    peak, times = peak_rss_during(lambda: [step(ids) for ids in batches[1:]])
    print(
        json.dumps(
            {
                "library": args.worker,
                "step_s": statistics.median(times),
                "tokens_per_s": args.batch * args.seqlen / statistics.median(times),
                "model_mib": (built_rss - start_rss) / 2**20,
                "peak_mib": (peak - start_rss) / 2**20,
                "trainable": sum(p.numel() for p in params),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--worker", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from qpeft.models.resolve import resolve_model
    from qpeft.quant import PRESETS
    from qpeft.stages.quantize import quantize_model

    model_dir = resolve_model(None)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "nf4"
        quantize_model(model_dir, base, PRESETS["nf4"])
        for library, dequant in RUNS.items():
            argv = [sys.executable, __file__, "--worker", library, "--model-dir", model_dir, "--base", base]
            argv += ["--steps", args.steps, "--batch", args.batch, "--seqlen", args.seqlen, "--rank", args.rank]
            argv += ["--dtype", args.dtype]
            env = {**os.environ, "QPEFT_DEQUANT": dequant}
            done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(f"{library} worker failed:\n{done.stderr[-3000:]}")
            results[library] = json.loads(done.stdout.strip().splitlines()[-1])
    q, t, p = results["qpeft"], results["qpeft-torch"], results["peft"]
    print(
        f"SmolLM2-135M QLoRA (NF4 + DQ, LoRA r{args.rank} on 7 projections), batch {args.batch} x {args.seqlen}, "
        f"{args.dtype} autocast, AdamW, median of {args.steps} steps; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(f"{'':<22} {'qpeft':>10} {'qpeft-torch':>12} {'peft+bnb':>10} {'qpeft/peft':>11} {'torch/peft':>11}")
    for key, label in [
        ("step_s", "step (s)"),
        ("tokens_per_s", "tokens/s"),
        ("model_mib", "model (MiB)"),
        ("peak_mib", "peak in steps (MiB)"),
        ("trainable", "trainable params"),
    ]:
        print(
            f"{label:<22} {q[key]:>10.1f} {t[key]:>12.1f} {p[key]:>10.1f} {q[key] / p[key]:>11.3f} "
            f"{t[key] / p[key]:>11.3f}"
        )


if __name__ == "__main__":
    main()
