"""A causal LM run one decoder layer at a time, its weights streamed from safetensors.

Calibration needs forward passes (the input Gram matrices) and backward passes (the
Fisher) through the whole model, but never all of its weights at once. The hidden
states of all calibration sequences are kept at every layer boundary, so each
decoder layer is loaded once for the forward sweep and once for the backward sweep,
which recomputes its forward from the stored input and turns the gradient at its
output into the gradient at its input (layer-sequential, as GPTQ runs its forward).

On the device: one decoder layer, the embeddings, final norm and LM head, and one
batch of activations. On the CPU: the hidden states, (layers + 1) × sequences ×
seqlen × hidden in the calibration dtype (SmolLM2, 32 × 512 tokens: 1.2 GB in fp32;
LLaMA-2-70B: 43 GB). Compute is a third more than one whole-model forward and
backward, for the recomputed forward.

Supported: LLaMA-style decoders (`model.embed_tokens`, `model.layers`, `model.norm`,
`model.rotary_emb`, `lm_head`: LLaMA, Mistral, Qwen2, ...). Attention runs through
SDPA with its causal flag, which is exact for the unpadded full-length windows that
calibration uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from tqdm.auto import tqdm

from qpeft.distributed import is_main_process
from qpeft.errors import QpeftError
from qpeft.models.weights import SafetensorsWeights


class LayerwiseLM:
    """A model directory's causal LM with parameters on the meta device except the
    ones outside the decoder layers; `loaded(i)` materialises decoder layer i."""

    def __init__(self, model_dir: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        from qpeft.models.skeleton import build_skeleton

        # SDPA: mask-free causal attention (see the module docstring)
        self.model = build_skeleton(model_dir, dtype, attn_implementation="sdpa").requires_grad_(False)
        config = self.model.config
        self.dtype, self.device = dtype, torch.device(device)
        self.weights = SafetensorsWeights(model_dir)
        base = getattr(self.model, "model", None)
        parts = ("embed_tokens", "layers", "norm", "rotary_emb")
        if base is None or not all(hasattr(base, p) for p in parts) or not hasattr(self.model, "lm_head"):
            raise QpeftError(
                f"{type(self.model).__name__}: layer-wise calibration supports LLaMA-style decoders "
                "(model.embed_tokens, model.layers, model.norm, model.rotary_emb, lm_head)"
            )
        self.base = base
        self.layers: nn.ModuleList = base.layers
        self.base.rotary_emb.to(self.device)
        for name in ("model.embed_tokens", "model.norm"):
            self._materialise(name)
        if "lm_head.weight" in self.weights.weight_map:
            self._materialise("lm_head")
        elif getattr(config, "tie_word_embeddings", False):
            self.model.lm_head.weight = self.base.embed_tokens.weight
        else:
            raise QpeftError(f"{model_dir}: no lm_head.weight and the embeddings are not tied")

    def _materialise(self, prefix: str) -> None:
        module = self.model.get_submodule(prefix)
        for name, _ in module.named_parameters():
            key = f"{prefix}.{name}"
            if key not in self.weights.weight_map:
                raise QpeftError(f"{self.weights.model_dir}: {key} is not in the weights")
            value = self.weights.tensor(key).to(self.dtype)
            set_module_tensor_to_device(self.model, key, self.device, value=value)

    @contextlib.contextmanager
    def loaded(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer `index` with its weights on the device; back to meta after."""
        prefix = f"model.layers.{index}"
        self._materialise(prefix)
        try:
            yield self.layers[index]
        finally:
            for name, _ in self.layers[index].named_parameters():
                set_module_tensor_to_device(self.model, f"{prefix}.{name}", "meta")

    def linear_names(self, index: int, names: list[str]) -> list[str]:
        """Those of `names` that belong to decoder layer `index`."""
        prefix = f"model.layers.{index}."
        return [n for n in names if n.startswith(prefix)]

    def _run_layer(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=self.device).unsqueeze(0)
        rotary = self.base.rotary_emb(hidden, position_ids=positions)
        out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
        return out[0] if isinstance(out, tuple) else out

    def _batches(self, count: int, batch_size: int) -> list[slice]:
        return [slice(s, min(s + batch_size, count)) for s in range(0, count, batch_size)]

    @torch.no_grad()
    def forward_sweep(
        self,
        ids: torch.Tensor,
        batch_size: int = 1,
        keep: bool = False,
        on_layer: Callable[[int], None] | None = None,
        progress: str | None = None,
    ) -> list[torch.Tensor]:
        """Hidden states at the layer boundaries for token ids (sequences × seqlen):
        all of them (entering layer 0 … leaving the last) with `keep`, else only the
        last. `on_layer(i)` runs after layer i has seen every sequence."""
        batches = self._batches(ids.shape[0], batch_size)
        hidden = torch.cat([self.base.embed_tokens(ids[b].to(self.device)).cpu() for b in batches])
        states = [hidden]
        for index in tqdm(
            range(len(self.layers)), desc=progress, unit="layer", disable=progress is None or not is_main_process()
        ):
            with self.loaded(index) as layer:
                hidden = torch.cat([self._run_layer(layer, hidden[b].to(self.device)).cpu() for b in batches])
            if on_layer is not None:
                on_layer(index)
            states = [*states, hidden] if keep else [hidden]
        return states

    def sequence_loss_grad(self, last: torch.Tensor, ids: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
        """∂/∂h of Σ_s (mean next-token NLL of sequence s), h the last layer's output:
        each sequence's own loss gradient, unscaled by the others."""
        grads = []
        for b in self._batches(ids.shape[0], batch_size):
            hidden = last[b].to(self.device).requires_grad_(True)
            logits = self.model.lm_head(self.base.norm(hidden))[:, :-1]
            targets = ids[b, 1:].to(self.device)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
            nll.view(hidden.shape[0], -1).mean(dim=1).sum().backward()
            grads.append(hidden.grad.cpu())
        return torch.cat(grads)

    def backward_sweep(
        self, states: list[torch.Tensor], grad: torch.Tensor, batch_size: int = 1, progress: str | None = None
    ) -> None:
        """Backpropagate `grad` (at the last layer's output) through every layer, last
        first, from the stored inputs `states` (consumed): module hooks on the layers'
        linear maps see the same activations and output gradients as in a whole-model
        backward."""
        batches = self._batches(grad.shape[0], batch_size)
        order = reversed(range(len(self.layers)))
        for index in tqdm(
            order,
            total=len(self.layers),
            desc=progress,
            unit="layer",
            disable=progress is None or not is_main_process(),
        ):
            inputs = states.pop(index)
            del states[index:]  # the layer's output is not needed any more
            with self.loaded(index) as layer:
                next_grad = []
                for b in batches:
                    hidden = inputs[b].to(self.device).requires_grad_(True)
                    self._run_layer(layer, hidden).backward(grad[b].to(self.device))
                    next_grad.append(hidden.grad.cpu())
            grad = torch.cat(next_grad)
