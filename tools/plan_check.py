"""`qpeft plan`'s predictions against measured peaks on SmolLM2, in one run.

    python tools/plan_check.py [--batch 4] [--seqlen 512] [--qwha CKPT] [--lqlora CKPT]

Training: each base is loaded as the trainer loads it (fp32 for the unquantized
tensors, adapters trainable), a step is taken (bf16 autocast, AdamW) to create the
optimizer state, and the next step's peak of the process's malloc'd bytes, less
those before the model was loaded, is measured (`measure.peak_heap_during`, the CPU's
counterpart of CUDA's max_memory_allocated), with and without gradient checkpointing.
The process's resident set (the runtime, the allocator's retained pages) is printed
beside it, not compared. Checkpoint: the files on
disk of the same bases. Decompose: the same malloc'd-bytes peak of `qpeft decompose
--config nf4 --rank 8` (LQ-LoRA, one process, in this one) with a fresh calibration
cache, its resident peak beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from measure import heap_bytes, peak_heap_during, peak_rss_during, rss_bytes

from qpeft.models.loading import load_checkpoint
from qpeft.models.resolve import resolve_model
from qpeft.quant import PRESETS
from qpeft.stages.plan import PlanRequest, run_plan
from qpeft.stages.quantize import quantize_model
from qpeft.training.model import add_lora, freeze_all_but_adapters

MiB = 2**20


def measure_training(base: Path, qlora: bool, batch: int, seqlen: int, checkpointing: bool) -> dict[str, float]:
    before = heap_bytes()
    model = load_checkpoint(base, torch.float32, "cpu")
    if qlora:
        add_lora(model, 8, 16.0, seed=0)
    params = freeze_all_but_adapters(model)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def step() -> None:
        ids = torch.randint(0, vocab, (batch, seqlen), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # creates AdamW's moments
    heap_peak, _ = peak_heap_during(step)
    rss_peak, _ = peak_rss_during(step)
    return {"heap": heap_peak - before, "rss": rss_peak}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def decompose_heap(tmp: Path) -> tuple[int, int]:
    """(peak malloc'd bytes above the start, peak resident bytes) of a one-process
    uniform decompose in this process, with a cold calibration cache."""
    from qpeft.stages.decompose import DecomposeRequest, run_decompose

    models = Path(os.environ.get("QPEFT_CACHE", Path.home() / ".cache" / "qpeft")) / "models"
    (tmp / "cache").mkdir()
    os.symlink(models, tmp / "cache" / "models")  # the converted SmolLM2, not the statistics
    os.environ["QPEFT_CACHE"] = str(tmp / "cache")
    before = heap_bytes()
    request = DecomposeRequest(None, tmp / "dec", config="nf4", rank=8)
    rss, (heap, _) = peak_rss_during(lambda: peak_heap_during(lambda: run_decompose(request)))
    return heap - before, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--lqlora", type=Path, help="an LQ-LoRA checkpoint (--budget B --rank 8) of SmolLM2")
    parser.add_argument("--lqlora-budget", type=float, default=3.25)
    parser.add_argument("--qwha", type=Path, help="a QWHA checkpoint (--config nf3 --rank 8) of SmolLM2")
    parser.add_argument("--skip-decompose", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    runtime = rss_bytes()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        nf4 = tmp / "nf4"
        quantize_model(resolve_model(None), nf4, PRESETS["nf4"])
        cases = [("qlora nf4 r8", nf4, PlanRequest(method="qlora", config="nf4", rank=8), True)]
        if args.lqlora:
            plan = PlanRequest(method="lqlora", budget=args.lqlora_budget, rank=8)
            cases.append((f"lqlora {args.lqlora_budget} r8", args.lqlora, plan, False))
        if args.qwha:
            cases.append(("qwha nf3 r8", args.qwha, PlanRequest(method="qwha", config="nf3", rank=8), False))
        for label, base, request, qlora in [] if args.skip_training else cases:
            request.batch_size, request.seqlen, request.device = args.batch, args.seqlen, "cpu"
            predicted = run_plan(request)
            rows.append((f"{label}: checkpoint", predicted["checkpoint_bytes"], dir_bytes(base), None))
            for key, checkpointing in (("none", False), ("gradient_checkpointing", True)):
                measured = measure_training(base, qlora, args.batch, args.seqlen, checkpointing)
                name = f"{label}: train{' (grad. ckpt)' if checkpointing else ''}"
                rows.append((name, predicted["train"][key]["total"], measured["heap"], measured["rss"]))
        if not args.skip_decompose:
            predicted = run_plan(PlanRequest(method="lqlora", config="nf4", rank=8, device="cpu"))
            heap, rss = decompose_heap(tmp)
            rows.append(("decompose nf4 r8: host", predicted["decompose_host_bytes"], heap, rss))
    print(
        f"SmolLM2-135M, batch {args.batch} × {args.seqlen}, bf16 autocast, AdamW; CPU, torch {torch.__version__}; "
        f"runtime resident {runtime / MiB:.0f} MiB"
    )
    print(f"{'':<40} {'predicted MiB':>14} {'measured MiB':>13} {'pred/meas':>10} {'process RSS MiB':>16}")
    for name, predicted_bytes, measured_bytes, rss in rows:
        extra = f"{rss / MiB:>16.0f}" if rss else f"{'':>16}"
        ratio = predicted_bytes / measured_bytes
        print(f"{name:<40} {predicted_bytes / MiB:>14.1f} {measured_bytes / MiB:>13.1f} {ratio:>10.3f} {extra}")
    print(json.dumps([dict(zip(("name", "predicted", "measured", "rss"), row, strict=True)) for row in rows]))


if __name__ == "__main__":
    main()
