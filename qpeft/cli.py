"""The `qpeft` command line. User mistakes end in one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections import Counter
from pathlib import Path

from qpeft import __version__
from qpeft.errors import QpeftError

# OSErrors of the machine, not of qpeft, beside a full or read-only disk (io.atomic.disk_error): one line
NO_PERMISSION = {errno.EACCES, errno.EPERM}


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


# peft's target_modules rules (qpeft.models.selection), and each family's default
TARGETS_HELP = (
    "layer names, peft's target_modules rules: a comma-separated list of names (a module matches when its "
    "name equals one or ends with .NAME), any other value one regular expression matching the whole name, "
    "or all-linear (default: LLaMA/Mistral/Qwen the q,k,v,o,gate,up,down projections; BERT-family the "
    "encoder layers' query,key,value,dense)"
)


def _add_targets_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--targets",
        default=None,
        help=TARGETS_HELP,
    )


def _add_task_arg(parser: argparse.ArgumentParser) -> None:
    from qpeft.models.skeleton import TASKS

    parser.add_argument(
        "--task",
        choices=list(TASKS),
        default=None,
        help="the model class to build, as transformers' auto classes do (default: config.json's architectures; "
        "a head-less checkpoint, such as a BertModel's, is feature-extraction)",
    )


def _add_unquantized_arg(parser: argparse.ArgumentParser) -> None:
    from qpeft.io.checkpoint import UNQUANTIZED_DTYPES

    parser.add_argument(
        "--unquantized-dtype",
        choices=list(UNQUANTIZED_DTYPES),
        default="source",
        help="dtype of the tensors that are not quantized (embeddings, norms, lm_head): as in the source (the "
        "default, exact; fp32 for a converted GGUF), or bf16/fp16 to shrink the checkpoint",
    )


def _checkpoint_size(path: Path) -> str:
    return f"{sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file()) / 2**20:.1f} MiB"


def _add_calib_args(parser: argparse.ArgumentParser, with_source: bool = True, with_elementwise: bool = True) -> None:
    from qpeft.data.calibration import DEFAULT_SEQLEN, DEFAULT_SEQUENCES

    if with_source:
        parser.add_argument(
            "--calib",
            default="wikitext2",
            help="wikitext2 (its validation split, the default), python-docs (its calib.txt) or a UTF-8 text file",
        )
    parser.add_argument(
        "--calib-sequences", type=int, default=DEFAULT_SEQUENCES, help=f"sequences (default: {DEFAULT_SEQUENCES})"
    )
    parser.add_argument(
        "--calib-seqlen", type=int, default=DEFAULT_SEQLEN, help=f"tokens per sequence (default: {DEFAULT_SEQLEN})"
    )
    parser.add_argument("--calib-seed", type=int, default=0, help="seed of the sequence sampling (default: 0)")
    parser.add_argument(
        "--calib-batch-size", type=int, default=1, help="sequences per forward pass (default: 1, the fastest on CPU)"
    )
    parser.add_argument(
        "--calib-dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="model dtype for calibration"
    )
    if with_elementwise:
        parser.add_argument(
            "--fisher-elementwise",
            action="store_true",
            help="keep the full Fisher diagonal (4 bytes per weight) and price the LQ-LoRA cost table with it "
            "instead of its row/column reduction",
        )


def build_parser() -> argparse.ArgumentParser:
    from qpeft.methods import DEFAULT_METHOD, METHODS

    parser = argparse.ArgumentParser(prog="qpeft", description="Quantization-aware PEFT: QLoRA, LQ-LoRA, QWHA.")
    parser.add_argument("--version", action="version", version=f"qpeft {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)

    quant = sub.add_parser(
        "quantize", parents=[common], help="uniformly quantize the selected linear layers (QLoRA base)"
    )
    _add_model_arg(quant)
    quant.add_argument("--config", default="nf4", help="preset (nf4, nf3, nf2, nf8) or e.g. nf4-b64-s8x256-fp32")
    quant.add_argument("--out", required=True, type=Path, help="output checkpoint directory (must not exist)")
    _add_targets_arg(quant)
    _add_task_arg(quant)
    _add_unquantized_arg(quant)
    quant.add_argument("--device", default="cpu", help="device for the quantization work (cpu, cuda)")

    cal = sub.add_parser("calibrate", parents=[common], help="Fisher row/column statistics of the selected layers")
    _add_model_arg(cal)
    cal.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    _add_targets_arg(cal)
    _add_calib_args(cal)
    cal.add_argument("--device", default="cpu", help="device for the forward/backward passes (cpu, cuda)")

    dec = sub.add_parser(
        "decompose",
        parents=[common],
        help="W = Q + ΔW per matrix (LQ-LoRA or QWHA), configs chosen by an ILP to meet a bit budget",
        description="Split every selected matrix as W ≈ Q + ΔW, with ΔW = L1·L2 (LQ-LoRA, the default) or a "
        "sparse Walsh-Hadamard-domain adapter initialised from calibration activations (QWHA), and pick "
        "each matrix's quantization config with an integer linear program so that the average bits per "
        "parameter of Q meet the budget (or use one --config for all). Writes a qpeft checkpoint that "
        "`qpeft eval` loads.",
    )
    _add_model_arg(dec)
    dec.add_argument(
        "--method", default=DEFAULT_METHOD, help=f"decomposition: {', '.join(METHODS)} (default: {DEFAULT_METHOD})"
    )
    target = dec.add_mutually_exclusive_group(required=True)
    target.add_argument("--budget", help="average bits per parameter of Q, e.g. 2.75bits or 2.75")
    target.add_argument(
        "--total-budget",
        help="average bits per parameter of everything stored for the selected matrices: Q plus the adapter "
        "in its stored dtype (bf16), e.g. 3.25",
    )
    target.add_argument("--config", help="one config for every matrix (a preset such as nf3, or a full name)")
    ranks = dec.add_mutually_exclusive_group()
    ranks.add_argument(
        "--rank",
        type=int,
        default=None,
        help="rank of L1·L2, or for QWHA the same trainable parameter count r·(d_in + d_out); "
        "0 = no adapter (default: "
        + ", ".join(f"{plugin.default_rank} for {plugin.name}" for plugin in METHODS.values())
        + ")",
    )
    ranks.add_argument(
        "--ranks",
        default=None,
        help="with --total-budget, candidate ranks, e.g. 0,4,8,16,32,64: the ILP picks each matrix's "
        "(config, rank) pair jointly",
    )
    dec.add_argument(
        "--calib",
        default="wikitext2",
        help="calibration text (LQ-LoRA's Fisher, the layer inputs' XᵀX): wikitext2 (its validation split, "
        "the default), python-docs (its calib.txt) or a UTF-8 text file",
    )
    _add_calib_args(dec, with_source=False, with_elementwise=False)
    for plugin in METHODS.values():
        plugin.add_flags(dec.add_argument_group(f"{plugin.title} (--method {plugin.name})"))
    dec.add_argument(
        "--configs",
        default=None,
        help="with --budget, the ILP's candidate configs: 'lqlora' (the paper's 432-config grid, default) or a "
        "comma-separated list",
    )
    dec.add_argument("--out", required=True, type=Path, help="output checkpoint directory (must not exist)")
    _add_targets_arg(dec)
    _add_task_arg(dec)
    _add_unquantized_arg(dec)
    dec.add_argument("--device", default="cpu", help="device for the decomposition work (cpu, cuda)")
    dec.add_argument("--seed", type=int, default=0, help="seed of the randomized SVDs (default: 0)")
    dec.add_argument(
        "--refine",
        choices=["hull", "front"],
        default="hull",
        help="configs of each matrix whose costs are refined (LQ-LoRA) or initialised exactly (QWHA): the lower "
        "convex hull of its (bits, cost) front, where the allocation chooses (default), or the whole front",
    )
    dec.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.work")
    dec.add_argument("--costs", type=Path, default=None, help="reuse the cost table of an earlier checkpoint")

    ev = sub.add_parser("eval", parents=[common], help="perplexity (GPTQ protocol: non-overlapping windows)")
    _add_model_arg(ev, checkpoint=True)
    source = ev.add_mutually_exclusive_group()
    source.add_argument(
        "--data",
        default="wikitext2",
        help="built-in test text: wikitext2 (default) or python-docs (the Python docs' test.txt)",
    )
    source.add_argument("--text-file", default=None, help="evaluate on this UTF-8 text file instead")
    ev.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default: 2048)")
    ev.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    ev.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--json", action="store_true", help="print one JSON line instead of the table")

    exp = sub.add_parser(
        "export",
        parents=[common],
        help="write a checkpoint for transformers + bitsandbytes + peft (hf-bnb), transformers + HQQ + peft "
        "(hf-hqq), llama.cpp (gguf), merged, or as a peft adapter",
    )
    exp.add_argument("checkpoint", type=Path, help="a qpeft checkpoint directory")
    exp.add_argument(
        "--to", required=True, choices=["hf-bnb", "hf-hqq", "gguf", "merged", "peft"], help="export format"
    )
    exp.add_argument("--out", required=True, type=Path, help="output directory (must not exist)")
    exp.add_argument("--rank", type=int, default=None, help="compress adapters to this rank (LoRA-form exports)")
    exp.add_argument(
        "--requantize",
        action="store_true",
        help="re-quantize the matrices the format cannot hold as they are (hf-bnb: to NF4; hf-hqq, gguf: to the "
        "nearest integer / block format of at most their bits); each one's error is reported",
    )
    exp.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        default=None,
        help="merged weights / compute dtype (default: fp16 for hf-hqq, whose fp16 scales it keeps exact; for gguf "
        "the unquantized tensors as stored; else bf16)",
    )

    gen = sub.add_parser(
        "generate", parents=[common], help="generate text from a model or a qpeft checkpoint, streamed as decoded"
    )
    _add_model_arg(gen, checkpoint=True)
    gen.add_argument("--prompt", required=True, help="the text to continue (with --chat: the user's message)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--system", default=None, help="with --chat: a system message before the prompt")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default: 128)")
    gen.add_argument("--do-sample", action="store_true", help="sample (default: greedy decoding)")
    gen.add_argument("--temperature", type=float, default=None, help="with --do-sample (transformers' name)")
    gen.add_argument("--top-p", type=float, default=None, help="with --do-sample: nucleus mass")
    gen.add_argument("--top-k", type=int, default=None, help="with --do-sample: the k likeliest tokens")
    gen.add_argument("--repetition-penalty", type=float, default=None, help="transformers' repetition_penalty")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    gen.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: fp32 on the CPU, bf16 on CUDA"
    )
    gen.add_argument("--device", default="cpu")

    ins = sub.add_parser(
        "inspect",
        parents=[common],
        help="a qpeft checkpoint's manifest as a table, after checking every file and tensor's sha256",
    )
    ins.add_argument("checkpoint", type=Path, help="a qpeft checkpoint directory")
    ins.add_argument("--matrices", action="store_true", help="also list every matrix: shape, config, bits, adapter")
    ins.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object instead: bits_q and bits_total (the exact stored averages), ranks, configs",
    )

    tr = sub.add_parser(
        "train",
        parents=[common],
        help="fine-tune the adapters of a low-bit model (QLoRA, LQ-LoRA, QWHA) from a recipe",
        description="Train the high-precision part over the frozen packed base as a recipe says (see recipes/). "
        "Runs as one process, or under `accelerate launch` on several GPUs or CPU processes.",
    )
    tr.add_argument("recipe", type=Path, help="recipe YAML file")
    tr.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set train.lr=1e-4 (repeatable)",
    )
    tr.add_argument("--resume", action="store_true", help="continue the run saved in the recipe's output_dir")
    tr.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in output_dir, deleting what it holds (without it, a non-empty output_dir is refused)",
    )
    pl = sub.add_parser(
        "plan",
        parents=[common],
        help="predict checkpoint size and peak memory of decompose and training, from the config alone",
        description="Predict, with no weight loaded: the checkpoint's size, decompose's peak host memory, and "
        "training's peak memory (packed base, adapters and AdamW state, activations at the batch, with and "
        "without gradient checkpointing); with --device-memory, whether it fits and what to change.",
    )
    _add_model_arg(pl)
    pl.add_argument("--recipe", type=Path, default=None, help="take the method, base, rank and batch from a recipe")
    pl.add_argument("--method", choices=["qlora", "lqlora", "qwha"], default="qlora")
    how = pl.add_mutually_exclusive_group()
    how.add_argument("--config", default=None, help="one quantization config for every matrix (qlora: nf4)")
    how.add_argument("--budget", type=float, default=None, help="average bits per parameter of Q")
    how.add_argument("--total-budget", type=float, default=None, help="average bits of Q plus the adapter as stored")
    pl.add_argument("--rank", type=int, default=8, help="adapter rank (default: 8)")
    pl.add_argument("--targets", default=None, help=TARGETS_HELP)
    pl.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: 4)")
    pl.add_argument("--seqlen", type=int, default=512, help="tokens per sequence (default: 512)")
    pl.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="autocast dtype (default: bf16)")
    pl.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where training runs (default: cuda)")
    pl.add_argument("--device-memory", default=None, help="the device's memory, e.g. 24GiB: say whether it fits")
    pl.add_argument("--calib-sequences", type=int, default=32, help="decompose's calibration sequences (default: 32)")
    pl.add_argument("--calib-seqlen", type=int, default=512, help="their tokens (default: 512)")
    pl.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def _calibration(args: argparse.Namespace):
    from qpeft.stages.calibrate import CalibrationOptions

    return CalibrationOptions(
        args.calib,
        args.calib_sequences,
        args.calib_seqlen,
        args.calib_seed,
        args.calib_batch_size,
        args.calib_dtype,
        bool(getattr(args, "fisher_elementwise", False)),
    )


def _request(kind: type, args: argparse.Namespace, **given):
    """A stage's request from the parsed flags: each field from the flag of its name."""
    from dataclasses import fields

    return kind(**{f.name: getattr(args, f.name) for f in fields(kind) if f.name not in given}, **given)


