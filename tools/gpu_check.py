"""The prepared device check for a lent GPU: every CUDA path of qpeft, measured and
checked against a reference, in one command of at most ten minutes (issue 21).

Here (CPU, with the package registries), once before the call:

    python tools/gpu_check.py --prepare .gpu

writes `.gpu/wheels` (bitsandbytes, pulp, gguf for the device's Python 3.12) and
`.gpu/smollm2` (SmolLM2-135M's config and tokenizer, no weights: its 94 MiB GGUF does
not fit the 64 MiB that travels), and prints the device command:

    python3 tools/gpu_check.py --carried .gpu --out $OUT        (carry: [".gpu"])

On CPU, in the default test suite, the same code paths at tiny shapes (the Triton
kernel in its interpreter, fp32):

    python tools/gpu_check.py --cpu-smoke --out DIR

Sections, each timed after warm-up, each result checked (a failed check is a row
with ok false, not a stopped run):
1. tests     `pytest -m cuda` (tests/test_cuda.py and every other CUDA-marked test).
2. matmul    the frozen base's two products (x·deq(Q)ᵀ forward, g·deq(Q) backward)
             on LLaMA-2-7B/70B shapes at 4096 tokens in bf16: qpeft's Triton kernel,
             qpeft's dequantize + matmul, bitsandbytes' matmul_4bit (NF4) and a plain
             bf16 matmul (the ceiling), for NF and integer configs; the dequantizer's
             bandwidth against a device-to-device copy measured in the same run.
3. train     a training step (bf16 autocast, AdamW, batch 4 × 512) of the SmolLM2
             recipes' bases (QLoRA nf4 r8, LQ-LoRA 2.75 bits r8 over a 5-config grid,
             QWHA nf3 r8), built on the GPU, on a model of SmolLM2-135M's config with
             random weights, against peft + bitsandbytes QLoRA of the same model and
             batch: step time, tokens/s, peak GPU memory, as ratios; the two QLoRAs'
             first losses must agree.
4. pipeline  a two-layer model of LLaMA-2-7B widths (random weights, SmolLM2's
             tokenizer) through decompose (LQ-LoRA, 2.75 bits, the 5-config grid) →
             train 2 steps → eval, on the GPU.
5. costs     one LLaMA-2-7B attention (4096×4096) and MLP (11008×4096) matrix's
             LQ-LoRA cost-table row over the full 432-config grid at rank 64, the
             projected 224-matrix time, and QWHA's init of one 4096×14336 matrix
             (last: its time is the open question).

Sections not begun by --deadline (420 s) are skipped. Writes gpu_check.json and
gpu_check.md under --out after every section, and prints the table last.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from measure import timed

REPO = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/qpeft-site")
WHEELS = ["bitsandbytes", "pulp", "gguf"]  # missing on the GPU machine (its README)
TOKENIZER_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]
LLAMA2_7B = {  # LLaMA-2-7B's config, but two layers (the vocabulary is the tokenizer's)
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "num_hidden_layers": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
TINY = {  # the CPU smoke's model
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "max_position_embeddings": 512,
}
SMALL_GRID = "nf2-b64-s8x256-fp16,nf3-b64-s8x256-fp16,nf3-b32-s4x64-fp16,nf4-b64-s8x256-fp16,nf8-b64-s8x256-fp32"


@dataclass
class Scale:
    """The sizes of one run: the GPU's (LLaMA widths) or the CPU smoke's (tiny)."""

    device: str
    dtype: str  # the products' dtype: bf16 on the GPU, fp32 in Triton's interpreter
    matmul_shapes: list[tuple[int, int]]  # (d_out, d_in)
    tokens: int
    configs: list[str]
    repeats: int
    train_model: dict[str, Any] | None  # overrides of SmolLM2's config (None: as is)
    batch: tuple[int, int]  # sequences × tokens
    steps: int
    cost_shapes: list[tuple[int, int]]
    cost_rank: int
    cost_grid: str
    qwha_shape: tuple[int, int]
    qwha_rank: int
    pipeline_model: dict[str, Any]
    calib: tuple[int, int]  # sequences × tokens of the decompositions' calibration


GPU = Scale(
    device="cuda",
    dtype="bf16",
    matmul_shapes=[(4096, 4096), (11008, 4096), (4096, 11008), (8192, 28672)],
    tokens=4096,
    configs=["nf4", "nf3", "nf2", "nf8", "int4-g128", "int3-g128", "int2-g64"],
    repeats=20,
    train_model=None,
    batch=(4, 512),
    steps=5,
    cost_shapes=[(4096, 4096), (11008, 4096)],
    cost_rank=64,
    cost_grid="lqlora",
    qwha_shape=(4096, 14336),
    qwha_rank=64,
    pipeline_model=LLAMA2_7B,
    calib=(16, 512),
)
SMOKE = Scale(
    device="cpu",
    dtype="fp32",
    matmul_shapes=[(96, 64), (64, 160)],
    tokens=16,
    configs=["nf4", "nf3", "int4-g32"],
    repeats=2,
    train_model=TINY,
    batch=(2, 32),
    steps=2,
    cost_shapes=[(64, 64), (128, 64)],
    cost_rank=4,
    cost_grid=SMALL_GRID,
    qwha_shape=(64, 128),
    qwha_rank=4,
    pipeline_model=TINY,
    calib=(2, 32),
)


@dataclass
class Context:
    scale: Scale
    out: Path
    work: Path
    tokenizer_dir: Path  # SmolLM2's config and tokenizer
    env: dict[str, str]  # for child processes (the carried wheels on PYTHONPATH)
    rows: list[dict[str, Any]] = field(default_factory=list)
    ceilings: dict[str, float] = field(default_factory=dict)

    def add(self, section: str, name: str, ok: bool, **figures: Any) -> None:
        row = {"section": section, "name": name, "ok": bool(ok), **figures}
        self.rows.append(row)
        print(json.dumps(row), flush=True)


# ---------------------------------------------------------------- timing helpers


def median_seconds(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 2) -> float:
    """Median of `repeats` calls after `warmup`, each bracketed by a CUDA sync."""
    return timed(fn, repeats, device, warmup)[0]


def relative_error(got, ref) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def peak_memory(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_peak(device: str) -> None:
    """Drop what earlier sections left (a model in a reference cycle lingers after
    `del` until collected) and restart the peak."""
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


# ---------------------------------------------------------------- models


def save_random_llama(path: Path, tokenizer_dir: Path, overrides: dict[str, Any] | None, seed: int = 0) -> Path:
    """A LLaMA of SmolLM2's config with `overrides`, random weights (std 0.02), and
    SmolLM2's tokenizer, saved as a transformers directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if path.exists():
        return path
    body = json.loads((tokenizer_dir / "config.json").read_text())
    config = LlamaConfig(**{**body, **(overrides or {})})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    tmp.rename(path)
    return path


