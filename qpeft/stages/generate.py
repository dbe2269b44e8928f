"""`qpeft generate` as a library call: text from a model or a qpeft checkpoint (trained
or not; its packed base dequantized on the fly, its adapters applied), streamed as it
is decoded, through transformers' `generate` with its sampling settings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qpeft.errors import QpeftError
from qpeft.stages.checks import check_device, positive


@dataclass
class GenerateRequest:
    """`qpeft generate`: `model` is a name, a model directory or a qpeft checkpoint.
    The sampling fields are transformers' `generate` arguments of the same names
    (None: the model's generation config; greedy without `do_sample`)."""

    model: str | None
    prompt: str
    chat: bool = False  # wrap the prompt as a user turn in the model's chat template
    system: str | None = None  # with `chat`: a system turn before it
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int = 0
    dtype: str | None = None  # None: fp32 on the CPU, bf16 on CUDA
    device: str = "cpu"


@dataclass
class Generated:
    text: str  # the new text (the prompt not included)
    prompt_tokens: int
    new_tokens: int
    seconds: float  # the whole `generate` call: prefill and decoding
    first_token_seconds: float  # until the first new token was decoded

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of decoding after the first one (the prompt's
        prefill excluded), or over the whole call when one token was made."""
        decode = self.seconds - self.first_token_seconds
        if self.new_tokens > 1 and decode > 0:
            return (self.new_tokens - 1) / decode
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def _check(r: GenerateRequest) -> None:
    if not r.prompt.strip():
        raise QpeftError("--prompt is empty")
    positive("--max-new-tokens", r.max_new_tokens)
    positive("--top-k", r.top_k)
    if r.temperature is not None and r.temperature <= 0:
        raise QpeftError(f"--temperature must be positive, got {r.temperature} (drop --do-sample for greedy decoding)")
    if r.top_p is not None and not 0 < r.top_p <= 1:
        raise QpeftError(f"--top-p must lie in (0, 1], got {r.top_p}")
    if r.repetition_penalty is not None and r.repetition_penalty <= 0:
        raise QpeftError(f"--repetition-penalty must be positive, got {r.repetition_penalty}")
    sampling = [f for f in ("temperature", "top_p", "top_k") if getattr(r, f) is not None]
    if sampling and not r.do_sample:
        flags = ", ".join(f"--{f.replace('_', '-')}" for f in sampling)
        raise QpeftError(f"{flags} only apply with --do-sample (greedy decoding ignores them)")
    if r.system is not None and not r.chat:
        raise QpeftError("--system needs --chat")
    check_device(r.device)


def prompt_ids(tokenizer, r: GenerateRequest):
    """The prompt's token ids (1 × n): as given, or wrapped in the chat template."""
    if not r.chat:
        return tokenizer(r.prompt, return_tensors="pt").input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise QpeftError("the model's tokenizer has no chat template: drop --chat")
    turns = ([{"role": "system", "content": r.system}] if r.system is not None else []) + [
        {"role": "user", "content": r.prompt}
    ]
    return tokenizer.apply_chat_template(turns, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


def run_generate(request: GenerateRequest, stream: Callable[[str], None] | None = None) -> Generated:
    """Check the request (before loading the model), generate, and call `stream` with
    each piece of new text as soon as it is decoded; returns the text and its timing."""
    import torch
    from transformers import AutoTokenizer, TextStreamer

    from qpeft.models.loading import load_model, locate
    from qpeft.models.skeleton import require_causal_lm
    from qpeft.quant.config import TORCH_DTYPES

    r = request
    _check(r)
    path = locate(r.model)
    require_causal_lm(path, "generation")
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = prompt_ids(tokenizer, r)
    dtype = TORCH_DTYPES[r.dtype or ("bf16" if torch.device(r.device).type == "cuda" else "fp32")]
    model = load_model(path, dtype, r.device)
    pieces: list[str] = []
    token_times: list[float] = []

    class _Streamer(TextStreamer):
        """Each finished piece of text to `stream`; the time of each new token."""

        def put(self, value) -> None:
            if not self.next_tokens_are_prompt:
                token_times.append(time.perf_counter())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                pieces.append(text)
                if stream is not None:
                    stream(text)

    settings: dict[str, Any] = {
        k: getattr(r, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty") if getattr(r, k) is not None
    }
    if tokenizer.pad_token_id is None:
        settings["pad_token_id"] = tokenizer.eos_token_id
    torch.manual_seed(r.seed)
    ids = ids.to(r.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=r.max_new_tokens,
            do_sample=r.do_sample,
            streamer=_Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            **settings,
        )
    seconds = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    return Generated("".join(pieces), ids.shape[1], new, seconds, (token_times[0] - start) if token_times else seconds)