def cmd_quantize(args: argparse.Namespace) -> None:
    from qpeft.stages.quantize import QuantizeRequest, run_quantize

    request = _request(QuantizeRequest, args)
    manifest = run_quantize(request)
    summary, config = manifest["summary"], next(iter(manifest["quantized"].values()))["config"]
    print(
        f"wrote {args.out} ({_checkpoint_size(args.out)}): {summary['matrices']} matrices, "
        f"{summary['params']:,} parameters, "
        f"{config} = {summary['nominal_bits']:.3f} bits/param nominal, "
        f"{summary['bits_per_param']:.4f} stored (padding and offsets included)"
    )


def cmd_calibrate(args: argparse.Namespace) -> None:
    from qpeft.stages.calibrate import CalibrateRequest, run_calibrate

    result = run_calibrate(_request(CalibrateRequest, args, calib=_calibration(args)))
    how = f"reused {result.cache_file}" if result.cache_hit else f"cached as {result.cache_file}"
    what = "row/column means and full diagonal" if result.stats.element else "row/column means"
    print(f"wrote {args.out}: Fisher {what} of {len(result.stats.row_mean)} matrices ({how})")


def _budget_text(summary: dict) -> str | None:
    """'budget 2.75' or 'total budget 3.25' of a checkpoint's summary; None if it has neither."""
    if summary.get("total_budget") is not None:
        return f"total budget {summary['total_budget']:g}"
    if summary.get("budget") is not None:
        return f"budget {summary['budget']:g}"
    return None