# ---------------------------------------------------------------- 0. ceilings


def measure_ceilings(ctx: Context) -> None:
    """Device-to-device copy bandwidth (bytes read + written) and a large bf16
    matmul's rate, on random data: the ceilings the other figures are read against."""
    import torch

    device = ctx.scale.device
    n = 2**28 if device == "cuda" else 2**22  # 1 GiB of fp32 on the GPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, 10)
    ctx.ceilings["copy_GBps"] = 2 * src.numel() * 4 / seconds / 1e9
    size = 8192 if device == "cuda" else 256
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, device, 10)
    ctx.ceilings["matmul_TFLOPs"] = 2 * size**3 / seconds / 1e12
    ctx.add("ceilings", "copy and matmul", True, **{k: round(v, 2) for k, v in ctx.ceilings.items()})


# ---------------------------------------------------------------- 1. tests


def check_tests(ctx: Context) -> None:
    # the files holding CUDA-marked tests only: collecting the others would import the
    # peers (hqq, ...) the GPU machine lacks, and one collection error stops the run
    files = sorted(p for p in (REPO / "tests").glob("test_*.py") if "mark.cuda" in p.read_text())
    argv = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *map(str, files)]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, env=ctx.env, capture_output=True, text=True)
    (ctx.out / "pytest_cuda.log").write_text(done.stdout + done.stderr)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {word: int(n) for n, word in (p.split()[:2] for p in summary.strip("= ").split(", ") if p[:1].isdigit())}
    # exit code 5: nothing collected (no GPU: every cuda test skipped counts as ran none)
    ok = done.returncode == 0 or (ctx.scale.device == "cpu" and done.returncode in (0, 5))
    ctx.add("tests", "pytest -m cuda", ok, seconds=round(time.perf_counter() - start, 1), **counts)


