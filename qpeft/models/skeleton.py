"""A model's module tree without its weights, and its checkpoint's tensors under the
tree's names: what the calibration runs, the loader and the stages build on.

The model class is the task's auto class (`TASKS`), the task given with `--task` or
read from config.json's `architectures` (a checkpoint saved from `BertModel` is a
feature-extraction model, one saved from `LlamaForCausalLM` a causal LM). Checkpoint
keys map to the class's names as transformers maps them (`model_weights`), so a
head-less checkpoint loads into a class with a head and the other way round."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn

from qpeft.errors import QpeftError
from qpeft.models.selection import Targets, default_targets, select_linear
from qpeft.models.weights import SafetensorsWeights

# task → the transformers auto class that builds it
TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "feature-extraction": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
}
# the task of an `architectures` entry, by how its class name ends (first match)
_ARCHITECTURE_TASKS = (
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForMaskedLM", "masked-lm"),
    ("ForPreTraining", "masked-lm"),  # BERT's MLM + next-sentence heads: the MLM head is kept
    ("ForSequenceClassification", "sequence-classification"),
    ("Model", "feature-extraction"),
)


def _config(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())


def model_architecture(model_dir: Path) -> str:
    """config.json's first `architectures` entry ("?" where it names none)."""
    return (_config(model_dir).get("architectures") or ["?"])[0]


def model_task(model_dir: Path, task: str | None = None) -> str:
    """`task` (checked against `TASKS`), else the task of config.json's first
    `architectures` entry; a config without one is a causal LM."""
    if task is not None:
        if task not in TASKS:
            raise QpeftError(f"--task {task!r} is not one of: {', '.join(TASKS)}")
        return task
    architectures = _config(model_dir).get("architectures") or []
    if not architectures:
        return "causal-lm"
    for suffix, name in _ARCHITECTURE_TASKS:
        if architectures[0].endswith(suffix):
            return name
    raise QpeftError(
        f"{model_dir}: config.json's architecture {architectures[0]} is not one qpeft builds: "
        f"pass --task ({', '.join(TASKS)}); weights of a head the task lacks are left out"
    )


def require_causal_lm(model_dir: Path, what: str) -> None:
    """A one-line error unless `model_dir` (a model or a checkpoint) is a causal LM:
    `what` (a stage) needs its next-token head."""
    task = model_task(model_dir)
    if task != "causal-lm":
        raise QpeftError(f"{what} needs a causal LM; {model_dir} is a {task} model ({model_architecture(model_dir)})")


def build_skeleton(
    model_dir: Path, dtype: torch.dtype = torch.float32, task: str | None = None, **options: Any
) -> nn.Module:
    """The model's module tree (the class of `model_task(model_dir, task)`) with
    parameters on the meta device (no memory); buffers such as rotary frequencies
    are real. `options` go to `from_config`."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    task = model_task(model_dir, task)
    auto_class = getattr(transformers, TASKS[task])
    with init_empty_weights(include_buffers=False):
        try:
            return auto_class.from_config(config, dtype=dtype, **options)
        except ValueError:  # a family without this task's class
            raise QpeftError(
                f"{model_dir}: transformers has no {task} class for {config.model_type} ({auto_class.__name__})"
            ) from None


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that transformers ties to another tensor (a tied LM head)."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def model_weights(model_dir: Path, model: nn.Module) -> SafetensorsWeights:
    """`model_dir`'s tensors under `model`'s state-dict names, by transformers' rule
    (`core_model_loading.rename_source_key`): a stored key starting with the
    `base_model_prefix` loses it where only the shorter name is the model's (a
    checkpoint with a head into a base model), and gains it where only the longer
    one is (a head-less checkpoint into a model with a head). Keys the model does
    not have (another head's) are left out."""
    stored = SafetensorsWeights(model_dir)
    names = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "")
    renamed = {}
    for key in stored.weight_map:
        name = key
        if prefix and key.startswith(f"{prefix}.") and key not in names and key[len(prefix) + 1 :] in names:
            name = key[len(prefix) + 1 :]
        elif prefix and key not in names and f"{prefix}.{key}" in names:
            name = f"{prefix}.{key}"
        if name in names:
            renamed[name] = key
    return stored.renamed(renamed)


@dataclass
class StoredModel:
    """A model directory as one class: its skeleton, its task and its tensors under
    the skeleton's names (every tensor the model needs is there)."""

    model_dir: Path
    task: str
    skeleton: nn.Module
    weights: SafetensorsWeights

    @property
    def architecture(self) -> str:
        """The class name config.json's `architectures` gets in what qpeft writes."""
        return type(self.skeleton).__name__

    def linear(self, targets: Targets | None) -> dict[str, tuple[int, int]]:
        """Selected linear layers (name → weight shape (out, in), in module order)."""
        names = select_linear(self.skeleton, targets)
        return {n: tuple(self.skeleton.get_submodule(n).weight.shape) for n in names}


def open_stored(model_dir: Path, task: str | None = None) -> StoredModel:
    """`model_dir` built as `model_task(model_dir, task)`'s class; an error names a
    tensor that class needs and the checkpoint lacks (a head a head-less checkpoint
    has not), and the task that would do without it."""
    task = model_task(model_dir, task)
    skeleton = build_skeleton(model_dir, task=task)
    weights = model_weights(model_dir, skeleton)
    tied = tied_keys(skeleton)
    needed = [k for k in skeleton.state_dict() if k not in tied]
    absent = [k for k in needed if k not in weights.weight_map]
    if absent:
        own = model_task(model_dir)
        hint = "a checkpoint without that head: --task feature-extraction" if task != "feature-extraction" else ""
        if own != task:
            hint = f"the checkpoint's own class, {model_architecture(model_dir)}, is a {own} model"
        raise QpeftError(
            f"{model_dir}: a {task} model ({type(skeleton).__name__}) needs tensors the checkpoint lacks: "
            f"{', '.join(absent[:3])}{' …' if len(absent) > 3 else ''}" + (f" ({hint})" if hint else "")
        )
    return StoredModel(Path(model_dir), task, skeleton, weights)


def resolve_targets(model_dir: Path, targets: Targets | None) -> Targets:
    """`targets`, or where None the default of the model's family (config.json's
    model_type): what manifests and cache keys record."""
    if targets is not None:
        return targets
    return default_targets(_config(model_dir).get("model_type"))


def stored_linear(model_dir: Path, targets: Targets | None, task: str | None = None) -> dict[str, tuple[int, int]]:
    """`open_stored(model_dir, task).linear(targets)`."""
    return open_stored(model_dir, task).linear(targets)
