"""The model a recipe trains: a frozen packed base (a qpeft checkpoint) whose
adapters alone are trainable.

The base checkpoint is `OUTPUT_DIR/base`, made once by the user-facing commands
(`qpeft quantize` for QLoRA, `qpeft decompose` for LQ-LoRA and QWHA) or taken as it
is from `method.checkpoint`. QLoRA puts a fresh LoRA on every quantized matrix
(L1 = 0, so training starts from the quantized model, scaled by alpha / r).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qpeft.errors import QpeftError
from qpeft.io.checkpoint import is_checkpoint
from qpeft.modules import quantized_layers
from qpeft.modules.adapters import LowRankAdapter
from qpeft.stages.decompose import DecomposeRequest, run_decompose
from qpeft.stages.quantize import QuantizeRequest, run_quantize
from qpeft.training.recipe import Recipe, method_section

BASE_DIR = "base"


def base_request(recipe: Recipe, out: Path, resume: bool = False) -> QuantizeRequest | DecomposeRequest:
    """The request of the stage that makes the recipe's base checkpoint at `out`
    (`resume`: continue an interrupted cost table)."""
    from qpeft.methods import method_plugin

    m = recipe.method
    if m.name == "qlora":
        return QuantizeRequest(recipe.model, out, m.config or "nf4", m.targets)
    options = method_plugin(m.name, "recipe key method.name").recipe_options(m.options)
    rank = None if m.ranks is not None else m.rank
    return DecomposeRequest(
        recipe.model,
        out,
        m.name,
        m.budget,
        m.config,
        rank,
        options,
        total_budget=m.total_budget,
        ranks=m.ranks,
        targets=m.targets,
        resume=resume,
    )


def base_dir(recipe: Recipe) -> Path:
    """Where the recipe's base checkpoint is (or will be)."""
    if recipe.method.name == "checkpoint":
        path = Path(recipe.method.checkpoint)
        if not is_checkpoint(path):
            raise QpeftError(f"recipe key method.checkpoint: {path} is not a qpeft checkpoint")
        return path
    return Path(recipe.output_dir) / BASE_DIR


def check_method_inputs(recipe: Recipe) -> Path:
    """Check what the base will be made from before anything is made: the model, the
    targets, and the rank against every selected matrix. Returns the directory whose
    tokenizer the run uses (the model's, which the base copies; or the checkpoint)."""
    from qpeft.allocation.ilp import parse_ranks
    from qpeft.methods import METHODS, check_rank
    from qpeft.models.resolve import resolve_model
    from qpeft.models.selection import parse_targets
    from qpeft.models.skeleton import require_causal_lm, stored_linear

    m = recipe.method
    if m.name == "checkpoint":
        if is_checkpoint(base_dir(recipe)):
            require_causal_lm(base_dir(recipe), "training (next-token loss)")
        return base_dir(recipe)
    model_dir = resolve_model(recipe.model)
    require_causal_lm(model_dir, "training (next-token loss)")
    targets = parse_targets(m.targets, "recipe key method.targets")
    shapes = stored_linear(model_dir, targets)
    if m.ranks is None:
        check_rank(METHODS.get(m.name, LowRankAdapter), m.rank, shapes, "recipe key method.rank")
    else:
        check_rank(METHODS[m.name], max(parse_ranks(m.ranks)), shapes, "recipe key method.ranks")
    return model_dir


def check_base_matches(recipe: Recipe, previous: Path) -> None:
    """A base left in OUTPUT_DIR by an earlier run (its recipe: `previous`) is reused
    only if this recipe would make the same one."""
    base = base_dir(recipe)
    if recipe.method.name == "checkpoint" or not is_checkpoint(base):
        return
    if not previous.is_file():
        raise QpeftError(f"{base} was not made by a qpeft training run (no {previous}): choose another output_dir")
    body = json.loads(previous.read_text())
    previous_recipe = Recipe(model=body["model"], method=method_section(body["method"], lenient=True))
    earlier = base_request(previous_recipe, base).command()
    if earlier != base_request(recipe, base).command():
        raise QpeftError(
            f"{base} was made by another recipe (qpeft {' '.join(earlier)}; see {previous}): "
            "choose another output_dir, or remove it"
        )


def build_base(recipe: Recipe, resume: bool = False) -> None:
    """Make the base checkpoint with the quantize / decompose stage (their errors reach
    the caller as they are). Under torch.distributed every process of a decomposition
    calls this (the cost table is split across them and rank 0 writes); a
    quantization runs on one process. `resume`: continue a decomposition's
    interrupted cost table."""
    from qpeft.allocation.cost_table import work_dir_for

    base = base_dir(recipe)
    request = base_request(recipe, base, resume and work_dir_for(base).is_dir())
    if isinstance(request, QuantizeRequest):
        run_quantize(request)
    else:
        run_decompose(request)


def add_lora(model: nn.Module, rank: int, alpha: float, seed: int) -> None:
    """A fresh LoRA (L1 = 0) of `rank`, scaled by alpha / rank, on every quantized matrix."""
    generator = torch.Generator().manual_seed(seed)
    for layer in quantized_layers(model).values():
        if layer.adapter is not None:
            raise QpeftError("the base checkpoint already has adapters: use method.name checkpoint to train them")
        device = layer.codes.device if hasattr(layer, "codes") else None
        adapter = LowRankAdapter(layer.in_features, layer.out_features, rank, device, torch.float32, alpha / rank)
        adapter.reset_lora(generator)
        layer.adapter = adapter


def freeze_all_but_adapters(model: nn.Module) -> list[nn.Parameter]:
    """Only adapter parameters train; returns them (there must be some)."""
    model.requires_grad_(False)
    trainable = []
    for layer in quantized_layers(model).values():
        if layer.adapter is not None:
            for parameter in layer.adapter.parameters():
                parameter.requires_grad_(True)
                trainable.append(parameter)
    if not trainable:
        raise QpeftError("the model has no adapters to train (a checkpoint made with --rank 0?)")
    return trainable


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by name (what a training checkpoint stores)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_with_random_lora(base: Path, out: Path, rank: int, alpha: float, std: float, seed: int = 1) -> Path:
    """The checkpoint `base` with a rank-`rank` LoRA (scale alpha / rank) on every
    quantized matrix, L1 drawn N(0, std²) and L2 as `add_lora` draws it, written to
    `out`: a non-zero ΔW, as a fine-tune leaves, for checks of exports and reloads."""
    from qpeft.io.trained import save_trained
    from qpeft.models.loading import load_checkpoint

    model = load_checkpoint(base)
    add_lora(model, rank, alpha, seed=0)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LowRankAdapter):
            torch.nn.init.normal_(module.left, std=std, generator=generator)
    save_trained(model, base, out, {"step": 0, "tokens": 0})
    return out