# ---------------------------------------------------------------- 2. matmul


def _bnb_nf4(weight):
    """bitsandbytes' NF4 (double-quantized) weight and its matmul, or None without it."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf
    except ImportError:
        return None
    packed, state = bf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    return lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=state)


def check_matmul(ctx: Context) -> None:
    """Forward y = x·deq(Q)ᵀ and the input gradient g·deq(Q), each path against the
    fp32 product of the dequantized weight."""
    for d_out, d_in in ctx.scale.matmul_shapes:
        _matmul_shape(ctx, d_out, d_in)


def _matmul_shape(ctx: Context, d_out: int, d_in: int) -> None:
    import torch

    from qpeft import kernels
    from qpeft.kernels.triton_dequant import dequant_matmul
    from qpeft.quant import PRESETS, parse_config, quantize

    s = ctx.scale
    device, dtype = s.device, torch_dtype(s.dtype)
    tol = 2e-2 if s.dtype == "bf16" else 1e-4
    generator = torch.Generator(device).manual_seed(d_out * 7 + d_in)
    weight = (torch.randn(d_out, d_in, device=device, generator=generator) * 0.02).to(dtype)
    x = torch.randn(s.tokens, d_in, device=device, generator=generator).to(dtype)
    g = torch.randn(s.tokens, d_out, device=device, generator=generator).to(dtype)
    flops = 2 * s.tokens * d_out * d_in

    def record(path: str, config: str, forward, backward, w_ref) -> None:
        errors = [relative_error(forward(), x.float() @ w_ref.T), relative_error(backward(), g.float() @ w_ref)]
        t_f = median_seconds(forward, device, s.repeats)
        t_b = median_seconds(backward, device, s.repeats)
        ctx.add(
            "matmul",
            f"{d_out}x{d_in} {config} {path}",
            max(errors) < tol,
            forward_ms=round(t_f * 1e3, 4),
            backward_ms=round(t_b * 1e3, 4),
            forward_TFLOPs=round(flops / t_f / 1e12, 3),
            rel_error=float(f"{max(errors):.3g}"),
        )

    record(f"{s.dtype} matmul", "-", lambda: x @ weight.T, lambda: g @ weight, weight.float())
    for name in s.configs:
        qt = quantize(weight, parse_config(name))
        w_ref = kernels.dequantize(qt, torch.float32).to(dtype).float()
        record("triton", name, lambda qt=qt: dequant_matmul(x, qt), lambda qt=qt: dequant_matmul(g, qt, True), w_ref)
        record(
            "torch dequant+matmul",
            name,
            lambda qt=qt: x @ kernels.dequantize(qt, dtype).T,
            lambda qt=qt: g @ kernels.dequantize(qt, dtype),
            w_ref,
        )
        seconds = median_seconds(lambda qt=qt: kernels.dequantize(qt, dtype), device, s.repeats)
        moved = sum(p.numel() * p.element_size() for p in qt.parts.values()) + d_out * d_in * dtype.itemsize
        ctx.add(
            "dequant",
            f"{d_out}x{d_in} {name}",
            True,
            ms=round(seconds * 1e3, 4),
            GBps=round(moved / seconds / 1e9, 1),
            of_copy=round(moved / seconds / 1e9 / ctx.ceilings["copy_GBps"], 3),
        )
    bnb = _bnb_nf4(weight) if device == "cuda" else None
    if bnb is None:
        return
    # bitsandbytes' NF4 with double quantization is qpeft's nf4 preset, bit for bit
    w_ref = kernels.dequantize(quantize(weight, PRESETS["nf4"]), torch.float32).to(dtype).float()
    xg = x.clone().requires_grad_(True)

    def backward() -> Any:  # through autograd: a forward, then the input gradient g·W
        xg.grad = None
        bnb(xg).backward(g)
        return xg.grad

    record("bitsandbytes matmul_4bit", "nf4", lambda: bnb(x), backward, w_ref)


# ---------------------------------------------------------------- 3. train


def _step_timer(model, params, device: str, batch: tuple[int, int], steps: int, vocab: int) -> dict[str, Any]:
    """Median step time (bf16 autocast forward, backward, clip, AdamW) over `steps`
    after two warm-up steps, the first step's loss, and the peak memory of the steps."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, batch, generator=generator).to(device) for _ in range(steps + 2)]
    losses: list[float] = []

    def step(ids) -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))

    step(batches[0])
    first = losses[0]
    step(batches[1])
    reset_peak(device)
    seconds = [timed(lambda ids=ids: step(ids), 1, device)[0] for ids in batches[2:]]
    median = statistics.median(seconds)
    return {
        "step_s": median,
        "tokens_per_s": batch[0] * batch[1] / median,
        "peak_GiB": peak_memory(device),
        "first_loss": first,
        "finite": all(math.isfinite(v) for v in losses),
    }


