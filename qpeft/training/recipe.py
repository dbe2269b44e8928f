"""Training recipes: a YAML file (plus `--set key=value` overrides) checked against a
schema, with errors that name the bad key.

    model: smollm2                  # what `qpeft decompose` takes as MODEL
    method:
      name: lqlora                  # qlora | lqlora | qwha | checkpoint
      budget: 2.75                  # lqlora/qwha: bit budget (or `config: nf3`)
      rank: 8
    data:
      train: wikitext2              # wikitext2 / python-docs (their calibration splits) or a .txt/.json/.jsonl file
      eval: wikitext2               # wikitext2 / python-docs (their test splits) or a file; null: no eval
      seqlen: 512
    train: {steps: 100, batch_size: 4, lr: 2.0e-4, schedule: cosine, warmup: 0.03}
    output_dir: out/train-smollm2-lqlora

Every section and key is listed in the dataclasses below with its default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qpeft.allocation.ilp import parse_ranks
from qpeft.errors import QpeftError
from qpeft.methods import METHODS as REGISTERED
from qpeft.models.selection import parse_targets

# a base made by `qpeft decompose --method NAME` with an adapter to train
DECOMPOSITIONS = tuple(name for name, plugin in REGISTERED.items() if plugin.adapter is not None)
METHODS = ("qlora", *DECOMPOSITIONS, "checkpoint")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class MethodSection:
    """How the frozen base and the trainable part are made."""

    name: str = "qlora"
    checkpoint: str | None = None  # `checkpoint`: a decomposed qpeft checkpoint directory
    config: str | None = None  # one quantization config for every matrix (qlora: nf4)
    budget: float | None = None  # lqlora / qwha: average bits per parameter of Q (the ILP)
    total_budget: float | None = None  # lqlora / qwha: average bits of Q plus the adapter as stored
    rank: int = 64  # LoRA rank, or the equal parameter budget of QWHA
    ranks: str | None = None  # with total_budget: candidate ranks, e.g. "0,8,16" (the ILP picks each matrix's)
    alpha: float | None = None  # qlora: LoRA scaling alpha / rank (default: 2·rank); decompositions train unscaled
    targets: str | list[str] | None = None  # peft target_modules rules (models.selection); None: family default
    # the method's own keys, written beside these in the YAML: its plugin's `recipe_section`
    options: Any = None


@dataclass
class DataSection:
    train: str = "wikitext2"
    eval: str | None = "wikitext2"
    format: str | None = None  # text | alpaca (default: from the file name; wikitext2 is text)
    seqlen: int = 512
    eval_max_windows: int | None = 8  # windows of `seqlen` tokens per evaluation (null: all)


@dataclass
class TrainSection:
    steps: int | None = None  # optimizer steps; or `epochs`
    epochs: float | None = None
    batch_size: int = 4  # sequences per device per micro-batch
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    schedule: str = "constant"
    warmup: float = 0.0  # a fraction of the steps (< 1) or a number of steps (≥ 1)
    max_grad_norm: float | None = 1.0
    dtype: str = "bf16"  # autocast dtype of the forward (fp32: none)
    gradient_checkpointing: bool = False
    eval_every: int | None = None  # steps; null: at the end only
    save_every: int | None = None  # steps; null: at the end only
    log_every: int = 1


@dataclass
class Recipe:
    model: str = "smollm2"
    method: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    seed: int = 0
    output_dir: str = "out/train"
    source: str | None = None  # the recipe file (set by load_recipe)

    def as_dict(self) -> dict[str, Any]:
        """The recipe as its YAML would hold it (the method's own keys in `method`)."""
        body = dataclasses.asdict(self)
        body["method"] |= body["method"].pop("options") or {}
        return body


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as the type `hint` (str, int, float, bool, or one of them | None)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise QpeftError(f"recipe key {key}: needs a value")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    names = " or ".join(
        "a list of strings" if typing.get_origin(o) is list else o.__name__ for o in options if o is not type(None)
    )
    raise QpeftError(f"recipe key {key}: expected {names}, got {value!r}")


INTERNAL = ("source", "options")  # fields a recipe file does not set by name


def _build(cls: type, body: Any, prefix: str) -> Any:
    if not isinstance(body, dict):
        raise QpeftError(f"recipe key {prefix.rstrip('.') or '(top level)'}: expected a mapping, got {body!r}")
    known = {k: v for k, v in typing.get_type_hints(cls).items() if k not in INTERNAL}
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise QpeftError(f"unknown recipe key {prefix}{unknown[0]} (known: {', '.join(known)})")
    values = {}
    for name, value in body.items():
        key, hint = f"{prefix}{name}", known[name]
        if hint is MethodSection:
            values[name] = method_section(value, f"{key}.")
        elif dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{key}.")
        else:
            values[name] = _coerce(value, hint, key)
    return cls(**values)


def method_section(body: Any, prefix: str = "method.", lenient: bool = False) -> MethodSection:
    """The method section: its common keys, and the method's own (its plugin's
    `recipe_section` dataclass, None if it has none) as `options`. `lenient`: ignore
    keys the method does not know (a recipe.json written by an earlier qpeft)."""
    if not isinstance(body, dict):
        raise QpeftError(f"recipe key {prefix.rstrip('.')}: expected a mapping, got {body!r}")
    plugin = REGISTERED.get(body.get("name"))
    own_section = plugin.recipe_section if plugin is not None else None
    own = set(typing.get_type_hints(own_section)) if own_section is not None else set()
    common = {k for k in typing.get_type_hints(MethodSection) if k not in INTERNAL}
    if lenient:
        body = {k: v for k, v in body.items() if k in own | common}
    section = _build(MethodSection, {k: v for k, v in body.items() if k not in own}, prefix)
    if own_section is not None:
        section.options = _build(own_section, {k: v for k, v in body.items() if k in own}, prefix)
    return section


def _check(recipe: Recipe) -> None:
    m, d, t = recipe.method, recipe.data, recipe.train

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise QpeftError(message)

    need(m.name in METHODS, f"recipe key method.name: one of {', '.join(METHODS)}, got {m.name!r}")
    need(m.name != "checkpoint" or m.checkpoint, "recipe key method.checkpoint: needed when method.name is checkpoint")
    for key in ("budget", "total_budget", "ranks"):
        need(m.name in DECOMPOSITIONS or getattr(m, key) is None, f"recipe key method.{key}: not used by {m.name}")
    need(
        m.name not in DECOMPOSITIONS or [m.budget, m.total_budget, m.config].count(None) == 2,
        f"recipe key method.budget: {m.name} needs one of budget, total_budget and config",
    )
    need(m.rank > 0 or m.name == "checkpoint", f"recipe key method.rank: must be positive, got {m.rank}")
    if m.ranks is not None:
        parse_ranks(m.ranks, "recipe key method.ranks")
        need(m.total_budget is not None, "recipe key method.ranks: needs method.total_budget")
    if m.targets is not None:
        parse_targets(m.targets, "recipe key method.targets")
    need(d.seqlen > 1, f"recipe key data.seqlen: must be at least 2, got {d.seqlen}")
    need(d.format in (None, "text", "alpaca"), f"recipe key data.format: text or alpaca, got {d.format!r}")
    need((t.steps is None) != (t.epochs is None), "recipe key train.steps: give train.steps or train.epochs (one)")
    need(t.steps is None or t.steps > 0, f"recipe key train.steps: must be positive, got {t.steps}")
    need(t.epochs is None or t.epochs > 0, f"recipe key train.epochs: must be positive, got {t.epochs}")
    need(t.batch_size > 0, f"recipe key train.batch_size: must be positive, got {t.batch_size}")
    need(t.grad_accum > 0, f"recipe key train.grad_accum: must be positive, got {t.grad_accum}")
    need(t.lr > 0, f"recipe key train.lr: must be positive, got {t.lr}")
    need(t.optimizer in OPTIMIZERS, f"recipe key train.optimizer: one of {', '.join(OPTIMIZERS)}, got {t.optimizer!r}")
    need(t.schedule in SCHEDULES, f"recipe key train.schedule: one of {', '.join(SCHEDULES)}, got {t.schedule!r}")
    need(t.warmup >= 0, f"recipe key train.warmup: must be 0 or more, got {t.warmup}")
    need(t.dtype in DTYPES, f"recipe key train.dtype: one of {', '.join(DTYPES)}, got {t.dtype!r}")
    for key in ("eval_every", "save_every", "log_every"):
        value = getattr(t, key)
        need(value is None or value > 0, f"recipe key train.{key}: must be positive, got {value}")


def _override(body: dict[str, Any], assignment: str) -> None:
    """Apply one `--set a.b=value` (the value parsed as YAML) to the raw recipe."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise QpeftError(f"--set {assignment!r}: expected key=value, e.g. train.lr=1e-4")
    *path, leaf = key.strip().split(".")
    node = body
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise QpeftError(f"--set {assignment!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(text)


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and check a recipe file."""
    path = Path(path)
    try:
        body = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise QpeftError(f"cannot read the recipe {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise QpeftError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    for assignment in overrides or []:
        _override(body, assignment)
    recipe = _build(Recipe, body, "")
    recipe.source = str(path)
    _check(recipe)
    return recipe
