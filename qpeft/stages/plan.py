"""`qpeft plan` as a library call: the memory a decomposition and a training run will
need, predicted from the model's config and the settings alone, with no weight
loaded: about a second of its own work (on CPU-2, importing transformers' model code
takes another 7).

    checkpoint  = Σ_selected storage(Q) + Σ_selected adapter as stored + Σ_other numel·bytes(source dtype)
    train peak  = packed base + other tensors in fp32 (how the trainer loads them)
                + trainable · 16 bytes (fp32 parameter, gradient and AdamW's two moments)
                + activations + workspace
    plain:        activations = L · A_layer + A_head,  workspace = W_head
    grad. ckpt:   activations = L · B·S·h·4 (each layer's fp32 input)
                                + max(A_head + W_head, A_layer + W_layer)

A_layer and A_head are the bytes autograd saves for the backward in one decoder layer
and in the final norm, LM head and loss, counted exactly by running them on fake
tensors (`torch._subclasses.FakeTensorMode`: shapes and dtypes, no data) with the
same modules the trainer uses: qpeft's QuantLinear with the method's adapter, under
the recipe's autocast dtype. The peak comes in the loss's backward, with every saved
tensor alive and the logits' gradient in fp32 and in the compute dtype, W_head =
B·S·V·(4 + c); with gradient checkpointing the layers are recomputed one at a time
after it, each with W_layer = one dequantized matrix and two MLP-wide gradients.
The CUDA context (≈ 0.5 GiB, outside torch's allocator) is reported apart.

Decompose's calibration keeps every layer's hidden states of the calibration
sequences on the host ((L + 1) · sequences · seqlen · h · 4 bytes, qpeft.calibration.
stream) beside the embedding and LM head, one layer and one sequence's logits; the
cost table and split then hold one matrix's working set (8 · d_out·d_in·4).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpeft.data.calibration import DEFAULT_SEQLEN, DEFAULT_SEQUENCES
from qpeft.errors import QpeftError

GiB = 2**30
CUDA_CONTEXT = 0.5 * GiB  # CUDA's own context and cuBLAS workspaces: not in torch's allocator
_SIZE = re.compile(r"^\s*(?P<n>\d+(\.\d+)?)\s*(?P<unit>[KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}


def parse_size(text: str, flag: str = "--device-memory") -> int:
    """'24GiB', '80 GB', '1.5TiB' → bytes."""
    match = _SIZE.match(text)
    if not match:
        raise QpeftError(f"{flag} {text!r}: expected a size such as 24GiB or 80GB")
    return int(float(match["n"]) * _UNITS[(match["unit"] or "B").lower()])


@dataclass
class PlanRequest:
    """What `qpeft plan` predicts for: the base (one `config`, or an ILP `budget` of Q
    or `total_budget` of everything stored), the method and rank, and the training
    batch; `recipe` fills all of them from a recipe file."""

    model: str | None = None
    method: str = "qlora"  # qlora | lqlora | qwha
    config: str | None = None
    budget: float | None = None
    total_budget: float | None = None
    rank: int = 8
    targets: str | None = None
    recipe: Path | None = None
    batch_size: int = 4
    seqlen: int = 512
    dtype: str = "bf16"
    device: str = "cuda"
    device_memory: str | None = None
    calib_sequences: int = DEFAULT_SEQUENCES
    calib_seqlen: int = DEFAULT_SEQLEN


def _from_recipe(request: PlanRequest) -> PlanRequest:
    from qpeft.training.recipe import load_recipe

    recipe = load_recipe(request.recipe)
    m, t = recipe.method, recipe.train
    if m.name == "checkpoint":
        raise QpeftError("qpeft plan: a recipe of method checkpoint trains an existing base: plan the decomposition")
    return PlanRequest(
        model=recipe.model,
        method=m.name,
        config=m.config,
        budget=m.budget,
        total_budget=m.total_budget,
        rank=m.rank,
        targets=m.targets,
        batch_size=t.batch_size,
        seqlen=recipe.data.seqlen,
        dtype=t.dtype,
        device=request.device,
        device_memory=request.device_memory,
    )


def _tensor_table(model_dir: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """name → (shape, bytes per element) from the safetensors headers alone."""
    import struct

    table: dict[str, tuple[tuple[int, ...], int]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with file.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                table[name] = (tuple(entry["shape"]), _DTYPE_BYTES.get(entry["dtype"], 4))
    return table


def _adapter_params(method: str, rank: int, shape: tuple[int, int]) -> int:
    from qpeft.methods.qwha.solver import parameter_count

    if rank == 0:
        return 0
    return parameter_count(rank, shape) if method == "qwha" else rank * (shape[0] + shape[1])


def saved_bytes(config_body: dict[str, Any], method: str, rank: int, batch: int, seqlen: int, dtype: str) -> dict:
    """Bytes autograd saves in one decoder layer and in the head (norm, LM head, loss),
    traced on fake tensors with qpeft's modules (see the module docstring)."""
    import torch
    from torch import nn
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoConfig, AutoModelForCausalLM

    from qpeft.methods.qwha.adapter import WHTAdapter
    from qpeft.models.selection import DEFAULT_TARGETS
    from qpeft.modules import QuantLinear
    from qpeft.modules.adapters import LowRankAdapter
    from qpeft.quant import PRESETS, dequantize, quantize

    config = AutoConfig.for_model(**{**config_body, "num_hidden_layers": 1})
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    nf4 = PRESETS["nf4"]
    dequantize(quantize(torch.randn(64, 64), nf4), compute)  # fills the codebook caches with real tensors
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = AutoModelForCausalLM.from_config(config)
        model.requires_grad_(False)
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and child_name in DEFAULT_TARGETS:
                    layer = QuantLinear(child.in_features, child.out_features, nf4)
                    shape = (child.out_features, child.in_features)
                    if rank and method == "qwha":
                        count = _adapter_params(method, rank, shape)
                        layer.adapter = WHTAdapter(child.in_features, child.out_features, count, None, torch.float32)
                    elif rank:
                        layer.adapter = LowRankAdapter(child.in_features, child.out_features, rank)
                    if layer.adapter is not None:
                        layer.adapter.requires_grad_(True)
                    setattr(module, child_name, layer)
        fixed = {id(t) for t in [*model.parameters(), *model.buffers()]}
        storages: dict[int, int] = {}

        def pack(tensor):
            if id(tensor) not in fixed:
                storage = tensor.untyped_storage()
                storages[storage._cdata] = storage.nbytes()
            return tensor

        hidden = torch.empty(batch, seqlen, config.hidden_size, requires_grad=True)
        positions = torch.arange(seqlen)[None]
        autocast = torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            rope = model.model.rotary_emb(hidden, positions)
            model.model.layers[0](hidden, attention_mask=None, position_embeddings=rope, position_ids=positions)
        layer_bytes = sum(storages.values())
        storages.clear()
        labels = torch.zeros(batch, seqlen, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            logits = model.lm_head(model.model.norm(hidden))
            model.loss_function(logits, labels, config.vocab_size)
        head_bytes = sum(storages.values())
    return {"layer": layer_bytes, "head": head_bytes}


def run_plan(request: PlanRequest) -> dict[str, Any]:
    """The predictions, in bytes (see the module docstring); `fits` and `advice`
    when `device_memory` is given."""
    from qpeft.methods import method_plugin
    from qpeft.models.resolve import resolve_model
    from qpeft.models.selection import parse_targets
    from qpeft.models.skeleton import require_causal_lm, stored_linear
    from qpeft.quant import parse_config
    from qpeft.stages.checks import positive

    r = _from_recipe(request) if request.recipe is not None else request
    if r.method not in ("qlora", "lqlora", "qwha"):
        raise QpeftError(f"qpeft plan: method {r.method!r}: expected qlora, lqlora or qwha")
    if r.rank < 0:
        raise QpeftError(f"--rank must be 0 or more, got {r.rank}")
    for flag, value in (
        ("--batch-size", r.batch_size),
        ("--seqlen", r.seqlen),
        ("--calib-sequences", r.calib_sequences),
        ("--calib-seqlen", r.calib_seqlen),
    ):
        positive(flag, value)
    given = [x is not None for x in (r.config, r.budget, r.total_budget)]
    if sum(given) > 1:
        raise QpeftError("qpeft plan: give one of --config, --budget and --total-budget")
    config_name = r.config
    if not any(given):
        if r.method != "qlora":
            raise QpeftError(f"qpeft plan: method {r.method} needs --config, --budget or --total-budget")
        config_name = "nf4"
    model_dir = resolve_model(r.model)
    require_causal_lm(model_dir, "the memory plan (of a causal LM's training step)")
    body = json.loads((model_dir / "config.json").read_text())
    tensors = _tensor_table(model_dir)
    shapes = stored_linear(model_dir, parse_targets(r.targets, "--targets"))
    numel = sum(a * b for a, b in shapes.values())
    adapter_params = sum(_adapter_params(r.method, r.rank, s) for s in shapes.values())
    # QLoRA's base stores no adapter; a decomposition's as its method stores it (QWHA: positions too)
    stored_adapter_bits = (
        0 if r.method == "qlora" else sum(method_plugin(r.method).adapter_bits(r.rank, s) for s in shapes.values())
    )
    if config_name is not None:
        config = parse_config(config_name)
        q_bits = sum(config.storage_bits(s) for s in shapes.values())
        exact = True
    elif r.budget is not None:
        q_bits, exact = r.budget * numel, False
    else:
        q_bits, exact = r.total_budget * numel - stored_adapter_bits, False
        if q_bits <= 0:
            raise QpeftError(f"--total-budget {r.total_budget}: the rank-{r.rank} adapters alone take more")
    selected = {f"{name}.weight" for name in shapes}
    others = [(s, b) for name, (s, b) in tensors.items() if name not in selected]
    other_numel = sum(math.prod(s) for s, _ in others)
    other_bytes = sum(math.prod(s) * b for s, b in others)
    checkpoint = q_bits / 8 + stored_adapter_bits / 8 + other_bytes

    layers = body["num_hidden_layers"]
    hidden, inner, vocab = body["hidden_size"], body["intermediate_size"], body["vocab_size"]
    saved = saved_bytes(body, r.method, r.rank, r.batch_size, r.seqlen, r.dtype)
    tokens = r.batch_size * r.seqlen
    compute_bytes = 4 if r.dtype == "fp32" else 2
    largest = max(a * b for a, b in shapes.values())
    head_work = tokens * vocab * (4 + compute_bytes)  # the logits' gradient, fp32 and compute dtype
    layer_work = largest * compute_bytes + 2 * tokens * inner * compute_bytes
    base = q_bits / 8 + other_numel * 4
    optimizer = adapter_params * 16
    inputs = layers * tokens * hidden * 4
    recompute = max(saved["head"] + head_work, saved["layer"] + layer_work)
    parts = {  # (activations, workspace)
        "none": (layers * saved["layer"] + saved["head"], head_work),
        "gradient_checkpointing": (inputs + saved["head"], recompute - saved["head"]),
    }
    train = {
        key: {
            "base": base,
            "adapters_and_optimizer": optimizer,
            "activations": act,
            "workspace": work,
            "total": base + optimizer + act + work,
        }
        for key, (act, work) in parts.items()
    }
    calib_hidden = (layers + 1) * r.calib_sequences * r.calib_seqlen * hidden * 4
    layer_numel = sum(math.prod(s) for n, (s, _) in tensors.items() if ".layers.0." in n)
    logits = r.calib_seqlen * vocab * 4 * 3  # one sequence's: fp32, its float copy and its gradient
    decompose_host = other_numel * 4 + layer_numel * 4 + calib_hidden + logits + 8 * largest * 4
    result: dict[str, Any] = {
        "model": r.model or "smollm2",
        "method": r.method,
        "base": config_name or (f"budget {r.budget}" if r.budget is not None else f"total budget {r.total_budget}"),
        "rank": r.rank,
        "batch": [r.batch_size, r.seqlen],
        "dtype": r.dtype,
        "matrices": len(shapes),
        "selected_params": numel,
        "checkpoint_bytes": checkpoint,
        "checkpoint_exact": exact,
        "bits_q": q_bits / numel,
        "bits_total": (q_bits + stored_adapter_bits) / numel,
        "trainable_params": adapter_params,
        "train": train,
        "decompose_host_bytes": decompose_host,
        "saved_per_layer_bytes": saved["layer"],
        "saved_head_bytes": saved["head"],
        "device": r.device,
        "outside_allocator_bytes": CUDA_CONTEXT if r.device == "cuda" else 0,
    }
    if r.device_memory is not None:
        limit = parse_size(r.device_memory)
        extra = result["outside_allocator_bytes"]
        plain, checkpointed = train["none"]["total"] + extra, train["gradient_checkpointing"]["total"] + extra
        result["device_memory_bytes"] = limit
        result["fits"] = plain <= limit
        result["fits_with_gradient_checkpointing"] = checkpointed <= limit
        result["advice"] = _advice(result, plain, checkpointed, limit, r)
    return result


def _advice(result: dict[str, Any], plain: float, checkpointed: float, limit: int, r: PlanRequest) -> str:
    if plain <= limit:
        return "fits as planned"
    if checkpointed <= limit:
        return "fits with train.gradient_checkpointing: true"
    fixed = checkpointed - result["train"]["gradient_checkpointing"]["activations"]
    if fixed > limit:
        return "the base and adapters alone exceed it: a lower --budget, a smaller rank, or FSDP over more devices"
    return f"lower train.batch_size or data.seqlen (batch {r.batch_size} × {r.seqlen}) with gradient checkpointing"