def check_train(ctx: Context) -> None:
    import torch

    from qpeft.models.loading import load_checkpoint
    from qpeft.stages.calibrate import CalibrationOptions
    from qpeft.stages.decompose import DecomposeRequest, run_decompose
    from qpeft.stages.quantize import QuantizeRequest, run_quantize
    from qpeft.training.model import add_lora, freeze_all_but_adapters

    s, device = ctx.scale, ctx.scale.device
    model_dir = save_random_llama(ctx.work / "smollm2-shaped", ctx.tokenizer_dir, s.train_model)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    calib = CalibrationOptions(sequences=s.calib[0], seqlen=s.calib[1])
    bases = {
        "qlora nf4 r8": lambda out: run_quantize(QuantizeRequest(str(model_dir), out, "nf4", device=device)),
        "qwha nf3 r8": lambda out: run_decompose(
            DecomposeRequest(str(model_dir), out, method="qwha", config="nf3", rank=8, calib=calib, device=device)
        ),
        "lqlora 2.75 r8": lambda out: run_decompose(
            DecomposeRequest(str(model_dir), out, budget=2.75, rank=8, calib=calib, configs=SMALL_GRID, device=device)
        ),
    }
    # peft first, then each base's row as soon as it is timed: a run stopped at its
    # limit keeps what it measured
    peft = None
    try:
        sys.path.insert(0, str(REPO / "tools"))
        from bench_train import build_peft

        model, params = build_peft(model_dir, None, 8, 16.0, torch.bfloat16, device_map=device)
        model.train()
        peft = _step_timer(model, params, device, s.batch, s.steps, vocab)
        del model
        ctx.add("train", "peft + bitsandbytes qlora nf4 r8", peft["finite"], **_rounded(peft))
    except Exception as exc:  # bitsandbytes' CUDA kernels missing or failing: say so, keep going
        ctx.add("train", "peft + bitsandbytes qlora nf4 r8", False, error=f"{type(exc).__name__}: {exc}"[:300])
    for label, build in bases.items():
        out = ctx.work / label.replace(" ", "-")
        start = time.perf_counter()
        if not out.exists():
            build(out)
        built = time.perf_counter() - start
        model = load_checkpoint(out, torch.float32, device)
        if label.startswith("qlora"):
            add_lora(model, 8, 16.0, seed=0)
        model.train()
        row = {**_step_timer(model, freeze_all_but_adapters(model), device, s.batch, s.steps, vocab), "base_s": built}
        del model
        ratios = {}
        if peft is not None:
            ratios = {
                "step_vs_peft": round(row["step_s"] / peft["step_s"], 3),
                "peak_vs_peft": None if row["peak_GiB"] is None else round(row["peak_GiB"] / peft["peak_GiB"], 3),
            }
        ok = row["finite"]
        if peft is not None and label.startswith("qlora"):
            # same NF4 codes, a LoRA that starts at zero: the same first loss
            ratios["first_loss_vs_peft"] = round(row["first_loss"] / peft["first_loss"], 5)
            ok = ok and abs(ratios["first_loss_vs_peft"] - 1) < 1e-2
        ctx.add("train", label, ok, **_rounded(row), **ratios)


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in row.items()}


