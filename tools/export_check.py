"""Round trips of qpeft checkpoints through every export, on real checkpoints.

    python tools/export_check.py NF4_CKPT [MIXED_CKPT ...] [--tokens 512]

For each checkpoint (e.g. `qpeft train` outputs: a QLoRA NF4 one, an LQ-LoRA mixed
one): the qpeft checkpoint reloaded gives the same logits; `hf-bnb` loaded by plain
transformers + bitsandbytes + peft, and `merged` (fp32) loaded by plain transformers,
give logits compared with qpeft's own forward (max |difference| over the max |logit|,
on `--tokens` tokens of WikiText-2 test); the re-quantization error of the mixed
configs; and each export's size on disk with the bits per parameter of the quantized
matrices it implies.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from qpeft.eval.perplexity import load_eval_text, tokenize
from qpeft.export.formats import export_checkpoint
from qpeft.io.checkpoint import read_manifest
from qpeft.models.loading import load_checkpoint


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.unsqueeze(0)).logits[0].float()


def bnb_weights_in_fp32(model, ours) -> str:
    """Replace each Linear4bit's forward by an fp32 matmul with the weight bitsandbytes
    dequantizes; return how many of those weights equal qpeft's bit for bit."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    same = total = 0
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):  # not peft's wrapper of the same name
            weight = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            qpeft_name = name.removeprefix("base_model.model.").removesuffix(".base_layer")  # inside peft
            same += int(torch.equal(weight, ours.get_submodule(qpeft_name).dequantized_weight()))
            total += 1
            module.forward = lambda x, weight=weight: torch.nn.functional.linear(x, weight)
    return f"{same}/{total} bnb weights bit-identical,"


def hf_bnb_model(hf: Path):
    """The hf-bnb export loaded with plain transformers + bitsandbytes (+ peft)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf)
    return PeftModel.from_pretrained(model, hf / "adapter") if (hf / "adapter").is_dir() else model


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def row(label: str, kind: str, path: Path, diff: float | None = None, note: str = "", bits: str = "") -> None:
        shown = "" if diff is None else f"{diff:.2e}"
        print(f"{label:<34} {kind:<8} {size(path) / 2**20:>7.1f} {bits:>11} {shown:>23}  {note}")

    print(f"{'checkpoint':<34} {'export':<8} {'MiB':>7} {'bits/param*':>11} {'max|Δlogit|/max|logit|':>23}  note")
    for ckpt in args.checkpoints:
        manifest = read_manifest(ckpt)
        params = manifest["summary"]["params"]
        ids = tokenize(AutoTokenizer.from_pretrained(ckpt), load_eval_text())[: args.tokens]
        ours = logits(load_checkpoint(ckpt), ids)
        scale = float(ours.abs().max())

        def relative(other: torch.Tensor, ours=ours, scale=scale) -> float:
            return float((other - ours).abs().max()) / scale

        label = ckpt.parent.name if ckpt.name == "model" else ckpt.name
        q_bits = f"{manifest['summary']['bits_per_param']:.3f} (Q)"
        row(label, "qpeft", ckpt, relative(logits(load_checkpoint(ckpt), ids)), "reloaded", q_bits)
        with tempfile.TemporaryDirectory() as tmp:
            hf = Path(tmp) / "hf"
            report = export_checkpoint(ckpt, "hf-bnb", hf, dtype="fp32")

            requant = report["requantized_rel_error"]
            note = "all NF4, stored as they are"
            if requant:
                note = f"{len(requant)} matrices re-quantized to NF4, rel. error up to {max(requant.values()):.4f}"
            row("", "hf-bnb", hf, relative(logits(hf_bnb_model(hf), ids)), note)
            if not requant:  # bitsandbytes' own dequantization in a plain fp32 matmul, before any forward
                model = hf_bnb_model(hf)  # (a CPU inference forward repacks bitsandbytes' weights)
                same = bnb_weights_in_fp32(model, load_checkpoint(ckpt))
                row("", "hf-bnb", hf, relative(logits(model, ids)), f"{same} with its weights in an fp32 matmul")
            merged = Path(tmp) / "merged"
            export_checkpoint(ckpt, "merged", merged, dtype="fp32")
            row("", "merged", merged, relative(logits(AutoModelForCausalLM.from_pretrained(merged), ids)), "fp32")
            merged16 = Path(tmp) / "merged16"
            export_checkpoint(ckpt, "merged", merged16, dtype="bf16")
            row("", "merged", merged16, None, "bf16 (size only)")
            if (hf / "adapter").is_dir():
                peft = Path(tmp) / "peft"
                export_checkpoint(ckpt, "peft", peft)
                row("", "peft", peft, None, "the adapter alone", f"{8 * size(peft) / params:.3f}")
    print("* checkpoint: stored bits per parameter of Q; adapter: its file's bits per quantized parameter")


if __name__ == "__main__":
    main()
