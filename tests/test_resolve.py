"""Converting the embedded GGUF to the cached safetensors directory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from qpeft.models.resolve import embedded_gguf, gguf_to_safetensors, is_model_dir


def _stored_keys(model_dir) -> set[str]:
    keys = set()
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            keys |= set(handle.keys())
    return keys


def test_conversion_on_a_nonzero_rank_writes_the_weights(tmp_path, monkeypatch):
    """Every rank of a torchrun job on a fresh cache may be the one that converts;
    transformers' save_pretrained writes weights on rank 0 only, which once left a
    cached directory with a tokenizer and no weights."""
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    target = gguf_to_safetensors(embedded_gguf())
    assert is_model_dir(target)
    keys = _stored_keys(target)
    assert "model.embed_tokens.weight" in keys  # the tied lm_head is stored once, as the embedding
    assert "lm_head.weight" not in keys
    assert sum(k.endswith("_proj.weight") for k in keys) == 30 * 7


@pytest.mark.slow
@pytest.mark.subprocess
def test_concurrent_conversions_share_one_result(tmp_path):
    """Two processes converting at once (torchrun ranks on a fresh cache) both get the
    complete directory: one converts while the other waits on the lock."""
    code = "from qpeft.models.resolve import resolve_model; print(resolve_model('smollm2'))"
    env = {**os.environ, "QPEFT_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    paths = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(paths) == 1
    (model_dir,) = (tmp_path / "models").glob("*/")
    assert is_model_dir(model_dir)
    assert not list((tmp_path / "models").glob("*.partial-*"))
