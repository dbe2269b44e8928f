r"""Which linear layers get quantized, named as peft's `target_modules` names them.

* A list of names: a module matches when its full dotted name equals a name or ends
  with `.name` (`q_proj`, `self_attn.q_proj`, `model.layers.0.mlp.up_proj`).
* One string: a regular expression that must match the whole module name
  (`re.fullmatch`), e.g. `.*\.layers\.[0-3]\.self_attn\.(q|v)_proj`.
* `all-linear`: every linear layer but the output head (peft's shorthand).

On the command line (`--targets`) and in a recipe's string, a value made of names
alone (letters, digits, `_`, `.`, `-`), comma-separated, is a list; any other value is
one regular expression. A recipe's YAML list is a list. Only `nn.Linear` modules are
selected, so it works on any architecture built from them. Without targets, each
architecture family has its own default (`FAMILY_TARGETS`; the seven LLaMA projections
where the family is not listed).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from qpeft.errors import QpeftError

# A list of names (peft's list semantics) or one regular expression (its string).
Targets = tuple[str, ...] | str

ALL_LINEAR = "all-linear"
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# BERT-family encoders: the attention's query/key/value and every `dense` of the
# encoder layers (attention output, intermediate, output), not the pooler's or a head's
BERT_TARGETS = r"(.*\.)?encoder\.layer\.\d+\.(.*\.)?(query|key|value|dense)"
FAMILY_TARGETS: dict[str, Targets] = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2"), LLAMA_TARGETS),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "electra"), BERT_TARGETS),
}
DEFAULT_TARGETS = LLAMA_TARGETS  # a family FAMILY_TARGETS does not list
_NAMES = re.compile(r"[A-Za-z0-9_.,\- ]+")


def parse_targets(value: str | Sequence[str] | None, what: str) -> Targets | None:
    """A `--targets` text or a recipe's value as `Targets`; None means the model
    family's default. An empty list or a bad regular expression is an error (`what`
    names the flag or recipe key in it)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip() and (value.strip() == ALL_LINEAR or not _NAMES.fullmatch(value)):
        if value.strip() == ALL_LINEAR:
            return ALL_LINEAR
        try:
            re.compile(value)
        except re.error as exc:
            raise QpeftError(f"{what}: {value!r} is not a regular expression ({exc})") from None
        return value
    names = tuple(t.strip() for t in (value.split(",") if isinstance(value, str) else value) if t.strip())
    if not names:
        raise QpeftError(f"{what} is empty: name layers (e.g. q_proj,v_proj), or leave it out for the default set")
    return names


def targets_text(targets: Targets) -> str:
    """`targets` as one `--targets` value that parses back to the same selection: names
    as a comma-separated list, or (a name with other characters) an equivalent regex."""
    if isinstance(targets, str):
        return targets
    if all(_NAMES.fullmatch(name) and "," not in name for name in targets):
        return ",".join(targets)
    return r"(.*\.)?(" + "|".join(re.escape(name) for name in targets) + ")"


def targets_json(targets: Targets | None) -> list[str] | str | None:
    """`targets` for a manifest or a cache key (None: the family's default)."""
    return targets if targets is None or isinstance(targets, str) else list(targets)


def default_targets(model_type: str | None) -> Targets:
    """The default targets of an architecture family (a config's model_type)."""
    return FAMILY_TARGETS.get(model_type or "", DEFAULT_TARGETS)


def family_targets(model: nn.Module) -> Targets:
    """The default targets of `model`'s architecture family (its config's model_type)."""
    return default_targets(getattr(getattr(model, "config", None), "model_type", None))


def matches(name: str, targets: Targets) -> bool:
    """peft's rule: a string is a regex matching the whole name; a list matches a name
    equal to an entry or ending with `.entry`."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def select_linear(model: nn.Module, targets: Targets | None = None) -> list[str]:
    """Names of the `nn.Linear` modules of `model` that `targets` select (None: the
    family's default), in module order."""
    targets = family_targets(model) if targets is None else targets
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if targets == ALL_LINEAR:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        selected = [name for name in linear if model.get_submodule(name) is not head]
    else:
        selected = [name for name in linear if matches(name, targets)]
    if not selected:
        given = targets if isinstance(targets, str) else list(targets)
        shown = ", ".join(linear[:10]) + (f" … ({len(linear)} in all)" if len(linear) > 10 else "")
        raise QpeftError(
            f"no linear layer matches the targets {given!r} (peft's target_modules rules: a list of names, each "
            f"matching a module named so or ending with .NAME, or one regular expression of the whole name); "
            f"this model's linear layers: {shown or 'none'}"
        )
    return selected