def cmd_decompose(args: argparse.Namespace) -> None:
    from qpeft.io.summary import format_type_table
    from qpeft.methods import foreign_flags, method_plugin
    from qpeft.stages.decompose import DecomposeRequest, run_decompose

    plugin = method_plugin(args.method)
    foreign_flags(plugin, vars(args))
    options = plugin.make_options({key: getattr(args, key) for key in plugin.flags})
    request = _request(DecomposeRequest, args, calib=_calibration(args), options=options)
    manifest = run_decompose(request)
    if manifest is None:  # a non-zero rank of a distributed run
        return
    s = manifest["summary"]
    print(format_type_table(manifest["by_type"]))
    target = _budget_text(s) or f"config {manifest['settings']['grid'][0]}"
    if len(manifest["settings"]["ranks"]) > 1:
        ranks = Counter(m.get("rank", 0) for m in manifest["quantized"].values())
        target += "; matrices per rank " + ", ".join(f"{r}: {n}" for r, n in sorted(ranks.items()))
    line = (
        f"wrote {args.out} ({_checkpoint_size(args.out)}): "
        f"{s['matrices']} matrices, Q {s['bits_per_param']:.4f} bits/param ({target}); "
        f"with the adapter ({s['adapter_params']:,} parameters, bf16) {s['bits_with_adapter']:.4f}"
    )
    if "bits_with_lowrank_nf8" in s:
        line += f", L1/L2 as NF8 {s['bits_with_lowrank_nf8']:.4f}"
    print(line + f"; heat map {args.out / 'bits_heatmap.png'}")
    if _budget_text(s) and s.get("objective") is not None and s["ilp_objective"] > 0:  # allocated by the ILP
        print(
            f"cost of the stored split {s['objective']:.6g}, "
            f"{s['objective'] / s['ilp_objective']:.4f}x the ILP's {s['ilp_objective']:.6g} (the table's prices)"
        )


