"""Shared fixtures and helpers: a tiny random LLaMA saved as a transformers
directory, the in-process CLI runner and its one-line-error check, and what the
subprocess tests (marked `subprocess`) share."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from qpeft.data import dataset_path

REPO = Path(__file__).resolve().parents[1]
# one thread: subprocess runs then compute bit-identical cost tables and training steps
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
SMALL_GRID = "nf2-b64-s8x256-fp16,nf3-b64-s8x256-fp16,nf3-b32-s4x64-fp16,nf4-b64-s8x256-fp16,nf8-b64-s8x256-fp32"


def run(capsys, *argv):
    """`qpeft ARGV` in this process: (exit code, stdout, stderr)."""
    from qpeft.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, text):
    """Exit 2, no traceback, and the message alone on the last line (a progress bar,
    closed cleanly, may stand before it)."""
    assert code == 2
    assert "Traceback" not in err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("qpeft ") and ": error: " in last and text in last, err
    assert err.count(": error: ") == 1


def cli_command(*argv: object) -> list[str]:
    """The command line of `qpeft ARGV` in a fresh Python process."""
    return [sys.executable, "-m", "qpeft.cli", *map(str, argv)]


def free_port() -> int:
    """A free local TCP port (a torch.distributed rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = dataset_path("wikitext2", "valid").read_text(encoding="utf-8")[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make_byte_fallback_tokenizer(vocab_size: int = 640):
    """A LLaMA-2-style tokenizer: BPE over "▁"-joined words with byte fallback to the
    256 <0xXX> pieces (ids 3…258 after <s>, </s>, <unk>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    text = dataset_path("wikitext2", "valid").read_text(encoding="utf-8")[:200_000]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # trained on words, so that pieces start at a "▁" as SentencePiece's do; run unsplit, as LLaMA-2's
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<s>", "</s>", "<unk>", *(f"<0x{i:02X}>" for i in range(256))]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, limit_alphabet=60, show_progress=False
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    return LlamaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True
    )


def make_tiny_llama(
    path: Path,
    seed: int = 0,
    tie: bool = True,
    poison: str | None = None,
    intermediate_size: int = 128,
    hidden_size: int = 64,
    byte_fallback: bool = False,
) -> Path:
    """A 2-layer LLaMA (hidden 64, 4 heads) with random weights; `poison` puts a NaN in that
    tensor; `byte_fallback` gives it a LLaMA-2-style tokenizer instead of a GPT-2-style one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_byte_fallback_tokenizer() if byte_fallback else make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if poison is not None:
        with torch.no_grad():
            model.get_parameter(poison).view(-1)[7] = float("nan")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(dataset_path("wikitext2", "test").read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws the same random inputs on every run: torch, numpy and random
    seeded from the test's own name, so that a failure reproduces."""
    import random
    import zlib

    import numpy as np

    seed = zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0].encode())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped on a machine without a CUDA GPU (CI);
    tools/gpu_check.py runs them on a lent one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
