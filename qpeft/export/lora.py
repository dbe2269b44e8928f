"""Adapters in LoRA form (ΔW = B·A, peft's lora_B · lora_A), and peft adapter directories.

A low-rank adapter is already one (B = scale·L1, A = L2). With `rank` below its own,
or for a QWHA adapter (ΔW = F·T has no factors), ΔW is compressed by a truncated SVD:
for L1·L2 exactly, from the QR factors of L1 and L2ᵀ (an r × r SVD); for a dense ΔW by
a randomized SVD (the LoRA-Squeeze step, post-hoc rank compression). The relative
Frobenius error ‖ΔW − B·A‖ / ‖ΔW‖ is reported per matrix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qpeft.errors import QpeftError
from qpeft.methods.lowrank import randomized_svd
from qpeft.modules.adapters import LowRankAdapter


@dataclass
class LoraFactors:
    b: torch.Tensor  # d_out × r (lora_B)
    a: torch.Tensor  # r × d_in (lora_A)
    rel_error: float  # of B·A against the adapter's ΔW (0 when exact)


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    root = s.sqrt()
    return u * root, root.unsqueeze(1) * vh


def lora_factors(adapter: nn.Module, rank: int | None, seed: int = 0) -> LoraFactors:
    """`adapter` as B·A of at most `rank` (its own rank when None)."""
    if isinstance(adapter, LowRankAdapter):
        left, right = adapter.left.detach().float() * adapter.scale, adapter.right.detach().float()
        if rank is None or rank >= adapter.rank:
            return LoraFactors(left, right, 0.0)
        q1, r1 = torch.linalg.qr(left)
        q2, r2 = torch.linalg.qr(right.T)
        u, s, vh = torch.linalg.svd(r1 @ r2.T)
        b, a = _split(q1 @ u[:, :rank], s[:rank], vh[:rank] @ q2.T)
        kept = float(s[:rank].square().sum())
        total = float(s.square().sum()) or 1.0
        return LoraFactors(b, a, max(0.0, 1.0 - kept / total) ** 0.5)
    if rank is None:
        raise QpeftError(
            f"a {adapter.kind!r} adapter has no LoRA form: pass --rank R to fit one by truncated SVD "
            "(the error is reported)"
        )
    delta = adapter.delta_weight(torch.float32).detach()
    generator = torch.Generator(device=delta.device).manual_seed(seed)
    b, a = _split(*randomized_svd(delta, rank, power_iters=4, generator=generator))
    norm = float(torch.linalg.norm(delta)) or 1.0
    return LoraFactors(b, a, float(torch.linalg.norm(delta - b @ a)) / norm)


# qpeft's task → peft's TaskType (None: peft's plain PeftModel, as for a masked LM)
PEFT_TASK_TYPES = {
    "causal-lm": "CAUSAL_LM",
    "masked-lm": None,
    "feature-extraction": "FEATURE_EXTRACTION",
    "sequence-classification": "SEQ_CLS",
}


def write_peft_adapter(
    out: Path,
    factors: dict[str, LoraFactors],
    base_model: str,
    dtype: torch.dtype = torch.bfloat16,
    task: str = "causal-lm",
) -> None:
    """A peft LoRA directory (adapter_config.json + adapter_model.safetensors) that
    `PeftModel.from_pretrained(model, out)` loads: lora_alpha = r, so peft's scaling
    alpha / r is 1 and B·A is ΔW as given. `task` (a `qpeft.models.skeleton.TASKS`
    name) sets peft's task_type."""
    if not factors:
        raise QpeftError("the checkpoint has no adapters to export")
    ranks = {name: f.a.shape[0] for name, f in factors.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    tensors = {}
    for name, f in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = f.a.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = f.b.to(dtype).contiguous()
    others = {name: r for name, r in ranks.items() if r != rank}
    config = {
        "peft_type": "LORA",
        "task_type": PEFT_TASK_TYPES[task],
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,
        # peft matches these patterns as regexes against the end of a module's name
        "rank_pattern": {re.escape(name): r for name, r in others.items()},
        "alpha_pattern": {re.escape(name): r for name, r in others.items()},
        "target_modules": sorted(factors),  # full names: exactly the adapted matrices
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