# ---------------------------------------------------------------- 4. costs


def check_costs(ctx: Context) -> None:
    import torch

    from qpeft.methods.lqlora.pricing import matrix_costs
    from qpeft.methods.qwha.solver import parameter_count, qwha_init
    from qpeft.quant import dequantize, parse_config, parse_grid, quantize
    from qpeft.transforms.hadamard import walsh_hadamard

    s, device = ctx.scale, ctx.scale.device
    grid = parse_grid(s.cost_grid)
    generator = torch.Generator(device).manual_seed(0)
    seconds: dict[tuple[int, int], float] = {}
    for shape in s.cost_shapes:
        weight = torch.randn(*shape, device=device, generator=generator) * 0.02
        rows = torch.rand(shape[0], device=device, generator=generator) + 0.5
        cols = torch.rand(shape[1], device=device, generator=generator) + 0.5
        row = functools.partial(matrix_costs, weight, grid, s.cost_rank, rows, cols)
        seconds[shape], costs = timed(row, 1, device)
        ok = bool((costs > 0).all() and len(costs) == len(grid))
        ctx.add(
            "costs",
            f"lqlora row {shape[0]}x{shape[1]} r{s.cost_rank}",
            ok,
            configs=len(grid),
            s=round(seconds[shape], 3),
        )
    # LLaMA-2-7B: 32 layers of 4 attention matrices and 3 MLP ones (down_proj priced as gate's)
    attention, mlp = seconds[s.cost_shapes[0]], seconds[s.cost_shapes[1]]
    ctx.add("costs", "projected 224-matrix table", True, s=round(32 * (4 * attention + 3 * mlp), 1))

    d_out, d_in = s.qwha_shape
    weight = torch.randn(d_out, d_in, device=device, generator=generator) * 0.02
    acts = torch.randn(4 * d_in, d_in, device=device, generator=generator)
    gram = acts.T @ acts / acts.shape[0]
    error = weight - dequantize(quantize(weight, parse_config("nf3")))
    count = parameter_count(s.qwha_rank, (d_out, d_in))

    def transform_and_init():
        transform = walsh_hadamard(d_in)
        return transform, qwha_init(error, gram, count, transform=transform)

    took, (transform, init) = timed(transform_and_init, 1, device)
    before = (error @ acts.T).norm()
    after = ((error - init.spectrum.delta_weight(transform)) @ acts.T).norm()
    ctx.add(
        "costs",
        f"qwha init {d_out}x{d_in} nf3 ({count} values)",
        bool(after < before),
        s=round(took, 3),
        output_error_ratio=round(float(after / before), 4),
    )


# ---------------------------------------------------------------- 5. pipeline


