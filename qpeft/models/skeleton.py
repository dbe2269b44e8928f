"""A model's module tree without its weights: what the calibration runs, the
loader and the stages build on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn

from qpeft.errors import QpeftError
from qpeft.models.selection import Targets, default_targets, select_linear
from qpeft.models.weights import SafetensorsWeights


def build_skeleton(model_dir: Path, dtype: torch.dtype = torch.float32, **options: Any) -> nn.Module:
    """The model's module tree with parameters on the meta device (no memory);
    buffers such as rotary frequencies are real. `options` go to `from_config`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, **options)


def resolve_targets(model_dir: Path, targets: Targets | None) -> Targets:
    """`targets`, or where None the default of the model's family (config.json's
    model_type): what manifests and cache keys record."""
    if targets is not None:
        return targets
    return default_targets(json.loads((Path(model_dir) / "config.json").read_text()).get("model_type"))


def stored_linear(model_dir: Path, weights: SafetensorsWeights, targets: Targets | None) -> dict[str, tuple[int, int]]:
    """Selected linear layers (name → weight shape (out, in), in module order); an
    error names any whose weight the safetensors files lack."""
    skeleton = build_skeleton(model_dir)
    names = select_linear(skeleton, targets)
    absent = [n for n in names if f"{n}.weight" not in weights.weight_map]
    if absent:
        raise QpeftError(f"{model_dir}: selected weights not in the checkpoint: {absent[:3]}")
    return {n: tuple(skeleton.get_submodule(n).weight.shape) for n in names}
