"""GPTQ-style perplexity (Frantar et al. 2023, §5; also LQ-LoRA's protocol).

The whole text is tokenized once and cut into non-overlapping windows of `seqlen`
tokens (the remainder is dropped); perplexity is exp of the mean NLL over every
predicted token, i.e. seqlen − 1 tokens per window. (GPTQ's script divides the
summed window losses by windows·seqlen instead, which understates the NLL by a
factor (seqlen−1)/seqlen; qpeft counts the tokens actually predicted.)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qpeft.data import BUILTIN_NAMES, DATASETS, dataset_path
from qpeft.errors import QpeftError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def load_eval_text(data: str | None = "wikitext2", text_file: str | None = None) -> str:
    """The evaluation text: a built-in test split or a user's UTF-8 file."""
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise QpeftError(f"text file not found: {text_file}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise QpeftError(f"{text_file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    else:
        if data not in DATASETS:
            raise QpeftError(f"unknown evaluation data {data!r}: use one of {BUILTIN_NAMES}, or --text-file")
        text = dataset_path(data, "test").read_text(encoding="utf-8")
    if not text.strip():
        raise QpeftError("the evaluation text is empty")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text, as one 1-D tensor."""
    # The text is far longer than the model's context; the ids are windowed later.
    saved = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e30)
    try:
        return tokenizer(text, return_tensors="pt").input_ids[0]
    finally:
        tokenizer.model_max_length = saved


def count_windows(num_tokens: int, seqlen: int, max_windows: int | None = None) -> int:
    """Number of whole windows evaluated; an error if the text has none."""
    windows = num_tokens // seqlen
    if windows == 0:
        raise QpeftError(f"the text has {num_tokens} tokens, fewer than one window of {seqlen}")
    return windows if max_windows is None else min(windows, max_windows)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> PerplexityResult:
    windows = count_windows(token_ids.numel(), seqlen, max_windows)
    start = time.perf_counter()
    total_nll, total_tokens = 0.0, 0
    model.eval()
    for i in tqdm(range(windows), desc="perplexity", unit="window", disable=not progress):
        ids = token_ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        total_nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        total_tokens += seqlen - 1
    nll = total_nll / total_tokens
    return PerplexityResult(math.exp(nll), nll, total_tokens, windows, seqlen, time.perf_counter() - start)