def cmd_eval(args: argparse.Namespace) -> None:
    from qpeft.stages.evaluate import EvalRequest, run_eval

    row = run_eval(_request(EvalRequest, args))
    if args.json:
        print(json.dumps(row))
        return
    if row["ppl"] is None:
        print(row["note"])
        return
    print(f"{'model':<40} {'data':<12} {'dtype':<6} {'ppl':>10} {'tokens':>9} {'windows':>8} {'seconds':>8}")
    print(
        f"{row['model'][-40:]:<40} {Path(row['data']).name[:12]:<12} {row['dtype']:<6} {row['ppl']:>10.4f} "
        f"{row['tokens']:>9} {row['windows']:>8} {row['seconds']:>8.1f}"
    )


def cmd_export(args: argparse.Namespace) -> None:
    from qpeft.export.formats import REPORT_NAME
    from qpeft.stages.export import ExportRequest, run_export

    report = run_export(_request(ExportRequest, args))
    target = {
        "hf-bnb": "re-quantized to NF4",
        "hf-hqq": "re-quantized to an integer config",
        "gguf": "re-quantized to a GGUF block format",
    }.get(args.to)
    for key, label in (("requantized_rel_error", target), ("adapter_rel_error", "adapter as LoRA")):
        errors = report.get(key) or {}
        changed = {k: v for k, v in errors.items() if v > 0}
        if changed:
            worst = max(changed, key=changed.get)
            print(f"{label}: {len(changed)} matrices, relative error up to {changed[worst]:.4f} ({worst})")
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    if "hqq_bits_per_param" in report:
        print(f"HQQ layers store {report['hqq_bits_per_param']:.4f} bits per parameter (codes, fp16 scale and zero)")
    if "gguf_bits_per_param" in report:
        print(f"GGUF block formats store {report['gguf_bits_per_param']:.4f} bits per parameter of the matrices")
    print(f"wrote {args.out} ({args.to}, {size / 2**20:.1f} MiB); per-matrix errors in {args.out / REPORT_NAME}")


