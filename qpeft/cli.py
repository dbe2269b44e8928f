"""The `qpeft` command line. User mistakes end in one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qpeft.errors import QpeftError


def _add_model_arg(parser: argparse.ArgumentParser, checkpoint: bool = False) -> None:
    what = "MODEL_OR_CHECKPOINT" if checkpoint else "MODEL"
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar=what,
        help="'smollm2' (default: the embedded SmolLM2-135M-Instruct), a .gguf file, a model directory"
        + (", or a qpeft checkpoint" if checkpoint else ""),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qpeft", description="Quantization-aware PEFT: QLoRA, LQ-LoRA, QWHA.")
    sub = parser.add_subparsers(dest="command", required=True)

    quant = sub.add_parser("quantize", help="uniformly quantize the selected linear layers (QLoRA base)")
    _add_model_arg(quant)
    quant.add_argument("--config", default="nf4", help="preset (nf4, nf3, nf2, nf8) or e.g. nf4-b64-s8x256-fp32")
    quant.add_argument("--out", required=True, type=Path, help="output checkpoint directory (must not exist)")
    quant.add_argument(
        "--targets",
        default=None,
        help="comma-separated layer name patterns (default: q,k,v,o,gate,up,down projections)",
    )
    quant.add_argument("--device", default="cpu", help="device for the quantization work (cpu, cuda)")

    ev = sub.add_parser("eval", help="perplexity (GPTQ protocol: non-overlapping windows)")
    _add_model_arg(ev, checkpoint=True)
    source = ev.add_mutually_exclusive_group()
    source.add_argument("--data", default="wikitext2", help="built-in test text (default: wikitext2)")
    source.add_argument("--text-file", default=None, help="evaluate on this UTF-8 text file instead")
    ev.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default: 2048)")
    ev.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    ev.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    return parser


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise QpeftError(f"{name} must be a positive integer, got {value}")


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise QpeftError(f"unknown device {device!r} (use cpu or cuda)") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise QpeftError(f"--device {device}: CUDA is not available on this machine")


def cmd_quantize(args: argparse.Namespace) -> None:
    from qpeft.io.atomic import ensure_absent
    from qpeft.models.resolve import resolve_model
    from qpeft.models.selection import DEFAULT_TARGETS
    from qpeft.pipeline.quantize import quantize_model
    from qpeft.quant import parse_config

    config = parse_config(args.config)
    _check_device(args.device)
    ensure_absent(args.out)  # before the slow steps, not only when writing starts
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else DEFAULT_TARGETS
    model_dir = resolve_model(args.model)
    manifest = quantize_model(model_dir, args.out, config, targets, args.device, source=args.model or "smollm2")
    summary = manifest["summary"]
    print(
        f"wrote {args.out}: {summary['matrices']} matrices, {summary['params']:,} parameters, "
        f"{config.name} = {summary['nominal_bits']:.3f} bits/param nominal, "
        f"{summary['bits_per_param']:.4f} stored (padding and offsets included)"
    )


def cmd_eval(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer

    from qpeft.eval.perplexity import count_windows, load_eval_text, perplexity, tokenize
    from qpeft.models.loading import load_model, locate
    from qpeft.quant.blockwise import TORCH_DTYPES

    _positive("--seqlen", args.seqlen)
    _positive("--max-windows", args.max_windows)
    _check_device(args.device)
    text = load_eval_text(args.data, args.text_file)
    path = locate(args.model)
    ids = tokenize(AutoTokenizer.from_pretrained(path), text)
    count_windows(ids.numel(), args.seqlen)  # fail before loading the model
    model = load_model(path, TORCH_DTYPES[args.dtype], args.device)
    result = perplexity(model, ids, args.seqlen, args.max_windows, torch.device(args.device))
    row = {
        "model": args.model or "smollm2",
        "data": args.text_file or args.data,
        "dtype": args.dtype,
        **result.as_dict(),
    }
    if args.json:
        print(json.dumps(row))
        return
    print(f"{'model':<40} {'data':<12} {'dtype':<6} {'ppl':>10} {'tokens':>9} {'windows':>8} {'seconds':>8}")
    print(
        f"{row['model'][-40:]:<40} {Path(row['data']).name[:12]:<12} {row['dtype']:<6} {row['ppl']:>10.4f} "
        f"{row['tokens']:>9} {row['windows']:>8} {row['seconds']:>8.1f}"
    )


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except QpeftError as exc:
        print(f"qpeft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qpeft {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
