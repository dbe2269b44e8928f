"""`qpeft train` as a library call: fine-tune the high-precision part of a low-bit
model over its frozen packed base, as a recipe says (`qpeft.training`). The base is
built first with the same stage calls as `qpeft quantize` / `qpeft decompose`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qpeft.errors import QpeftError


@dataclass
class TrainRequest:
    """`qpeft train`: the recipe file, its `--set KEY=VALUE` overrides, and whether to
    continue (`resume`) or replace (`overwrite`) the run in its output_dir."""

    recipe: Path
    overrides: list[str] = field(default_factory=list)
    resume: bool = False
    overwrite: bool = False


def run_train(request: TrainRequest, progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """(the recipe, the trainer's final state: `main` on the main process, step,
    tokens, seconds, eval_ppl when evaluated)."""
    from qpeft.training.recipe import load_recipe
    from qpeft.training.trainer import train

    r = request
    if r.resume and r.overwrite:
        raise QpeftError("--resume continues the run in output_dir and --overwrite replaces it: give one of them")
    recipe = load_recipe(r.recipe, r.overrides)
    return recipe, train(recipe, resume=r.resume, progress=progress, overwrite=r.overwrite)