def cmd_generate(args: argparse.Namespace) -> None:
    from qpeft.stages.generate import GenerateRequest, run_generate

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = run_generate(_request(GenerateRequest, args), show)
    print()
    print(
        f"{result.new_tokens} new tokens after a {result.prompt_tokens}-token prompt in {result.seconds:.2f} s: "
        f"{result.tokens_per_second:.1f} tokens/s decoding, first token after {result.first_token_seconds:.2f} s",
        file=sys.stderr,
    )


def cmd_inspect(args: argparse.Namespace) -> None:
    from qpeft.io.checkpoint import is_checkpoint, read_manifest, verify_checkpoint
    from qpeft.io.summary import bit_averages, format_type_table, type_table
    from qpeft.models.skeleton import model_architecture

    if not is_checkpoint(args.checkpoint):
        raise QpeftError(f"{args.checkpoint} is not a qpeft checkpoint (no qpeft_manifest.json)")
    manifest = read_manifest(args.checkpoint)
    files, tensors = verify_checkpoint(args.checkpoint, manifest)
    if args.json:
        checked = {"checkpoint": str(args.checkpoint), "files_verified": files, "tensors_read": tensors}
        print(json.dumps(checked | bit_averages(manifest)))
        return
    s = manifest["summary"]
    base = manifest.get("base_model", {})
    size = _checkpoint_size(args.checkpoint)
    print(f"checkpoint    {args.checkpoint} (schema {manifest['schema_version']}, {size} on disk)")
    budget = _budget_text(s)
    print(f"method        {manifest.get('method')}" + (f", {budget}" if budget else ""))
    print(f"base model    {base.get('source') or base.get('path')}")
    print(f"task          {manifest.get('task', 'causal-lm')} ({model_architecture(args.checkpoint)})")
    print(f"matrices      {s['matrices']} ({s['params']:,} parameters)")
    print(f"Q bits/param  {s['bits_per_param']:.4f}")
    if "bits_with_adapter" in s:
        line = f"with adapter  {s['bits_with_adapter']:.4f} ({s['adapter_params']:,} trainable parameters, bf16)"
        if "bits_with_lowrank_nf8" in s:
            line += f"; L1/L2 as NF8 {s['bits_with_lowrank_nf8']:.4f}"
        print(line)
    if "training" in manifest:
        t = manifest["training"]
        ppl = f", eval perplexity {t['eval_ppl']:.4f}" if "eval_ppl" in t else ""
        print(f"trained       {t['step']} steps, {t['tokens']:,} tokens{ppl} (from {t.get('base')})")
    if manifest.get("checksums"):
        print(f"checksums     verified: {files} files, {tensors} tensors (sha256)")
    else:
        print(f"checksums     none (schema 1); {tensors} tensors read")
    print()
    print(format_type_table(manifest.get("by_type") or type_table(manifest["quantized"])))
    if args.matrices:
        print()
        print(f"{'matrix':<44} {'shape':>11} {'config':<22} {'bits':>7} {'adapter':>12}")
        for name, entry in manifest["quantized"].items():
            adapter = entry.get("adapter") or {}
            kind = adapter.get("kind", "-") + (f" r{entry['rank']}" if entry.get("rank") else "")
            shape = "×".join(map(str, entry["shape"]))
            print(f"{name[-44:]:<44} {shape:>11} {entry['config']:<22} {entry['bits']:>7.3f} {kind:>12}")


