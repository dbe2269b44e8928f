"""`--targets` follows peft's `target_modules` rules, checked against peft's own matcher;
each architecture family has its default."""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from qpeft.errors import QpeftError
from qpeft.models.selection import (
    ALL_LINEAR,
    BERT_TARGETS,
    LLAMA_TARGETS,
    parse_targets,
    select_linear,
    targets_text,
)
from qpeft.training.recipe import load_recipe

# (the --targets text, how many of the tiny LLaMA's 15 linear layers it selects)
TARGETS_TABLE = [
    ("q_proj,v_proj", 4),
    ("self_attn.q_proj", 2),
    ("layers.0.self_attn.q_proj", 1),  # a suffix of the full name: peft matches it
    ("model.layers.1.mlp.down_proj", 1),
    ("lm_head", 1),
    (r".*\.layers\.0\.self_attn\.(q|v)_proj", 2),
    (r".*mlp\..*", 6),
    (r"model\.layers\.[01]\.self_attn\.o_proj", 2),
    ("proj", 0),  # neither equal to nor ending with `.proj`
    ("q_proj ,", 2),  # spaces and an empty entry are dropped
]


def tiny_llama() -> nn.Module:
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    return LlamaForCausalLM(config)


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def peft_selects(model: nn.Module, targets) -> list[str]:
    """The linear layers peft's LoRA would wrap for `target_modules=targets`."""
    config = LoraConfig(target_modules=targets if isinstance(targets, str) else list(targets))
    return [name for name in linear_names(model) if check_target_module_exists(config, name)]


@pytest.mark.parametrize(("text", "count"), TARGETS_TABLE)
def test_targets_match_what_peft_matches(text, count):
    model = tiny_llama()
    targets = parse_targets(text, "--targets")
    expected = peft_selects(model, targets)
    assert len(expected) == count
    if count:
        assert select_linear(model, targets) == expected
    else:
        with pytest.raises(QpeftError, match="no linear layer matches"):
            select_linear(model, targets)


def test_a_text_of_names_is_a_list_and_anything_else_one_regex():
    assert parse_targets("q_proj, v_proj", "--targets") == ("q_proj", "v_proj")
    assert parse_targets(r".*\.q_proj", "--targets") == r".*\.q_proj"
    assert parse_targets(r"model\.layers\.0\..*", "--targets") == r"model\.layers\.0\..*"
    assert parse_targets(["a.b", "c"], "recipe key method.targets") == ("a.b", "c")
    assert parse_targets(ALL_LINEAR, "--targets") == ALL_LINEAR
    assert parse_targets(None, "--targets") is None
    with pytest.raises(QpeftError, match=re.escape("--targets: '(q_proj' is not a regular expression (missing ),")):
        parse_targets("(q_proj", "--targets")
    for empty in (" , ", "", "  ", []):
        with pytest.raises(QpeftError, match=re.escape("--targets is empty: name layers")):
            parse_targets(empty, "--targets")


@pytest.mark.parametrize("targets", [("q_proj", "mlp.up_proj"), ("q_proj", "odd+name"), r".*\.q_proj"])
def test_targets_text_parses_back_to_the_same_selection(targets):
    model = tiny_llama()
    model.model.layers[0].add_module("odd+name", nn.Linear(4, 4))
    again = parse_targets(targets_text(targets), "--targets")
    assert select_linear(model, again) == select_linear(model, targets)


def test_all_linear_leaves_out_the_output_head():
    model = tiny_llama()
    assert select_linear(model, ALL_LINEAR) == [n for n in linear_names(model) if n != "lm_head"]


def test_no_match_lists_ten_of_the_models_linear_layers():
    model = tiny_llama()
    names = linear_names(model)
    message = (
        "no linear layer matches the targets ['attn'] (peft's target_modules rules: a list of names, each matching "
        "a module named so or ending with .NAME, or one regular expression of the whole name); this model's linear "
        f"layers: {', '.join(names[:10])} … (15 in all)"
    )
    with pytest.raises(QpeftError, match=re.escape(message)):
        select_linear(model, parse_targets("attn", "--targets"))


def test_family_defaults():
    torch.manual_seed(0)
    llama = tiny_llama()
    assert select_linear(llama) == [n for n in linear_names(llama) if n.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    assert len(select_linear(llama)) == 14

    qwen = Qwen2ForCausalLM(
        Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    )
    chosen = select_linear(qwen)
    assert len(chosen) == 14 and qwen.get_submodule(chosen[0]).bias is not None  # Qwen2's biased q_proj

    bert = BertModel(
        BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    )
    chosen = select_linear(bert)
    assert chosen == peft_selects(bert, BERT_TARGETS)
    assert len(chosen) == 2 * 6 and "pooler.dense" not in chosen  # q, k, v, attention out, intermediate, output
    assert {n.rsplit(".", 1)[-1] for n in chosen} == {"query", "key", "value", "dense"}


def test_a_recipe_takes_a_yaml_list_of_targets(tmp_path, tiny_model_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_model_dir}\nmethod: {{name: qlora, rank: 4, targets: [q_proj, mlp.down_proj]}}\n"
        "data: {train: wikitext2, seqlen: 16}\ntrain: {steps: 1}\n"
        f"output_dir: {tmp_path}/out\n"
    )
    assert load_recipe(recipe).method.targets == ["q_proj", "mlp.down_proj"]
