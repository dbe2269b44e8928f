"""qpeft's peers on the quality–memory frontier, each quantized by its own library.

Writes DIR: the model's files with every selected matrix (the seven projections of
each decoder layer) replaced by what the peer gives back, dequantized to fp32 (LoftQ:
Q + B·A merged, scaling 1), so that `qpeft eval DIR` measures it on the same tokens
as qpeft's checkpoints; and DIR/peer.json with the stored bits per parameter over
those matrices, in the peer's own accounting:

* `hqq` (PyPI hqq, data-free half-quadratic solver for scale and zero, asymmetric,
  groups of G along the input, `axis=1`): b + 32/G bits, the fp16 scale and zero of
  every group, as HQQLinear stores them (no quantized scales);
* `bnb-nf4` (bitsandbytes `quantize_4bit`, NF4, blocks of 64, double-quantized
  absmax, what transformers' BitsAndBytesConfig gives with
  bnb_4bit_use_double_quant): 4 + 8/64 + 32/(64·256) bits and one fp32 offset;
* `loftq` (peft's `loftq_init`, 4-bit: bitsandbytes NF4, blocks of 64, fp32 absmax,
  4.5 bits; B·A of rank r in bf16, 16·r·(d_in + d_out) bits per matrix).

The peers' arithmetic runs as their libraries ship it, on the CPU (peft's LoftQ moves
tensors to "cuda" unconditionally; those moves are redirected to the CPU at run time).

    python tools/peers.py hqq --nbits 3 --group-size 64 --out DIR
    python tools/peers.py bnb-nf4 --out DIR
    python tools/peers.py loftq --rank 16 --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from qpeft.io.atomic import atomic_directory
from qpeft.models.resolve import copy_model_files, resolve_model
from qpeft.models.selection import DEFAULT_TARGETS
from qpeft.models.skeleton import open_stored

PEER_FILE = "peer.json"
LORA_BITS = 16  # B, A stored in bf16, as qpeft stores its adapters

# one matrix → (what the peer gives back, fp32; Q's stored bits; the adapter's bits)
MatrixPeer = Callable[[torch.Tensor], tuple[torch.Tensor, int, int]]


def hqq_matrix(weight: torch.Tensor, nbits: int, group_size: int) -> tuple[torch.Tensor, int, int]:
    """HQQ's quantization of `weight`, scale and zero kept in fp16 as HQQLinear does."""
    from hqq.core.quantize import Quantizer

    codes, meta = Quantizer.quantize(
        weight.float(), nbits=nbits, group_size=group_size, axis=1, device="cpu", compute_dtype=torch.float16
    )
    meta = {**meta, "scale": meta["scale"].half().float(), "zero": meta["zero"].half().float()}
    meta["compute_dtype"] = torch.float32
    groups = weight.numel() // group_size
    return Quantizer.dequantize(codes, meta).float(), weight.numel() * nbits + groups * 2 * 16, 0


def bnb_nf4_matrix(weight: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """bitsandbytes NF4 with double quantization (blocks of 64, absmax as uint8 in
    blocks of 256 with fp32 scales, and one fp32 offset)."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.float(), blocksize=64, compress_statistics=True, quant_type="nf4")
    blocks = math.ceil(weight.numel() / 64)
    bits = weight.numel() * 4 + blocks * 8 + math.ceil(blocks / 256) * 32 + 32
    return bnbf.dequantize_4bit(packed, state).float(), bits, 0


@contextlib.contextmanager
def cuda_moves_go_to_cpu() -> Iterator[None]:
    """Make `.to("cuda")` (tensors and bitsandbytes' Params4bit) a move to the CPU."""
    import bitsandbytes as bnb

    def redirect(original: Callable) -> Callable:
        def to(self, *args, **kwargs):
            args = tuple("cpu" if isinstance(a, str) and a.startswith("cuda") else a for a in args)
            if isinstance(kwargs.get("device"), str) and kwargs["device"].startswith("cuda"):
                kwargs["device"] = "cpu"
            return original(self, *args, **kwargs)

        return to

    with (
        mock.patch.object(torch.Tensor, "to", redirect(torch.Tensor.to)),
        mock.patch.object(bnb.nn.Params4bit, "to", redirect(bnb.nn.Params4bit.to)),
        mock.patch("peft.utils.loftq_utils.clear_device_cache", lambda *a, **k: None),
    ):
        yield


def loftq_matrix(weight: torch.Tensor, rank: int, iters: int) -> tuple[torch.Tensor, int, int]:
    """peft's LoftQ initialisation (4-bit): Q + B·A with scaling 1."""
    from peft.utils.loftq_utils import loftq_init

    with cuda_moves_go_to_cpu():
        dequantized, lora_a, lora_b = loftq_init(weight.float(), num_bits=4, reduced_rank=rank, num_iter=iters)
    rows, cols = weight.shape
    q_bits = weight.numel() * 4 + math.ceil(weight.numel() / 64) * 32
    return dequantized.float() + lora_b.float() @ lora_a.float(), q_bits, LORA_BITS * rank * (rows + cols)


def write_peer(model_dir: Path, out: Path, peer: MatrixPeer, label: str) -> dict:
    """Write the peer's model to `out` (atomically) and return its peer.json."""
    model = open_stored(model_dir)  # the tensors under the model class's names
    weights = model.weights
    selected = {f"{name}.weight" for name in model.linear(DEFAULT_TARGETS)}
    tensors, numel, q_bits, adapter_bits = {}, 0, 0, 0
    for key, tensor in tqdm(weights.items(), total=len(weights.weight_map), desc=label, unit="tensor"):
        if key in selected:
            approx, q, adapter = peer(tensor.float())
            tensor = approx.contiguous()
            numel, q_bits, adapter_bits = numel + tensor.numel(), q_bits + q, adapter_bits + adapter
        tensors[key] = tensor.contiguous()
    record = {
        "peer": label,
        "matrices": len(selected),
        "parameters": numel,
        "bits_q": q_bits / numel,
        "bits_total": (q_bits + adapter_bits) / numel,
    }
    with atomic_directory(out) as tmp:
        copy_model_files(model_dir, tmp)
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / PEER_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer", choices=["hqq", "bnb-nf4", "loftq"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None, help="a model directory (default: the embedded SmolLM2)")
    parser.add_argument("--nbits", type=int, default=4, help="hqq: code bits (2, 3, 4, 8)")
    parser.add_argument("--group-size", type=int, default=64, help="hqq: weights per scale and zero")
    parser.add_argument("--rank", type=int, default=16, help="loftq: rank of B·A")
    parser.add_argument("--loftq-iters", type=int, default=1, help="loftq: alternating steps (peft's default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args.out.exists():
        raise SystemExit(f"{args.out} exists")
    if args.peer == "hqq":
        label = f"hqq {args.nbits}-bit g{args.group_size}"
        peer: MatrixPeer = lambda w: hqq_matrix(w, args.nbits, args.group_size)  # noqa: E731
    elif args.peer == "bnb-nf4":
        label, peer = "bitsandbytes nf4", bnb_nf4_matrix
    else:
        label = f"loftq 4-bit r{args.rank}"
        peer = lambda w: loftq_matrix(w, args.rank, args.loftq_iters)  # noqa: E731
    record = write_peer(resolve_model(args.model), args.out, peer, label)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