def check_pipeline(ctx: Context) -> None:
    """decompose → train 2 steps → eval, the stages' library calls on the device."""
    from qpeft.stages.calibrate import CalibrationOptions
    from qpeft.stages.decompose import DecomposeRequest, run_decompose
    from qpeft.stages.evaluate import EvalRequest, run_eval
    from qpeft.stages.train import TrainRequest, run_train

    s, device = ctx.scale, ctx.scale.device
    model_dir = save_random_llama(ctx.work / "llama2-7b-widths", ctx.tokenizer_dir, s.pipeline_model)
    base = ctx.work / "pipeline-base"
    start = time.perf_counter()
    if not base.exists():
        calib = CalibrationOptions(sequences=s.calib[0], seqlen=s.calib[1])
        request = DecomposeRequest(
            str(model_dir), base, budget=2.75, rank=8, calib=calib, configs=SMALL_GRID, device=device
        )
        run_decompose(request)
    ctx.add("pipeline", "decompose lqlora 2.75 r8", True, s=round(time.perf_counter() - start, 1))

    recipe = ctx.work / "pipeline.yaml"
    seqlen = s.batch[1]
    recipe.write_text(
        json.dumps(  # JSON is YAML
            {
                "model": str(model_dir),
                "method": {"name": "checkpoint", "checkpoint": str(base)},
                "data": {"train": "wikitext2", "eval": None, "seqlen": seqlen},
                "train": {"steps": 2, "batch_size": s.batch[0], "dtype": "bf16" if device == "cuda" else "fp32"},
                "output_dir": str(ctx.work / "pipeline-train"),
            }
        )
    )
    start = time.perf_counter()
    _, state = run_train(TrainRequest(recipe, overwrite=True), progress=False)
    ctx.add("pipeline", "train 2 steps", state["step"] == 2, s=round(time.perf_counter() - start, 1))
    start = time.perf_counter()
    result = run_eval(
        EvalRequest(str(ctx.work / "pipeline-train" / "model"), seqlen=seqlen, max_windows=2, device=device)
    )
    ok = math.isfinite(result["ppl"]) and result["windows"] == 2
    ctx.add("pipeline", "eval 2 windows", ok, s=round(time.perf_counter() - start, 1), ppl=round(result["ppl"], 1))


# run in this order: the open-ended cost-table timing last, after the end-to-end proof
SECTIONS: dict[str, Callable[[Context], None]] = {
    "tests": check_tests,
    "matmul": check_matmul,
    "train": check_train,
    "pipeline": check_pipeline,
    "costs": check_costs,
}


# ---------------------------------------------------------------- prepare, install, report


def prepare(folder: Path) -> None:
    """Here: the wheels and SmolLM2's config and tokenizer that the device run needs."""
    from importlib.metadata import version

    from qpeft.models.resolve import resolve_model

    wheels = folder / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    # the versions installed here, which the tests pass with (pulp 4 imports orloge,
    # which needs cpsat-logutils: an unpinned download missed it on the first GPU run)
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28)] + ["--platform=manylinux2014_x86_64"]
    download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    subprocess.run(
        [*download, "--python-version=3.12", "--implementation=cp", *platforms, "-d", str(wheels), *pins], check=True
    )
    for wheel in wheels.glob("pulp-*.whl"):
        slim_wheel(
            wheel,
            (
                "pulp/solverdir/cbc/win/",
                "pulp/solverdir/cbc/osx/",
                "pulp/solverdir/cbc/linux/i32/",
                "pulp/solverdir/cbc/linux/arm64/",
                "pulp/tests/",
            ),
        )
    source = resolve_model("smollm2")
    target = folder / "smollm2"
    target.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    print(f"wrote {folder} ({size:.1f} MiB). On the GPU machine, carrying {folder}:")
    print(f"  PYTHONUNBUFFERED=1 python3 tools/gpu_check.py --carried {folder} --out $OUT")


