"""`qpeft generate`: streamed greedy and sampled text from models and checkpoints."""

from __future__ import annotations

import json
import re

import pytest
import torch

from qpeft.models.loading import load_checkpoint
from qpeft.quant import PRESETS
from qpeft.stages.generate import GenerateRequest, run_generate
from qpeft.stages.quantize import quantize_model
from qpeft.training.model import save_with_random_lora
from tests.conftest import assert_one_line_error, run

PROMPT = "The history of the"


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """An NF4 checkpoint with non-zero LoRA adapters."""
    root = tmp_path_factory.mktemp("generate")
    quantize_model(tiny_model_dir, root / "nf4", PRESETS["nf4"])
    return save_with_random_lora(root / "nf4", root / "trained", 4, 8.0, std=0.5)


def _greedy(model, tokenizer, n: int) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_streamed_text_is_the_checkpoints_greedy_continuation(trained):
    from transformers import AutoTokenizer

    pieces: list[str] = []
    result = run_generate(GenerateRequest(str(trained), PROMPT, max_new_tokens=12), pieces.append)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    expected = _greedy(load_checkpoint(trained), tokenizer, 12)
    assert "".join(pieces) == result.text == expected and len(pieces) >= 1
    assert result.new_tokens == 12 and result.prompt_tokens == tokenizer(PROMPT, return_tensors="pt").input_ids.shape[1]
    assert 0 < result.first_token_seconds <= result.seconds and result.tokens_per_second > 0
    # the adapters are applied: the base alone continues differently
    base = trained.parent / "nf4"
    assert run_generate(GenerateRequest(str(base), PROMPT, max_new_tokens=12)).text != expected


def test_sampling_follows_its_seed(tiny_model_dir):
    def sample(seed):
        request = GenerateRequest(str(tiny_model_dir), PROMPT, max_new_tokens=16, do_sample=True, top_k=50, seed=seed)
        return run_generate(request).text

    first = sample(0)
    assert sample(0) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_chat_applies_the_models_template(tiny_model_dir, tmp_path, capsys):
    import shutil

    code, _, err = run(capsys, "generate", tiny_model_dir, "--prompt", "hi", "--chat")
    assert_one_line_error(code, err, "the model's tokenizer has no chat template: drop --chat")
    chat = tmp_path / "chat"
    shutil.copytree(tiny_model_dir, chat)
    config = json.loads((chat / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    (chat / "tokenizer_config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "generate", chat, "--prompt", "hello", "--chat", "--system", "be brief",
                         "--max-new-tokens", 5)  # fmt: skip
    assert code == 0, err
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat)
    turns = tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}], tokenize=False
    )
    prompt = len(tokenizer(turns).input_ids)
    found = re.search(r"(\d) new tokens after a (\d+)-token prompt in [\d.]+ s: [\d.]+ tokens/s decoding", err)
    assert found and 1 <= int(found[1]) <= 5 and int(found[2]) == prompt, err  # it may stop at </s>


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prompt", " "], "--prompt is empty"),
        (["--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
        (["--prompt", "a", "--temperature", "0.7"], "--temperature only apply with --do-sample"),
        (["--prompt", "a", "--do-sample", "--top-p", "1.5"], "--top-p must lie in (0, 1], got 1.5"),
        (["--prompt", "a", "--do-sample", "--temperature", "0"], "--temperature must be positive, got 0.0"),
        (["--prompt", "a", "--system", "x"], "--system needs --chat"),
    ],
)
def test_bad_flags_are_one_line(tiny_model_dir, capsys, flags, message):
    code, _, err = run(capsys, "generate", tiny_model_dir, *flags)
    assert_one_line_error(code, err, message)
