"""Reconstruction error at equal bits: qpeft's LQ-LoRA split vs peft's LoftQ.

Over the selected matrices of a model (default: the embedded SmolLM2), prints for
each method the bits of Q, the bits with the low-rank factors in bf16, the relative
error sqrt(Σ‖W − Ŵ‖² / Σ‖W‖²) and the same with Fisher weights F̂ (the row × column
reduction of the empirical Fisher, as `qpeft decompose` uses).

peft's `loftq_init` (4-bit: bitsandbytes NF4, blocks of 64, fp32 absmax = qpeft's
nf4-b64-fp32, 4.5 bits) moves the weight to "cuda" unconditionally; this script
redirects those moves to the CPU at run time, leaving peft's arithmetic as it is.

    python tools/compare_loftq.py --rank 64 --layer-stride 3
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
from peers import cuda_moves_go_to_cpu  # tools/peers.py, beside this script

from qpeft.allocation.costs import element_weights
from qpeft.calibration.cache import calibrate
from qpeft.methods.lqlora.alternation import lq_decompose
from qpeft.models.resolve import resolve_model
from qpeft.models.selection import DEFAULT_TARGETS, select_linear
from qpeft.models.skeleton import build_skeleton
from qpeft.models.weights import SafetensorsWeights
from qpeft.quant import dequantize, parse_config, simulate, storage_bits


def loftq(weight: torch.Tensor, rank: int, iters: int) -> torch.Tensor:
    from peft.utils.loftq_utils import loftq_init

    with cuda_moves_go_to_cpu():
        dequantized, lora_a, lora_b = loftq_init(weight, num_bits=4, reduced_rank=rank, num_iter=iters)
    return dequantized.float() + lora_b.float() @ lora_a.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--layer-stride", type=int, default=1, help="use every k-th decoder layer")
    parser.add_argument("--loftq-iters", type=int, default=5)
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    names = select_linear(build_skeleton(model_dir), DEFAULT_TARGETS)
    names = [n for n in names if int(n.split(".")[2]) % args.layer_stride == 0]
    fisher, _, _ = calibrate(model_dir, DEFAULT_TARGETS)  # the decompose defaults (cached)
    nf4_dq, nf4_fp32 = parse_config("nf4"), parse_config("nf4-b64-fp32")
    rank = args.rank

    def lq(config, weighted):
        def run(w, r, c):
            result = lq_decompose(w, config, rank, r if weighted else None, c if weighted else None)
            # L1, L2 as a checkpoint stores them (bf16)
            return dequantize(result.quantized) + result.left.bfloat16().float() @ result.right.bfloat16().float()

        return run

    methods: list[tuple[str, object, int, Callable]] = [
        ("nf4 (QLoRA, no low-rank)", nf4_dq, 0, lambda w, r, c: simulate(w, nf4_dq)),
        ("nf4-b64-fp32 (no low-rank)", nf4_fp32, 0, lambda w, r, c: simulate(w, nf4_fp32)),
        ("peft LoftQ, 1 iter", nf4_fp32, rank, lambda w, r, c: loftq(w, rank, 1)),
        (f"peft LoftQ, {args.loftq_iters} iters", nf4_fp32, rank, lambda w, r, c: loftq(w, rank, args.loftq_iters)),
        ("qpeft LQ-LoRA nf4-b64-fp32", nf4_fp32, rank, lq(nf4_fp32, False)),
        ("qpeft LQ-LoRA nf4-b64-fp32 + Fisher", nf4_fp32, rank, lq(nf4_fp32, True)),
        ("qpeft LQ-LoRA nf4", nf4_dq, rank, lq(nf4_dq, False)),
        ("qpeft LQ-LoRA nf4 + Fisher", nf4_dq, rank, lq(nf4_dq, True)),
    ]
    sums = {m[0]: [0.0, 0.0] for m in methods}
    seconds = dict.fromkeys(sums, 0.0)
    norm = norm_f = 0.0
    bits = {m[0]: [0, 0] for m in methods}
    selected = {f"{n}.weight": n for n in names}
    for key, tensor in SafetensorsWeights(model_dir).items():
        if key not in selected:
            continue
        w = tensor.float()
        r, c = fisher.weights(selected[key])
        weights = element_weights(tuple(w.shape), r, c)
        norm += float(w.square().sum())
        norm_f += float((w.square() * weights).sum())
        for label, config, method_rank, fn in methods:
            start = time.perf_counter()
            recon = fn(w, r, c)
            seconds[label] += time.perf_counter() - start
            diff = (w - recon).square()
            sums[label][0] += float(diff.sum())
            sums[label][1] += float((diff * weights).sum())
            q_bits = storage_bits(config, w.numel())
            bits[label][0] += q_bits
            bits[label][1] += q_bits + 16 * method_rank * (w.shape[0] + w.shape[1])
    skeleton = build_skeleton(model_dir)
    numel = sum(skeleton.get_submodule(n).weight.numel() for n in names)
    print(
        f"{len(names)} matrices of {model_dir.name}, rank {rank}; F̂ from {fisher.metadata.get('sequences')} sequences"
    )
    columns = f"{'Q bits':>6} {'+LR bf16':>9} {'rel err':>9} {'F-rel err':>10} {'err²/LoftQ':>10} {'seconds':>8}"
    print(f"{'method':<36} {columns}")
    reference = sums[f"peft LoftQ, {args.loftq_iters} iters"]
    for label, _, _, _ in methods:
        rel, rel_f = math.sqrt(sums[label][0] / norm), math.sqrt(sums[label][1] / norm_f)
        ratio = sums[label][0] / reference[0]
        print(
            f"{label:<36} {bits[label][0] / numel:>6.3f} {bits[label][1] / numel:>9.3f} {rel:>9.5f} {rel_f:>10.5f} "
            f"{ratio:>10.3f} {seconds[label]:>8.1f}"
        )


if __name__ == "__main__":
    main()
