"""`qpeft eval` as a library call: perplexity of a model or a qpeft checkpoint by
the GPTQ protocol (`qpeft.eval.perplexity`: non-overlapping windows of `seqlen`
tokens, exp of the mean NLL over every predicted token)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qpeft.errors import QpeftError
from qpeft.stages.checks import check_device, positive


@dataclass
class EvalRequest:
    """`qpeft eval`: `model` is a name, a model directory or a qpeft checkpoint."""

    model: str | None
    data: str = "wikitext2"  # a built-in test split
    text_file: str | None = None  # a user's UTF-8 text instead
    seqlen: int = 2048
    max_windows: int | None = None
    dtype: str = "fp32"
    device: str = "cpu"


def run_eval(request: EvalRequest) -> dict[str, Any]:
    """Check the request (before loading the model), then evaluate; returns the row
    `qpeft eval --json` prints: model, data, dtype and `PerplexityResult`'s fields.
    A model that is not a causal LM (an encoder, a head-less checkpoint) has no
    perplexity: its row has `ppl` None and a `note` saying why."""
    import torch
    from transformers import AutoTokenizer

    from qpeft.eval.perplexity import count_windows, load_eval_text, perplexity, tokenize
    from qpeft.models.loading import load_model, locate
    from qpeft.models.skeleton import model_architecture, model_task
    from qpeft.quant.config import TORCH_DTYPES

    r = request
    positive("--seqlen", r.seqlen)
    if r.seqlen < 2:
        raise QpeftError(f"--seqlen must be at least 2 tokens, got {r.seqlen}")
    positive("--max-windows", r.max_windows)
    check_device(r.device)
    text = load_eval_text(r.data, r.text_file)
    path = locate(r.model)
    task = model_task(path)
    if task != "causal-lm":
        note = (
            f"perplexity: N/A: {model_architecture(path)} is a {task} model; perplexity needs a causal LM's "
            "next-token head"
        )
        return {
            "model": r.model or "smollm2",
            "data": r.text_file or r.data,
            "dtype": r.dtype,
            "ppl": None,
            "note": note,
        }
    context = json.loads((path / "config.json").read_text()).get("max_position_embeddings")
    if context is not None and r.seqlen > context:
        raise QpeftError(f"--seqlen {r.seqlen} is longer than the model's context (max_position_embeddings {context})")
    ids = tokenize(AutoTokenizer.from_pretrained(path), text)
    count_windows(ids.numel(), r.seqlen)  # fail before loading the model
    model = load_model(path, TORCH_DTYPES[r.dtype], r.device)
    result = perplexity(model, ids, r.seqlen, r.max_windows, torch.device(r.device))
    return {"model": r.model or "smollm2", "data": r.text_file or r.data, "dtype": r.dtype, **result.as_dict()}