def cmd_train(args: argparse.Namespace) -> None:
    from qpeft.stages.train import TrainRequest, run_train

    recipe, state = run_train(_request(TrainRequest, args))
    if state["main"]:
        ppl = f", eval perplexity {state['eval_ppl']:.4f}" if "eval_ppl" in state else ""
        print(
            f"trained {recipe.output_dir}: {state['step']} steps, {state['tokens']:,} tokens in "
            f"{state['seconds']:.0f} s{ppl}; model {recipe.output_dir}/model, curve {recipe.output_dir}/loss.png"
        )


def cmd_plan(args: argparse.Namespace) -> None:
    from qpeft.stages.plan import PlanRequest, run_plan

    p = run_plan(_request(PlanRequest, args))
    if args.json:
        print(json.dumps(p))
        return

    def gib(n: float) -> str:
        return f"{n / 2**30:8.2f} GiB"

    bound = "" if p["checkpoint_exact"] else " (at most: the ILP meets the budget or less)"
    print(f"model         {p['model']}: {p['matrices']} matrices, {p['selected_params']:,} parameters")
    print(
        f"base          {p['method']}, {p['base']}, rank {p['rank']}; Q {p['bits_q']:.3f} bits/param, "
        f"with the stored adapter {p['bits_total']:.3f}"
    )
    print(f"checkpoint    {gib(p['checkpoint_bytes'])}{bound}")
    print(f"decompose     {gib(p['decompose_host_bytes'])} host peak (streaming; plus the runtime's own)")
    print(
        f"training      batch {p['batch'][0]} × {p['batch'][1]}, {p['dtype']}, {p['trainable_params']:,} trainable,"
        f" on {p['device']}"
    )
    print(f"{'':18}{'plain':>12} {'grad. ckpt':>12}")
    plain, ckpt = p["train"]["none"], p["train"]["gradient_checkpointing"]
    for key, label in (
        ("base", "packed base"),
        ("adapters_and_optimizer", "adapters+AdamW"),
        ("activations", "activations"),
        ("workspace", "workspace"),
        ("total", "total"),
    ):
        print(f"  {label:<16}{gib(plain[key]):>12} {gib(ckpt[key]):>12}")
    if p["outside_allocator_bytes"]:
        print(f"  + CUDA context ≈ {p['outside_allocator_bytes'] / 2**30:.1f} GiB outside torch's allocator")
    if "fits" in p:
        print(f"device memory {gib(p['device_memory_bytes'])}: {p['advice']}")