def slim_wheel(wheel: Path, drop: tuple[str, ...]) -> None:
    """Rewrite `wheel` without the members under `drop` (and their RECORD lines): pulp
    bundles CBC for every platform, 16 MiB of the 64 MiB that may travel."""
    import zipfile

    tmp = wheel.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.startswith(drop):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not line.startswith(drop)).encode()
            dst.writestr(info, data)
    tmp.replace(wheel)


def install_wheels(carried: Path, env: dict[str, str]) -> float:
    """pip install the carried wheels into SITE (no index: nothing can be fetched there)."""
    start = time.perf_counter()
    wheels = sorted((carried / "wheels").glob("*.whl"))
    if wheels:
        install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        subprocess.run([*install, "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)], check=True)
        sys.path.insert(0, str(SITE))
        env["PYTHONPATH"] = os.pathsep.join([str(SITE), env["PYTHONPATH"]])
    return time.perf_counter() - start


def markdown(ctx: Context, header: dict[str, Any]) -> str:
    lines = [f"# gpu_check: {header['device_name']}, {header['date']}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k not in ("device_name", "date")]
    lines += ["", "| section | check | ok | figures |", "|---|---|---|---|"]
    for row in ctx.rows:
        figures = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("section", "name", "ok"))
        lines.append(f"| {row['section']} | {row['name']} | {'yes' if row['ok'] else 'NO'} | {figures} |")
    return "\n".join(lines) + "\n"


def write_report(ctx: Context, header: dict[str, Any]) -> str:
    body = {"header": header, "ceilings": ctx.ceilings, "rows": ctx.rows}
    (ctx.out / "gpu_check.json").write_text(json.dumps(body, indent=1))
    table = markdown(ctx, header)
    (ctx.out / "gpu_check.md").write_text(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (the default test suite)")
    parser.add_argument("--prepare", type=Path, metavar="DIR", help="write DIR/wheels and DIR/smollm2 here, then stop")
    parser.add_argument("--carried", type=Path, metavar="DIR", help="the folder --prepare wrote, carried to the GPU")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument(
        "--deadline", type=float, default=420.0, help="seconds; sections not begun by then are skipped (default 420)"
    )
    args = parser.parse_args()
    if args.prepare is not None:
        prepare(args.prepare)
        return
    began = time.perf_counter()
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        sys.exit(f"gpu_check: unknown sections {', '.join(unknown)} (of {', '.join(SECTIONS)})")
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is first imported
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    sys.path.insert(0, str(REPO))
    install_s = install_wheels(args.carried, env) if args.carried else 0.0

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (use --cpu-smoke on a CPU)")
    scale = SMOKE if args.cpu_smoke else GPU
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"qpeft-gpu-check-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    if args.carried:
        tokenizer_dir = args.carried / "smollm2"
    else:
        from qpeft.models.resolve import resolve_model

        tokenizer_dir = resolve_model("smollm2")
    ctx = Context(scale, args.out, work, tokenizer_dir, env)
    header = {
        "device_name": torch.cuda.get_device_name() if scale.device == "cuda" else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
        "wheel_install_s": round(install_s, 1),
    }
    measure_ceilings(ctx)
    table = write_report(ctx, header)
    for name in sections:
        if time.perf_counter() - began > args.deadline:
            ctx.add(name, "skipped", False, reason=f"past the {args.deadline:.0f} s deadline")
            continue
        start = time.perf_counter()
        try:
            SECTIONS[name](ctx)
        except Exception as exc:
            (args.out / f"{name}_error.txt").write_text(traceback.format_exc())
            ctx.add(name, "failed", False, error=f"{type(exc).__name__}: {exc}"[:400])
        print(f"# {name}: {time.perf_counter() - start:.1f} s", flush=True)
        header["total_s"] = round(time.perf_counter() - began, 1)
        table = write_report(ctx, header)  # after every section: a run killed at its limit keeps what it measured
    shutil.rmtree(work, ignore_errors=True)
    print(table)
    sys.exit(0 if all(row["ok"] for row in ctx.rows) else 1)


if __name__ == "__main__":
    main()
