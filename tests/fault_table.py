# ruff: noqa: E501  (a table: one row a line)
"""The bad-input table: each row a command line, the world it meets, and the exact
one-line error it must give, with exit 2 and nothing written.

Shared by tests/test_faults.py (every row a test) and tools/fault_table.py (the
table with what each row printed, for docs/FAULTS.md). Placeholders in a row:
{tmp} the row's own directory, {tiny} a tiny LLaMA, {ckpt} an nf4 checkpoint of it,
{recipe} a 2-step QLoRA recipe training into {tmp}/run, and the names `WORLD` makes.
A message ending in "…" is a prefix.
"""

from __future__ import annotations

import json
import shlex
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import yaml

from qpeft.data import dataset_path


@dataclass(frozen=True)
class BadInput:
    row: str  # what the row is
    argv: tuple[str, ...]
    message: str  # the error after "qpeft CMD: error: "
    defect: int | None = None  # the item of issue 17 it reproduces


def _flip_tensor_byte(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    data[8 + header + 17] ^= 0x40  # inside the first tensor's bytes
    shard.write_bytes(bytes(data))


def _copy_ckpt(ckpt: Path, target: Path) -> Path:
    shutil.copytree(ckpt, target)
    return target


def make_world(tmp: Path, tiny: Path, ckpt: Path) -> dict[str, str]:
    """The files the rows refer to, made in `tmp`; returns the placeholders."""
    (tmp / "fake.gguf").write_bytes(b"\x00\xffnot a gguf file" * 10)
    (tmp / "trunc.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + struct.pack("<Q", 2) + b"\x05")
    (tmp / "emptydir").mkdir()
    (tmp / "existing").mkdir()
    (tmp / "short.txt").write_text("a short text")
    (tmp / "empty.txt").write_text("")
    (tmp / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (tmp / "empty.jsonl").write_text("")
    (tmp / "calib.txt").write_text(dataset_path("wikitext2", "valid").read_text(encoding="utf-8")[:8000])
    (tmp / "fisher.safetensors").write_bytes(b"")
    flipped = _copy_ckpt(ckpt, tmp / "flipped")
    _flip_tensor_byte(flipped / "model-00001.safetensors")
    (_copy_ckpt(ckpt, tmp / "noshard") / "model-00001.safetensors").unlink()
    shard = _copy_ckpt(ckpt, tmp / "truncated") / "model-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (_copy_ckpt(ckpt, tmp / "nonutf8") / "qpeft_manifest.json").write_bytes(b'{"format": "qpeft\xff\xfe"}')
    (_copy_ckpt(ckpt, tmp / "listmanifest") / "qpeft_manifest.json").write_text("[1, 2, 3]")
    (_copy_ckpt(ckpt, tmp / "nomanifest") / "qpeft_manifest.json").unlink()
    (tmp / "onlymanifest").mkdir()
    shutil.copy2(ckpt / "qpeft_manifest.json", tmp / "onlymanifest")
    user = tmp / "user"
    (user / "model").mkdir(parents=True)
    (user / "log.jsonl").write_text("x\n")
    (user / "model" / "notes.txt").write_text("y\n")
    text = tmp / "train.txt"
    text.write_text(dataset_path("wikitext2", "valid").read_text(encoding="utf-8")[:12_000])
    recipe = {
        "model": str(tiny),
        "method": {"name": "qlora", "rank": 4},
        "data": {"train": str(text), "eval": str(text), "seqlen": 32, "eval_max_windows": 2},
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-2, "dtype": "fp32"},
        "output_dir": str(tmp / "run"),
    }
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return {"tmp": str(tmp), "tiny": str(tiny), "ckpt": str(ckpt), "recipe": str(tmp / "recipe.yaml")}


def _row(row: str, argv: str, message: str, defect: int | None = None) -> BadInput:
    return BadInput(row, tuple(shlex.split(argv)), message, defect)


_Q = "qpeft_manifest.json"
_NOCAL = "--no-fisher --rounding nearest"
ROWS: list[BadInput] = [
    # quantize
    _row(
        "missing model",
        "quantize /nonexistent/model --out {tmp}/o",
        "model not found: /nonexistent/model (give a model directory, a .gguf file, or 'smollm2')",
    ),
    _row("unknown config", "quantize {tiny} --config nf5 --out {tmp}/o", "unknown quantization config 'nf5'…"),
    _row(
        "GGUF block format on rows it cannot take",
        "quantize {tiny} --config q4_k --out {tmp}/o",
        "model.layers.0.self_attn.q_proj (64×64): q4_k needs rows whose length divides by 256, got 64",
    ),
    _row("existing output", "quantize {tiny} --out {tmp}/existing", "output directory already exists: {tmp}/existing"),
    _row(
        "directory that is no model",
        "quantize {tmp}/emptydir --out {tmp}/o",
        "{tmp}/emptydir: not a model directory (needs config.json and *.safetensors)",
    ),
    _row("unknown device", "quantize {tiny} --device tpu9 --out {tmp}/o", "unknown device 'tpu9' (use cpu or cuda)"),
    _row(
        "output under /proc",
        "quantize {tiny} --out /proc/x/o",
        "cannot write /proc/x/o: /proc does not take new files (No such file or directory)",
        5,
    ),
    _row(
        "output under /sys",
        "quantize {tiny} --out /sys/o",
        "cannot write /sys/o: /sys does not take new files (Operation not permitted)",
        5,
    ),
    _row(
        "empty --targets",
        "quantize {tiny} --targets '' --out {tmp}/o",
        "--targets is empty: name layers (e.g. q_proj,v_proj), or leave it out for the default set",
        10,
    ),
    _row(
        "--targets that match nothing",
        "quantize {tiny} --targets qproj --out {tmp}/o",
        "no linear layer matches the targets ['qproj'] (peft's target_modules rules: a list of names, each matching a module named so or ending with .NAME, or one regular expression of the whole name); this model's linear layers: model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj, model.layers.0.self_attn.o_proj, model.layers.0.mlp.gate_proj, model.layers.0.mlp.up_proj, model.layers.0.mlp.down_proj, model.layers.1.self_attn.q_proj, model.layers.1.self_attn.k_proj, model.layers.1.self_attn.v_proj … (15 in all)",
    ),
    _row(
        "--task whose head the checkpoint lacks",
        "quantize {tiny} --task sequence-classification --out {tmp}/o",
        "{tiny}: a sequence-classification model (LlamaForSequenceClassification) needs tensors the checkpoint lacks: score.weight (the checkpoint's own class, LlamaForCausalLM, is a causal-lm model)",
    ),
    _row(
        "--task the family has no class for",
        "quantize {tiny} --task masked-lm --out {tmp}/o",
        "{tiny}: transformers has no masked-lm class for llama (AutoModelForMaskedLM)",
    ),
    _row(
        "not a GGUF file",
        "quantize {tmp}/fake.gguf --out {tmp}/o",
        "cannot read GGUF file {tmp}/fake.gguf: not a GGUF file (it does not begin with the bytes GGUF)",
        8,
    ),
    _row(
        "truncated GGUF file",
        "quantize {tmp}/trunc.gguf --out {tmp}/o",
        "cannot read GGUF file {tmp}/trunc.gguf: the file is truncated or damaged",
        8,
    ),
    # calibrate
    _row(
        "calibrate --out not .safetensors",
        "calibrate {tiny} --out {tmp}/f.txt",
        "--out should name a .safetensors file, got {tmp}/f.txt",
    ),
    _row(
        "calibrate into /proc",
        "calibrate {tiny} --out /proc/x/f.safetensors",
        "cannot write /proc/x/f.safetensors: /proc does not take new files (No such file or directory)",
        5,
    ),
    _row(
        "calibrate --calib-seqlen 1",
        "calibrate {tiny} --out {tmp}/f.safetensors --calib-seqlen 1",
        "--calib-seqlen must be at least 2 tokens",
    ),
    _row(
        "calibrate --calib-sequences 0",
        "calibrate {tiny} --out {tmp}/f.safetensors --calib-sequences 0",
        "--calib-sequences must be a positive integer, got 0",
    ),
    _row(
        "calibrate on a missing text",
        "calibrate {tiny} --out {tmp}/f.safetensors --calib {tmp}/none.txt",
        "calibration data '{tmp}/none.txt' is neither a built-in text (wikitext2, python-docs) nor a text file",
    ),
    _row(
        "calibrate on binary text",
        "calibrate {tiny} --out {tmp}/f.safetensors --calib {tmp}/binary.txt",
        "{tmp}/binary.txt is not UTF-8 text (invalid start byte at byte 128)",
    ),
    # decompose
    _row(
        "rank above a matrix's side",
        f"decompose {{tiny}} --config nf3 --rank 40 {_NOCAL} --out {{tmp}}/o",
        "--rank 40 is too large for model.layers.0.self_attn.k_proj (32×64): a low-rank L1·L2 has rank at most 32",
        6,
    ),
    _row(
        "LQ-LoRA rank 100000",
        f"decompose {{tiny}} --budget 3 --rank 100000 {_NOCAL} --out {{tmp}}/o",
        "--rank 100000 is too large for model.layers.0.self_attn.k_proj (32×64): a low-rank L1·L2 has rank at most 32",
        6,
    ),
    _row(
        "QWHA rank 100000",
        "decompose {tiny} --method qwha --config nf3 --rank 100000 --out {tmp}/o",
        "--rank 100000 is too large for model.layers.0.self_attn.k_proj (32×64): QWHA's 9,600,000 values would exceed its 2,048 entries (rank at most 21)",
        6,
    ),
    _row(
        "budget above every config",
        f"decompose {{tiny}} --budget 9 --rank 4 --configs nf2,nf3 {_NOCAL} --out {{tmp}}/o",
        "budget 9 bits/param is more than the configs can use (at most 3.1372, every matrix at its costliest): give a budget up to 3.1372, or --config for one config everywhere",
        10,
    ),
    _row(
        "unreadable --ranks",
        f"decompose {{tiny}} --total-budget 4 --ranks 0,4x --configs nf2,nf3 {_NOCAL} --out {{tmp}}/o",
        "--ranks: cannot read '4x' as a rank: give ranks of 0 or more, comma-separated, e.g. 0,8,16",
    ),
    _row(
        "repeated --ranks",
        f"decompose {{tiny}} --total-budget 4 --ranks 2,2 --configs nf2,nf3 {_NOCAL} --out {{tmp}}/o",
        "--ranks: rank 2 is listed twice",
    ),
    _row(
        "--ranks without a total budget",
        f"decompose {{tiny}} --budget 3 --ranks 0,4 --configs nf2,nf3 {_NOCAL} --out {{tmp}}/o",
        "--ranks needs --total-budget: under --budget (bits of Q only) or --config the adapter's bits are not counted, and the largest rank would always win",
    ),
    _row(
        "unreadable total budget",
        f"decompose {{tiny}} --total-budget much --rank 4 --configs nf2,nf3 {_NOCAL} --out {{tmp}}/o",
        "cannot read the total budget 'much': give bits per parameter, e.g. 2.75 or 2.75bits",
    ),
    _row(
        "total budget below every pair",
        f"decompose {{tiny}} --total-budget 1.5 --ranks 0,4 --configs nf2,nf3 {_NOCAL} --out {{tmp}}/o",
        "total budget 1.5 bits/param is infeasible: the (config, rank) pairs allow averages from 2.1372 to 4.9149",
    ),
    _row(
        "total budget below the rank's adapter",
        f"decompose {{tiny}} --total-budget 2.1 --rank 4 --configs nf2,nf3 {_NOCAL} --out {{tmp}}/o",
        "total budget 2.1 bits/param is infeasible: the configs at rank 4 allow averages from 3.9149 to 4.9149",
    ),
    _row(
        "total budget above every pair",
        f"decompose {{tiny}} --total-budget 40 --ranks 0,4 --configs nf2,nf3 {_NOCAL} --out {{tmp}}/o",
        "total budget 40 bits/param is more than the (config, rank) pairs can use (at most 4.9149, every matrix at its costliest): give a total budget up to 4.9149, or --config for one config everywhere",
    ),
    _row(
        "--ranks too large",
        f"decompose {{tiny}} --total-budget 4 --ranks 0,4096 --configs nf2,nf3 {_NOCAL} --out {{tmp}}/o",
        "--ranks 4096 is too large for model.layers.0.self_attn.k_proj (32×64): a low-rank L1·L2 has rank at most 32",
    ),
    _row(
        "budget below every config",
        f"decompose {{tiny}} --budget 1 --rank 4 --configs nf2,nf3 {_NOCAL} --out {{tmp}}/o",
        "budget 1 bits/param is infeasible: the configs allow averages from 2.1372 to 3.1372",
    ),
    _row(
        "unreadable budget",
        "decompose {tiny} --budget lots --out {tmp}/o",
        "cannot read the budget 'lots': give bits per parameter, e.g. 2.75 or 2.75bits",
    ),
    _row(
        "--config with --configs",
        f"decompose {{tiny}} --config nf3 --configs nf3,nf4 {_NOCAL} --out {{tmp}}/o",
        "--configs lists the ILP's candidates for a budget; --config puts every matrix under one config: give one of them",
        10,
    ),
    _row(
        "decompose into /proc",
        f"decompose {{tiny}} --config nf3 --rank 4 {_NOCAL} --out /proc/x/o",
        "cannot write /proc/x/o: /proc does not take new files (No such file or directory)",
        5,
    ),
    _row("negative rank", "decompose {tiny} --config nf3 --rank -1 --out {tmp}/o", "--rank must be 0 or more, got -1"),
    _row(
        "QWHA with a Fisher",
        "decompose {tiny} --method qwha --config nf3 --no-fisher --out {tmp}/o",
        "--no-fisher is for --method lqlora only, not qwha",
    ),
    _row(
        "missing --costs",
        f"decompose {{tiny}} --budget 3 {_NOCAL} --costs {{tmp}}/none --out {{tmp}}/o",
        "--costs: {tmp}/none does not exist",
    ),
    _row(
        "kfac costs with an elementwise Fisher",
        "decompose {tiny} --budget 3 --rank 4 --cost kfac --fisher-elementwise --out {tmp}/o",
        "--fisher-elementwise prices with the diagonal Fisher: drop it, or --cost kfac",
    ),
    _row(
        "empty Fisher file",
        "decompose {tiny} --budget 3 --rank 4 --rounding nearest --fisher {tmp}/fisher.safetensors --out {tmp}/o",
        "cannot read the Fisher file {tmp}/fisher.safetensors…",
    ),
    _row(
        "decompose --targets empty",
        f"decompose {{tiny}} --config nf3 {_NOCAL} --targets '' --out {{tmp}}/o",
        "--targets is empty: name layers (e.g. q_proj,v_proj), or leave it out for the default set",
        10,
    ),
    # eval
    _row("eval --seqlen 1", "eval {tiny} --seqlen 1", "--seqlen must be at least 2 tokens, got 1", 7),
    _row(
        "eval --seqlen beyond the context",
        "eval {tiny} --seqlen 100000",
        "--seqlen 100000 is longer than the model's context (max_position_embeddings 256)",
        7,
    ),
    _row("eval --max-windows 0", "eval {tiny} --max-windows 0", "--max-windows must be a positive integer, got 0"),
    _row("eval a missing text file", "eval {tiny} --text-file {tmp}/none.txt", "text file not found: {tmp}/none.txt"),
    _row("eval a too short text", "eval {tiny} --seqlen 64 --text-file {tmp}/short.txt", "the text has …"),
    _row(
        "eval a non-UTF-8 manifest", "eval {tmp}/nonutf8", f"cannot read {{tmp}}/nonutf8/{_Q}: it is not UTF-8 JSON…", 8
    ),
    _row(
        "eval a manifest that is a list",
        "eval {tmp}/listmanifest",
        f"{{tmp}}/listmanifest/{_Q} is not a qpeft manifest",
        8,
    ),
    _row(
        "eval without the manifest",
        "eval {tmp}/nomanifest",
        f"{{tmp}}/nomanifest looks like a qpeft checkpoint without its {_Q} (removed, or never finished): it cannot be read",
        8,
    ),
    _row("eval a manifest alone", "eval {tmp}/onlymanifest", "checkpoint {tmp}/onlymanifest is missing config.json", 8),
    _row(
        "eval a flipped byte",
        "eval {tmp}/flipped --seqlen 64",
        "checkpoint {tmp}/flipped: model-00001.safetensors is corrupt: tensor…",
    ),
    # inspect
    _row(
        "inspect a flipped byte",
        "inspect {tmp}/flipped",
        "checkpoint {tmp}/flipped: model-00001.safetensors is corrupt: tensor…",
        3,
    ),
    _row(
        "inspect a missing shard",
        "inspect {tmp}/noshard",
        "checkpoint {tmp}/noshard is missing model-00001.safetensors",
        3,
    ),
    _row(
        "inspect a truncated shard",
        "inspect {tmp}/truncated",
        "checkpoint {tmp}/truncated: model-00001.safetensors cannot be read…",
        3,
    ),
    _row(
        "inspect a non-UTF-8 manifest",
        "inspect {tmp}/nonutf8",
        f"cannot read {{tmp}}/nonutf8/{_Q}: it is not UTF-8 JSON…",
        8,
    ),
    _row(
        "inspect a manifest that is a list",
        "inspect {tmp}/listmanifest",
        f"{{tmp}}/listmanifest/{_Q} is not a qpeft manifest",
        8,
    ),
    _row("inspect no checkpoint", "inspect {tmp}/emptydir", f"{{tmp}}/emptydir is not a qpeft checkpoint (no {_Q})"),
    # export
    _row(
        "export no checkpoint",
        "export {tmp}/emptydir --to merged --out {tmp}/o",
        f"{{tmp}}/emptydir is not a qpeft checkpoint (no {_Q})",
    ),
    _row(
        "export into /proc",
        "export {ckpt} --to merged --out /proc/x/o",
        "cannot write /proc/x/o: /proc does not take new files (No such file or directory)",
        5,
    ),
    _row(
        "export a flipped byte",
        "export {tmp}/flipped --to merged --out {tmp}/o",
        "checkpoint {tmp}/flipped: model-00001.safetensors is corrupt: tensor…",
    ),
    _row(
        "export an adapter-less checkpoint",
        "export {ckpt} --to peft --out {tmp}/o",
        "the checkpoint has no adapters to export",
    ),
    _row("export --rank 0", "export {ckpt} --to merged --rank 0 --out {tmp}/o", "--rank must be positive, got 0"),
    _row(
        "export to a format that cannot hold the configs",
        "export {ckpt} --to gguf --out {tmp}/o",
        "gguf cannot hold 14 of the checkpoint's matrices as they are (e.g. model.layers.0.self_attn.q_proj, "
        "nf4-b64-s8x256-fp32): pass --requantize to re-quantize them (each one's error is reported)",
    ),
    # train
    _row(
        "train into a user's directory",
        "train {recipe} --set output_dir={tmp}/user",
        "output_dir {tmp}/user is not empty and holds no qpeft training run: choose another output_dir, or pass --overwrite to replace what it holds",
        1,
    ),
    _row(
        "train on a missing data file",
        "train {recipe} --set data.train={tmp}/none.txt",
        "data file not found: {tmp}/none.txt",
        9,
    ),
    _row(
        "train on an empty .txt",
        "train {recipe} --set data.train={tmp}/empty.txt",
        "data file {tmp}/empty.txt is empty",
        8,
    ),
    _row(
        "train on binary named .txt",
        "train {recipe} --set data.train={tmp}/binary.txt",
        "data file {tmp}/binary.txt is not UTF-8 text (invalid start byte at byte 128)",
        8,
    ),
    _row(
        "train on an empty .jsonl",
        "train {recipe} --set data.train={tmp}/empty.jsonl",
        "data file {tmp}/empty.jsonl is empty",
        8,
    ),
    _row(
        "train with QLoRA rank 100000",
        "train {recipe} --set method.rank=100000",
        "recipe key method.rank 100000 is too large for model.layers.0.self_attn.k_proj (32×64): a low-rank L1·L2 has rank at most 32",
        6,
    ),
    _row(
        "train into /proc",
        "train {recipe} --set output_dir=/proc/x/run",
        "cannot write /proc/x/run: /proc does not take new files (No such file or directory)",
        5,
    ),
    _row(
        "train --resume with no run", "train {recipe} --resume", "--resume: {tmp}/run holds no qpeft training run", None
    ),
    _row(
        "train --resume --overwrite",
        "train {recipe} --resume --overwrite",
        "--resume continues the run in output_dir and --overwrite replaces it: give one of them",
    ),
    _row(
        "train with empty targets",
        "train {recipe} --set \"method.targets=''\"",
        "recipe key method.targets is empty: name layers (e.g. q_proj,v_proj), or leave it out for the default set",
        10,
    ),
    _row(
        "train with an unknown key",
        "train {recipe} --set train.lrr=1",
        "unknown recipe key train.lrr (known: steps, epochs, batch_size, grad_accum, lr, weight_decay, optimizer, schedule, warmup, max_grad_norm, dtype, gradient_checkpointing, eval_every, save_every, log_every)",
    ),
    _row(
        "train with a bad eval file",
        "train {recipe} --set data.eval={tmp}/binary.txt",
        "data file {tmp}/binary.txt is not UTF-8 text (invalid start byte at byte 128)",
        9,
    ),
]


def expand(text: str, world: dict[str, str]) -> str:
    return text.format(**world)


def snapshot(root: Path, skip: tuple[str, ...] = ("cache",)) -> dict[str, tuple[int, int]]:
    """Every file and directory under `root` with its size and mtime (the cache aside)."""
    out = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[0] in skip:
            continue
        stat = path.stat()
        out[str(relative)] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns)
    return out


def last_line(err: str) -> str:
    return err.rstrip("\n").split("\n")[-1]


def matches(line: str, expected: str) -> bool:
    return line.startswith(expected[:-1]) if expected.endswith("…") else line == expected


def as_json(rows: list[BadInput]) -> str:
    return json.dumps([r.__dict__ for r in rows], indent=1)