COMMANDS = {
    "quantize": cmd_quantize,
    "calibrate": cmd_calibrate,
    "decompose": cmd_decompose,
    "eval": cmd_eval,
    "export": cmd_export,
    "generate": cmd_generate,
    "inspect": cmd_inspect,
    "train": cmd_train,
    "plan": cmd_plan,
}


def _resumable(args: argparse.Namespace) -> bool:
    """Whether an interrupted command left finished work that --resume continues."""
    if args.command == "decompose":
        from qpeft.allocation.cost_table import work_dir_for

        return work_dir_for(args.out).is_dir()
    if args.command == "train":
        from qpeft.training.trainer import has_run

        try:
            from qpeft.training.recipe import load_recipe

            return has_run(Path(load_recipe(args.recipe, args.overrides).output_dir))
        except QpeftError:
            return False
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user's mistake (QpeftError) or a full, read-only or
    forbidden disk: one line, exit 2. Ctrl-C: one line saying what --resume can
    continue, exit 130. Anything else is a bug: one line with its type, exit 1
    (--debug: the traceback)."""
    args = build_parser().parse_args(argv)
    name = f"qpeft {args.command}"
    try:
        COMMANDS[args.command](args)
    except QpeftError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        then = (
            "run the same command with --resume to continue from what is finished"
            if _resumable(args)
            else "nothing was written"
        )
        print(f"{name}: interrupted: {then}", file=sys.stderr)
        return 130
    except OSError as exc:
        from qpeft.io.atomic import disk_error

        full = disk_error(exc)
        if args.debug or not (full or exc.errno in NO_PERMISSION):
            return _internal_error(name, args, exc)
        where = f" {exc.filename}" if exc.filename else ""
        print(f"{name}: error: {'cannot write' if full else 'cannot open'}{where}: {exc.strerror}", file=sys.stderr)
        return 2
    except Exception as exc:
        return _internal_error(name, args, exc)
    return 0


def _internal_error(name: str, args: argparse.Namespace, exc: Exception) -> int:
    if args.debug:
        raise exc
    print(
        f"{name}: internal error: {type(exc).__name__}: {_first_line(exc)} "
        "(a bug in qpeft; run again with --debug for the traceback)",
        file=sys.stderr,
    )
    return 1


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
